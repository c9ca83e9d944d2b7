"""Where runs execute: one small interface, several engines.

A *job* is a list of runs that one worker executes (today one run per job; a seed-batched
engine will put several seeds of one config in one job). Each run is the plain dict
``{"config": RunConfig.to_dict(), "setting": label}``. A backend is constructed with the
experiment directory and has one method::

    run(jobs) -> iterator of statuses   # one status dict per run, as runs finish

Every worker calls :func:`klppo_bench.backends.worker.execute_job`, which writes the run
directories; backends only return statuses (``run_id``, ``state``, ``error``, ...), never
results. ``on_event`` (optional) receives live progress events from workers:
``{"event": "start" | "iteration", "run_id": ..., "frames": ...}``.

* ``local`` (default): one fresh process per job, ``workers`` at a time, one torch thread
  each; a worker killed from outside (SIGKILL, out of memory) loses only its own run, which
  is recorded as failed with the signal's name.
* ``ray``: the same jobs as Ray tasks (``num_cpus=1``) on a local Ray or, with
  ``ray_address="auto"``, on an existing cluster, with or without a shared filesystem
  (``ray_storage``: :mod:`klppo_bench.backends.ray_backend`). Ray is imported only there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

from klppo_bench.backends.cores import default_workers  # noqa: F401 -- re-exported
from klppo_bench.errors import ConfigError

Job = list  # list of {"config": dict, "setting": str}
BACKENDS = ("local", "ray")


class Backend(Protocol):
    def run(self, jobs: Iterable[Job]) -> Iterator[dict]: ...


def make_backend(name: str, exp_dir: Path, workers: int | None = None,
                 ray_address: str | None = None,
                 on_event: Callable[[dict], None] | None = None,
                 ray_storage: str = "auto") -> Backend:
    if name == "local":
        from klppo_bench.backends.local import LocalBackend

        return LocalBackend(exp_dir, workers=workers, on_event=on_event)
    if name == "ray":
        from klppo_bench.backends.ray_backend import RayBackend

        return RayBackend(exp_dir, workers=workers, address=ray_address, on_event=on_event,
                          storage=ray_storage)
    raise ConfigError(f"--backend {name!r}: allowed: {', '.join(BACKENDS)}")

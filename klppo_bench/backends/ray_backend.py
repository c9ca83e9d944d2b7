"""The Ray backend: each job is a Ray task (``num_cpus=1``) calling the same ``execute_job``.

``address=None`` starts a private local Ray with ``workers`` CPUs and shuts it down after
the sweep; ``address="auto"`` (or ``ray://...``, ``host:port``) joins a running cluster,
whose CPUs then bound the parallelism. Every node needs klppo-bench (and any ``--plugin``
module) installed. Tasks are not retried by Ray: a run that fails is recorded and retried
only with ``--retry-failed``, as on the local backend.

Where the records are written (``storage``, ``--ray-storage``):

* ``auto`` (default): a task whose node sees the experiment directory at the same absolute
  path (a shared filesystem; checked with a token the driver writes there) writes its runs
  there itself; a task on a node that does not trains in a scratch directory of its own and
  sends the records back (:mod:`klppo_bench.backends.remote`);
* ``shared``: every node must see it; a task that does not is recorded failed, saying so;
* ``driver``: tasks never touch the results path (they are not even given it): every record
  and checkpoint travels back to the driver, whose store writes it.

Either way the results are the same to the bit, and a worker that dies loses at most one
checkpoint interval: without a shared filesystem each checkpoint is sent to the driver as soon
as the worker has written it, and the rerun's task starts from it.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

from klppo_bench.backends.worker import execute_job, record_lost, run_status

STORAGES = ("auto", "shared", "driver")


def _ray_job(job: list[dict], exp_dir: str | None, token: str, storage: str, queue,
             progress: bool, seeds: dict | None) -> dict:
    """One task: write into ``exp_dir`` if this node sees it (and ``storage`` allows), else
    train in a scratch directory and return the records (``{"elsewhere": ...}``)."""
    from klppo_bench.backends.remote import execute_elsewhere, sees_results

    if storage != "driver" and sees_results(exp_dir, token):
        execute_job(job, exp_dir, on_event=queue.put if progress else None)
        return {"elsewhere": None}
    if storage == "shared":
        import socket

        raise RuntimeError(f"--ray-storage shared: node {socket.gethostname()} cannot see or "
                           f"write {exp_dir}; allowed: a path every node mounts, or "
                           "--ray-storage auto|driver")
    return {"elsewhere": execute_elsewhere(job, seeds, queue.put, progress)}


class RayBackend:
    """Run jobs as Ray tasks; see the module docstring."""

    def __init__(self, exp_dir: Path | str, workers: int | None = None,
                 address: str | None = None,
                 on_event: Callable[[dict], None] | None = None, storage: str = "auto"):
        from klppo_bench.backends.cores import default_workers

        self.exp_dir = Path(exp_dir).resolve()
        self.workers = workers or default_workers()
        self.address = address
        self.on_event = on_event
        self.storage = storage

    def run(self, jobs: Iterable[list[dict]]) -> Iterator[dict]:
        """Yield one status per run as tasks finish; a lost task's runs come back failed."""
        import ray

        from klppo_bench.store import atomic_write_bytes

        started = not ray.is_initialized()
        if started:
            self._init(ray)
        token = uuid.uuid4().hex
        token_file = self.exp_dir / ".ray-token"
        queue = None
        pending: dict = {}
        try:
            from ray.util.queue import Queue

            atomic_write_bytes(token_file, token.encode())
            queue = Queue()  # progress events, and checkpoints sent back by remote jobs
            remote = ray.remote(num_cpus=1, max_retries=0)(_ray_job)
            where = None if self.storage == "driver" else str(self.exp_dir)
            for job in jobs:
                seeds = None
                if self.storage != "shared":
                    from klppo_bench.backends.remote import seeds_for

                    seeds = seeds_for(job, self.exp_dir)
                pending[remote.remote(job, where, token, self.storage, queue,
                                      self.on_event is not None, seeds)] = job
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                self._drain(queue)
                for ref in ready:
                    yield from self._collect(ray, ref, pending.pop(ref))
        finally:
            for ref in pending:  # interrupted: stop what is still queued or running
                ray.cancel(ref, force=True)
            if queue is not None:
                queue.shutdown()
            token_file.unlink(missing_ok=True)
            if started:
                ray.shutdown()

    def _init(self, ray) -> None:
        """Join the cluster, or start a private local Ray; one line if neither works."""
        try:
            if self.address:
                ray.init(address=self.address, log_to_driver=False,
                         logging_level=logging.WARNING)
            else:
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING)
        except Exception as err:  # noqa: BLE001 -- Ray raises plain Exceptions here
            from klppo_bench.errors import ConfigError

            with contextlib.suppress(Exception):
                ray.shutdown()
            first = (str(err).strip().splitlines() or [""])[0]
            where = f"the cluster at {self.address}" if self.address else "a local Ray"
            raise ConfigError(f"--backend ray: cannot start {where} ({type(err).__name__}: "
                              f"{first}); nothing was run") from None

    def _collect(self, ray, ref, job: list[dict]) -> list[dict]:
        """The statuses of a finished task, its records stored first if it sent them."""
        from klppo_bench.backends.remote import store_result

        try:
            out = ray.get(ref)
        except ray.exceptions.RayError as err:  # worker or node lost, or a task error
            cause = getattr(err, "cause", None) or err  # a task's own exception, if any
            reason = (str(cause).strip().splitlines() or [""])[0]
            return record_lost(job, self.exp_dir, f"{type(cause).__name__}: {reason}")
        if out["elsewhere"] is not None:
            log = next((e["log"] for e in job if e.get("log")), None)
            store_result(self.exp_dir, out["elsewhere"], log["log_dir"] if log else None)
        return [run_status(self.exp_dir, e) for e in job if e.get("write", True)]

    def _drain(self, queue) -> None:
        from klppo_bench.backends.remote import store_checkpoint

        if queue is not None and queue.qsize():
            for event in queue.get_nowait_batch(queue.qsize()):
                if event.get("event") == "checkpoint":
                    store_checkpoint(self.exp_dir, event)
                elif self.on_event is not None:
                    self.on_event(event)

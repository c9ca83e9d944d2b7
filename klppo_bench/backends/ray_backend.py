"""The Ray backend: each job is a Ray task (``num_cpus=1``) calling the same ``execute_job``.

``address=None`` starts a private local Ray with ``workers`` CPUs and shuts it down after
the sweep; ``address="auto"`` (or ``ray://...``, ``host:port``) joins a running cluster,
whose CPUs then bound the parallelism. Every node must see the experiment directory at the
same absolute path (a shared filesystem) and have klppo-bench (and any ``--plugin``
module) installed. Tasks are not retried by Ray: a run that fails is recorded and retried
only with ``--retry-failed``, as on the local backend.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable, Iterator

from klppo_bench.backends.worker import execute_job, record_lost


def _ray_job(job: list[dict], exp_dir: str, queue) -> list[dict]:
    return execute_job(job, exp_dir, on_event=queue.put if queue is not None else None)


class RayBackend:
    """Run jobs as Ray tasks; see the module docstring."""

    def __init__(self, exp_dir: Path | str, workers: int | None = None,
                 address: str | None = None,
                 on_event: Callable[[dict], None] | None = None):
        from klppo_bench.backends import default_workers

        self.exp_dir = str(Path(exp_dir).resolve())
        self.workers = workers or default_workers()
        self.address = address
        self.on_event = on_event

    def run(self, jobs: Iterable[list[dict]]) -> Iterator[dict]:
        """Yield one status per run as tasks finish; a lost task's runs come back failed."""
        import ray

        started = not ray.is_initialized()
        if started and self.address:
            ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
        elif started:
            ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        queue = None
        pending: dict = {}
        try:
            if self.on_event is not None:
                from ray.util.queue import Queue

                queue = Queue()
            remote = ray.remote(num_cpus=1, max_retries=0)(_ray_job)
            pending = {remote.remote(job, self.exp_dir, queue): job for job in jobs}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1,
                                    timeout=0.5 if queue is not None else None)
                self._drain(queue)
                for ref in ready:
                    job = pending.pop(ref)
                    try:
                        statuses = ray.get(ref)
                    except ray.exceptions.RayError as err:  # worker or node lost
                        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
                        statuses = record_lost(job, self.exp_dir,
                                               f"{type(err).__name__}: {reason}")
                    yield from statuses
        finally:
            for ref in pending:  # interrupted: stop what is still queued or running
                ray.cancel(ref, force=True)
            if queue is not None:
                queue.shutdown()
            if started:
                ray.shutdown()

    def _drain(self, queue) -> None:
        if queue is not None and queue.qsize():
            for event in queue.get_nowait_batch(queue.qsize()):
                self.on_event(event)

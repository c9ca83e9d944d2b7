"""The local backend: one fresh process per job, ``workers`` at a time.

Why not ``concurrent.futures.ProcessPoolExecutor``: when one of its workers dies (SIGKILL, the
out-of-memory killer) it marks the whole pool broken, terminates every other worker and does
not say which job died. Here each job has its own process, so a death is seen through that
process's exit code, only its own run is lost (recorded as failed with the signal's name),
and the others go on.

Processes come from a ``forkserver`` that imports the harness once (``set_forkserver_preload``):
a job starts in milliseconds instead of re-importing torch and torchrl, and no process forks
a parent that holds threads. Each worker uses one torch thread (``seed_everything``; the
BLAS/OpenMP pools are sized 1 through the environment the forkserver starts with). Live
progress events travel through one pipe per worker: a killed worker cannot corrupt another's
channel.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable, Iterable, Iterator

from klppo_bench.backends.worker import record_lost, run_status

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _exit_when_orphaned(sweep_pid: int, period: float = 2.0) -> None:
    """End this worker if the sweep that started it is gone (killed with SIGKILL, say).

    Workers are children of the forkserver, not of the sweep, so they would otherwise run
    on as orphans and a re-run of the sweep would train the same runs twice at once. The
    runs they leave ``running`` are restarted by the next sweep.
    """
    import threading
    import time

    def watch() -> None:
        while True:
            time.sleep(period)
            try:
                os.kill(sweep_pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="orphan-watch").start()


def _worker_main(job: list[dict], exp_dir: str, conn, sweep_pid: int) -> None:
    from klppo_bench.backends.worker import execute_job

    _exit_when_orphaned(sweep_pid)

    def send(event: dict) -> None:
        if conn is not None:
            try:
                conn.send(event)
            except OSError:  # the sweep went away; the run still finishes on disk
                pass

    try:
        execute_job(job, exp_dir, on_event=send if conn is not None else None)
    except OSError as err:  # not even the failure could be recorded (disk full): one line
        import sys

        print(f"klppo-bench: worker: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return (f"WorkerDied: worker process killed by {name} (out of memory, or killed "
                "from outside)")
    return f"WorkerDied: worker process exited with code {exitcode} without recording a result"


class LocalBackend:
    """Run jobs in local worker processes; see the module docstring."""

    def __init__(self, exp_dir: Path | str, workers: int | None = None,
                 on_event: Callable[[dict], None] | None = None):
        from klppo_bench.backends.cores import default_workers

        self.exp_dir = str(Path(exp_dir).resolve())
        self.workers = workers or default_workers()
        self.on_event = on_event

    def _context(self):
        for var in _THREAD_VARS:  # read by the forkserver when it starts
            os.environ.setdefault(var, "1")
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["klppo_bench.backends.worker"])
        return ctx

    def run(self, jobs: Iterable[list[dict]]) -> Iterator[dict]:
        """Yield one status per run as jobs finish; a dead worker's runs come back failed."""
        ctx = self._context()
        queue = list(jobs)
        running: dict = {}  # process sentinel -> (process, job)
        channels: dict = {}  # reader connection -> None
        try:
            while queue or running:
                while queue and len(running) < self.workers:
                    job = queue.pop(0)
                    reader = writer = None
                    if self.on_event is not None:
                        reader, writer = ctx.Pipe(duplex=False)
                    # Not daemonic: a job may start processes of its own (vector envs).
                    proc = ctx.Process(target=_worker_main,
                                       args=(job, self.exp_dir, writer, os.getpid()))
                    proc.start()
                    if writer is not None:
                        writer.close()  # the child holds the only writer: EOF when it ends
                        channels[reader] = None
                    running[proc.sentinel] = (proc, job)
                for ready in wait(list(running) + list(channels)):
                    if ready in channels:
                        self._drain(ready, channels)
                        continue
                    proc, job = running.pop(ready)
                    proc.join()
                    if proc.exitcode == 0:
                        yield from (run_status(self.exp_dir, e) for e in job if e.get("write", True))
                    else:
                        yield from record_lost(job, self.exp_dir, _death_reason(proc.exitcode))
        finally:  # interrupted (Ctrl-C) or abandoned: stop our workers, runs stay resumable
            for proc, _ in running.values():
                proc.terminate()
            for proc, _ in running.values():
                proc.join()
            for reader in channels:
                reader.close()

    def _drain(self, reader, channels: dict) -> None:
        try:
            while reader.poll():
                self.on_event(reader.recv())
        except (EOFError, OSError):
            channels.pop(reader)
            reader.close()

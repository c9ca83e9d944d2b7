"""Jobs on machines that cannot see the results directory: train in a scratch directory on the
worker, send the records back, and let the driver's store write them.

The worker side (:func:`execute_elsewhere`) runs the job with :func:`~klppo_bench.backends.
worker.execute_job` into a fresh temporary directory of its own node, seeded with what the
driver sent (each run's previous ``status.json``, so attempts count on; the job's checkpoint,
so a rerun resumes). While the job trains, every checkpoint it writes is sent to the driver as
soon as it is on the worker's disk (a ``checkpoint`` event), so a worker that dies loses at
most one checkpoint interval, as on a shared filesystem. When the job ends, the worker returns
each written run's files, the file loggers' files and what became of the checkpoints, and
deletes its scratch directory.

The driver side (:func:`seeds_for`, :func:`store_checkpoint`, :func:`store_result`) is the one
writer of every run directory: each record is written through the store (atomic files,
``status.json`` last), exactly as a worker on a shared filesystem would have left it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

from klppo_bench.config import RunConfig
from klppo_bench.store import RunDir, atomic_write_bytes

_CHECKPOINT = re.compile(r"job-[0-9a-f]{16}\.pt")
_SKIPPED_LOGS = ("mlflow",)
"""Logger folders not sent back: MLflow's SQLite store cannot be merged file by file (without
a shared filesystem, point ``MLFLOW_TRACKING_URI`` at a server every node reaches)."""
POLL_SECONDS = 0.2
"""How often a worker looks for a new checkpoint to send."""


def sees_results(exp_dir: str | None, token: str) -> bool:
    """Whether this process sees the driver's experiment directory (the token the driver
    wrote there) and may write in it."""
    if not exp_dir:
        return False
    try:
        return ((Path(exp_dir) / ".ray-token").read_text() == token
                and os.access(exp_dir, os.W_OK))
    except (OSError, ValueError):
        return False


def _run_ids(job: list[dict]) -> list[str]:
    return [RunConfig.from_dict(e["config"]).run_id() for e in job]


# ---------------------------------------------------------------- driver side

def seeds_for(job: list[dict], exp_dir: Path) -> dict:
    """What a worker without the results directory needs from the driver's store: the
    previous ``status.json`` of each run it writes, and the job's checkpoint, if any."""
    from klppo_bench.harness.batched.checkpoint import job_checkpoint_path

    statuses = {}
    for entry, run_id in zip(job, _run_ids(job)):
        path = exp_dir / "runs" / run_id / "status.json"
        if entry.get("write", True) and RunDir(path.parent).status() is not None:
            statuses[run_id] = path.read_bytes()
    checkpoints = {}
    if all(e.get("engine") == "batched" for e in job):
        path = job_checkpoint_path(exp_dir, _run_ids(job))
        if path.is_file():
            checkpoints[path.name] = path.read_bytes()
    return {"statuses": statuses, "checkpoints": checkpoints}


def store_checkpoint(exp_dir: Path, event: dict) -> None:
    """A checkpoint a worker sent while its job runs: written where a shared filesystem would
    have it."""
    name = event["name"]
    if _CHECKPOINT.fullmatch(name):
        atomic_write_bytes(exp_dir / "checkpoints" / name, event["data"])


def store_result(exp_dir: Path, result: dict, log_dir: str | None) -> None:
    """Write what a worker sent back: each run's record (``status.json`` last), the file
    loggers' files under the driver's ``log_dir``, and the job's checkpoints (kept ones
    written, ones the job deleted removed)."""
    for run_id, files in result["runs"].items():
        if Path(run_id).name == run_id and not run_id.startswith("."):
            RunDir(exp_dir / "runs" / run_id).write_record(files)
    if log_dir:
        for rel, data in result["logs"].items():
            if rel.split("/", 1)[0] not in _SKIPPED_LOGS and ".." not in Path(rel).parts:
                atomic_write_bytes(Path(log_dir) / rel, data)
    for name, data in result["checkpoints"].items():
        store_checkpoint(exp_dir, {"name": name, "data": data})
    for name in result["dropped"]:
        if _CHECKPOINT.fullmatch(name):
            (exp_dir / "checkpoints" / name).unlink(missing_ok=True)


# ---------------------------------------------------------------- worker side

def _stamp(path: Path) -> tuple[int, int, int]:
    """Changes whenever a new version is renamed into place."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


class _CheckpointSender:
    """Sends each new version of a checkpoint under ``folder`` (a thread polling every
    :data:`POLL_SECONDS`); remembers every name it saw."""

    def __init__(self, folder: Path, send: Callable[[dict], None]):
        self.folder, self.send = folder, send
        self.seen: dict[str, tuple] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="ckpt-sender")

    def note(self, name: str) -> None:
        """A checkpoint that was there from the start (sent by the driver)."""
        self.seen[name] = _stamp(self.folder / name)

    def poll(self) -> None:
        for path in sorted(self.folder.glob("job-*.pt")):
            try:
                stamp = _stamp(path)
                if self.seen.get(path.name) == stamp:
                    continue
                data = path.read_bytes()  # replaced by rename: a whole version, old or new
            except FileNotFoundError:
                continue
            self.send({"event": "checkpoint", "name": path.name, "data": data})
            self.seen[path.name] = stamp

    def _watch(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self.poll()

    def __enter__(self) -> "_CheckpointSender":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _files(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Regular files under ``folder`` by relative path (hidden temporaries left out)."""
    out = {}
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and not path.is_symlink() and not path.name.startswith(".") \
                    and rel.split("/", 1)[0] not in skip:
                out[rel] = path.read_bytes()
    return out


def execute_elsewhere(job: list[dict], seeds: dict,
                      send: Callable[[dict], None], progress: bool) -> dict:
    """Run ``job`` in a scratch directory on this node (see the module docstring); return
    ``{"runs": {run_id: {file: bytes}}, "logs": {path: bytes}, "checkpoints": {name: bytes},
    "dropped": [names]}``. ``send`` carries checkpoint events, and progress events if
    ``progress``."""
    from klppo_bench.backends.worker import execute_job

    scratch = Path(tempfile.mkdtemp(prefix="klppo-bench-job-"))
    try:
        for run_id, data in seeds["statuses"].items():
            (scratch / "runs" / run_id).mkdir(parents=True)
            (scratch / "runs" / run_id / "status.json").write_bytes(data)
        folder = scratch / "checkpoints"
        folder.mkdir()
        sender = _CheckpointSender(folder, send)
        for name, data in seeds["checkpoints"].items():
            (folder / name).write_bytes(data)
            sender.note(name)
        job = [dict(e, log=dict(e["log"], log_dir=str(scratch / "logs")) if e.get("log")
                    else None) for e in job]
        with sender:
            execute_job(job, scratch, on_event=send if progress else None)
        sender.poll()  # the last version, before the result says what is left
        kept = _files(folder)
        written = [run_id for e, run_id in zip(job, _run_ids(job)) if e.get("write", True)]
        return {"runs": {r: _files(scratch / "runs" / r) for r in written
                         if (scratch / "runs" / r).is_dir()},
                "logs": _files(scratch / "logs", skip=_SKIPPED_LOGS),
                "checkpoints": {n: d for n, d in kept.items() if _CHECKPOINT.fullmatch(n)},
                "dropped": [n for n in sender.seen if n not in kept]}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

"""A batched job's records: each lane's run directory, written as
:func:`~klppo_bench.harness.run.execute_run` writes one run's (config first, status last).

Which runs may share a job is :mod:`.packing`'s question; training them is :mod:`.engine`'s.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from klppo_bench.config import RunConfig, actual_frames
from klppo_bench.harness.batched.checkpoint import Checkpointing, job_checkpoint_path
from klppo_bench.harness.batched.engine import train_batched
from klppo_bench.harness.batched.packing import check_batch
from klppo_bench.harness.provenance import provenance
from klppo_bench.harness.vector_step import stepper_name
from klppo_bench.labels import run_setting
from klppo_bench.store import RunDir
from klppo_bench.variants.identity import variant_provenance

__all__ = ["execute_batch"]


def execute_batch(cfgs: list[RunConfig], exp_dir: Path | str, progress: bool | None = None,
                  settings: list[str | None] | None = None, raise_errors: bool = False,
                  on_iteration: Callable[[RunConfig, dict], None] | None = None,
                  write: list[bool] | None = None, checkpoint_every: int | None = None,
                  keep_checkpoints: bool = False, checkpoints: bool = True) -> list[RunDir]:
    """Train the lanes of ``cfgs`` together; store each as :func:`execute_run` would.

    Each seed gets ``exp_dir/runs/<run_id>/`` (``RunDir.start`` / ``finish`` / ``fail``).
    A seed whose run is already ``done`` is not written again, so a killed batched job
    resumes at seed granularity. With ``write`` (one flag per config) exactly the flagged,
    not-done seeds are written but *every* seed is trained: the sweep uses it to resume a
    partly finished job with its original composition, since the batch size S changes float
    rounding. Without it, done seeds are left out of the batch. A seed that diverges is
    recorded ``failed`` and the others go on; an error that ends the whole batch is recorded
    on every seed being written (re-raised only when ``raise_errors``). Returns the run
    directories in the order of ``cfgs``. ``settings``: each run's setting label (a
    sweep's; default :func:`~klppo_bench.labels.run_setting`).

    Checkpoints (``checkpoints``): the job keeps one under ``exp_dir/checkpoints/`` every
    ``checkpoint_every`` iterations (default: about every 5 minutes), resumes from it when it
    is rerun, and deletes it when done unless ``keep_checkpoints``
    (:mod:`klppo_bench.harness.batched.checkpoint`). Each running run's ``status.json`` holds
    its progress (frames, latest return, ETA), updated every iteration.
    """
    torch.set_num_threads(1)
    check_batch(cfgs)
    runs = [RunDir(Path(exp_dir) / "runs" / c.run_id()) for c in cfgs]
    flags = write or [True] * len(cfgs)
    writing = [i for i, run in enumerate(runs) if flags[i] and run.state() != "done"]
    if not writing:
        return runs
    trained = list(range(len(cfgs))) if write is not None else writing
    batch = [cfgs[i] for i in trained]
    _start_runs(runs, cfgs, settings or [None] * len(cfgs), writing, batch)
    t0 = time.time()
    checkpoint = None
    if checkpoints:
        checkpoint = Checkpointing(job_checkpoint_path(exp_dir, [c.run_id() for c in batch]),
                                   every=checkpoint_every, keep=keep_checkpoints)
    total, per_iteration = actual_frames(batch[0]), batch[0].train.steps_per_iter

    def hook(k: int, row: dict) -> None:  # each written run's progress in its status.json
        if trained[k] in writing:
            resumed = checkpoint.resumed_iteration if checkpoint is not None else None
            runs[trained[k]].set_progress(row, total, t0, (resumed or 0) * per_iteration)
            if on_iteration is not None:
                on_iteration(batch[k], row)

    loss_calls: dict = {}
    try:
        results = train_batched(batch, progress=progress, on_iteration=hook,
                                checkpoint=checkpoint, loss_calls=loss_calls)
    except Exception as err:  # recorded on every seed being written, not lost
        for i in writing:
            runs[i].fail(err, traceback=traceback.format_exc(limit=8),
                         seconds=time.time() - t0)
        if raise_errors:
            raise
        return runs
    result_of = dict(zip(trained, results))
    _finish_runs(runs, writing, result_of, _timing(t0, len(batch), loss_calls, checkpoint))
    if checkpoint is not None and not checkpoint.keep:
        checkpoint.remove()  # only once every lane's record is stored
    failures = [result_of[i] for i in writing if isinstance(result_of[i], Exception)]
    if raise_errors and failures:
        raise failures[0]
    return runs


def _start_runs(runs: list[RunDir], cfgs: list[RunConfig], settings: list[str | None],
                writing: list[int], batch: list[RunConfig]) -> None:
    """Write the config and ``running`` status of each run in ``writing``, with the job's
    provenance (which lanes trained together)."""
    prov = provenance(cfgs[0].device)
    prov.update(engine="batched", batch_seeds=[c.seed for c in batch],
                batch_runs=[c.run_id() for c in batch],
                env_stepper=stepper_name(cfgs[0].env),
                variant=variant_provenance(cfgs[0].variant, cfgs[0].plugins))
    for i in writing:
        runs[i].start(cfgs[i].to_dict(), setting=settings[i] or run_setting(cfgs[i]),
                      provenance=prov)


def _timing(t0: float, lanes: int, loss_calls: dict, checkpoint: Checkpointing | None) -> dict:
    """What each lane's record says about the job's cost. ``seconds`` is each seed's share of
    the process time, so wall-clock cost per run compares across engines; the whole batch's
    time is kept as ``batch_seconds``."""
    batch_seconds = time.time() - t0
    timing = {"seconds": batch_seconds / lanes, "batch_seconds": batch_seconds,
              "loss_calls": loss_calls}
    if checkpoint is not None:
        timing["resumed_from_iteration"] = checkpoint.resumed_iteration
    return timing


def _finish_runs(runs: list[RunDir], writing: list[int], result_of: dict, timing: dict) -> None:
    """Store each written lane's result: its records and summary, or why it failed."""
    for i in writing:
        result = result_of[i]
        if isinstance(result, Exception):
            runs[i].fail(f"{type(result).__name__}: {result}", traceback=None, **timing)
        else:
            runs[i].finish({"metrics": result.metrics, "episodes": result.episodes,
                            "evals": result.evals}, result.summary, **timing)

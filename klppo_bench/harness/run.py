"""Execute one run into its run directory: config first, status last."""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import torch
from typing import Callable

from klppo_bench.config import RunConfig, actual_frames
from klppo_bench.harness.provenance import provenance
from klppo_bench.harness.reference import train
from klppo_bench.labels import run_setting
from klppo_bench.store import RunDir
from klppo_bench.variants.identity import variant_provenance


def execute_run(cfg: RunConfig, exp_dir: Path | str, progress: bool | None = None,
                setting: str | None = None, raise_errors: bool = False,
                on_iteration: Callable[[dict], None] | None = None) -> RunDir:
    """Train ``cfg`` and store it under ``exp_dir/runs/<run_id>``.

    A failure (divergence, exception) is recorded as ``failed`` with its reason; the
    exception is re-raised only when ``raise_errors``. ``on_iteration`` is passed to
    :func:`train` (live progress for sweeps). ``setting`` is the run's setting label (a
    sweep's; default :func:`~klppo_bench.labels.run_setting`). Returns the run directory.
    """
    torch.set_num_threads(1)  # one thread per run: faster on a shared machine, and it fixes the bits
    run = RunDir(Path(exp_dir) / "runs" / cfg.run_id())
    # where the variant came from and its code hash, as this process loaded it
    prov = dict(provenance(cfg.device), engine="reference",
                variant=variant_provenance(cfg.variant, cfg.plugins))
    run.start(cfg.to_dict(), setting=setting or run_setting(cfg), provenance=prov)
    t0 = time.time()
    total = actual_frames(cfg)

    def hook(row: dict) -> None:  # the run's progress in its status.json, every iteration
        run.set_progress(row, total, t0)
        if on_iteration is not None:
            on_iteration(row)

    try:
        result = train(cfg, progress=progress, on_iteration=hook)
    except Exception as err:  # recorded, not lost: the sweep reports it
        run.fail(err, traceback=traceback.format_exc(limit=8),
                 seconds=time.time() - t0)
        if raise_errors:
            raise
        return run
    run.finish({"metrics": result.metrics, "episodes": result.episodes, "evals": result.evals},
               result.summary, seconds=time.time() - t0)
    return run

"""How far a batched seed drifts from its reference run over a whole run (not a test).

For each variant and seed, trains the run on the reference engine (torchrl's modules) and on
the batched engine (as lane 0 of a job with ``--lanes`` seeds, as a sweep would), then
compares them iteration by iteration: training-episode return, the closed-form KL of the
update (``kl_batch``) and beta. Prints and writes (``--out``):

* ``<out>``: per iteration, both engines' values and their relative difference;
* ``<out stem>.summary.csv``: per run, the first iteration whose relative difference exceeds
  1e-6, 1e-3 and 1e-1, whether the first iteration's episodes are bit-identical, and the
  final scores of both engines.

    python benchmarks/engine_drift.py --frames 204800 --variants clip klpen-adaptive --seeds 0
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = ("episode_return", "kl_batch", "beta")
THRESHOLDS = (1e-6, 1e-3, 1e-1)


def _rel(a: pd.Series, b: pd.Series) -> pd.Series:
    scale = np.maximum(np.abs(a), np.abs(b)).replace(0, 1.0)
    return (a - b).abs() / scale


def compare(variant: str, seed: int, frames: int, lanes: int, env: str) -> tuple[pd.DataFrame, dict]:
    import torch

    from klppo_bench.config import build_run_config
    from klppo_bench.harness.batched import train_batched
    from klppo_bench.harness.reference import train

    torch.set_num_threads(1)
    overrides = {"eval.every": 0, "eval.episodes": 1}
    cfgs = [build_run_config(variant, env, seed + k, frames=frames, overrides=overrides)
            for k in range(lanes)]
    ref = train(cfgs[0], progress=False)
    bat = train_batched(cfgs, progress=False)[0]
    rows = pd.DataFrame({"iteration": ref.metrics["iteration"], "frames": ref.metrics["frames"]})
    summary = {"variant": variant, "seed": seed, "lanes": lanes, "frames": frames}
    for col in COLUMNS:
        a, b = ref.metrics[col], bat.metrics[col]
        rows[f"{col}_reference"], rows[f"{col}_batched"] = a, b
        rel = _rel(a, b) if not (a.isna().all() and b.isna().all()) else pd.Series(0.0, index=a.index)
        rows[f"{col}_rel_diff"] = rel
        for t in THRESHOLDS:
            over = rows["iteration"][rel.fillna(0) > t]
            summary[f"{col}_first_iter_over_{t:g}"] = int(over.iloc[0]) if len(over) else math.nan
    first = ref.episodes[ref.episodes.frames <= cfgs[0].train.steps_per_iter]
    summary["first_iteration_episodes_identical"] = bool(
        bat.episodes.iloc[:len(first)].reset_index(drop=True).equals(first.reset_index(drop=True)))
    summary["final_score_reference"] = ref.summary["final_score"]
    summary["final_score_batched"] = bat.summary["final_score"]
    rows.insert(0, "seed", seed)
    rows.insert(0, "variant", variant)
    return rows, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="Hopper")
    parser.add_argument("--frames", type=int, default=204800)
    parser.add_argument("--variants", nargs="*", default=["clip", "klpen-adaptive"])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--lanes", type=int, default=2, help="lanes of the batched job")
    parser.add_argument("--out", default="results/perf/engine_drift.csv")
    args = parser.parse_args()
    per_iter, summaries = [], []
    for variant in args.variants:
        for seed in args.seeds:
            rows, summary = compare(variant, seed, args.frames, args.lanes, args.env)
            per_iter.append(rows)
            summaries.append(summary)
            print(pd.Series(summary).to_string(), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.concat(per_iter).to_csv(out, index=False)
    pd.DataFrame(summaries).to_csv(out.with_suffix(".summary.csv"), index=False)


if __name__ == "__main__":
    main()

"""Does the seed-batched engine learn like the torchrl reference engine? (issue 5)

Takes two experiments that ran the same spec (``experiments/engine_agreement.yaml``), one per
engine, and compares their final scores per variant with rliable, through the same functions
the report uses (:mod:`klppo_bench.stats.aggregate`): the IQM with its 95% stratified-bootstrap
CI per engine, and the probability that a batched run beats a reference run, P(batched >
reference), with its CI. The engines agree when the probability of improvement lies within
[0.35, 0.65] and the IQM CIs overlap. Both final scores are compared: ``final_score`` (mean
return of the last 100 training episodes, the paper's measure and the report's) and
``final_eval_return`` (the deterministic evaluation at the last frame).

    klppo-bench sweep experiments/engine_agreement.yaml --engine reference --results results/engine-reference
    klppo-bench sweep experiments/engine_agreement.yaml --engine batched --results results/engine-batched
    python benchmarks/engine_agreement.py results/engine-reference/engine_agreement \\
        results/engine-batched/engine_agreement

Writes the table to ``--out`` (CSV) and prints it. Exit status 1 if some variant disagrees.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from klppo_bench.stats.aggregate import aggregate_table, probability_of_improvement
from klppo_bench.store import RunDir, run_index

SCORES = ("final_score", "final_eval_return")
POI_BAND = (0.35, 0.65)


def final_scores(exp_dir: Path, engine: str) -> pd.DataFrame:
    """One row per done run: env, variant, seed and its final scores; checks the engine."""
    index = run_index(exp_dir, states=("done",))
    if index.empty:
        raise SystemExit(f"{exp_dir}: no finished runs")
    rows = []
    for row in index.itertuples():
        run = RunDir(Path(row.path))
        ran = (run.status().get("provenance") or {}).get("engine", "an unrecorded")
        if ran != engine:
            raise SystemExit(f"{row.path}: ran on the {ran} engine, expected {engine}")
        summary = run.summary()
        rows.append({"env": row.env, "variant": row.variant, "seed": row.seed,
                     **{k: summary[k] for k in SCORES}})
    return pd.DataFrame(rows)


def compare(reference: pd.DataFrame, batched: pd.DataFrame, reps: int,
            random_state: int) -> pd.DataFrame:
    out = []
    for (env, variant), ref in reference.groupby(["env", "variant"]):
        bat = batched[(batched.env == env) & (batched.variant == variant)]
        if bat.empty:
            continue
        common = sorted(set(ref.seed) & set(bat.seed))
        ref, bat = ref[ref.seed.isin(common)], bat[bat.seed.isin(common)]
        for score in SCORES:
            sets = {"reference": {env: ref[score].to_numpy()},
                    "batched": {env: bat[score].to_numpy()}}
            agg = aggregate_table(sets, reps, random_state)
            iqm = agg[agg.metric == "IQM"].set_index("setting")
            p, p_low, p_high, _ = probability_of_improvement(sets["batched"],
                                                             sets["reference"], reps,
                                                             random_state)
            overlap = bool(iqm.loc["batched", "ci_low"] <= iqm.loc["reference", "ci_high"]
                           and iqm.loc["reference", "ci_low"] <= iqm.loc["batched", "ci_high"])
            out.append({
                "env": env, "variant": variant, "score": score, "seeds": len(common),
                "iqm_reference": iqm.loc["reference", "value"],
                "iqm_reference_ci": (iqm.loc["reference", "ci_low"],
                                     iqm.loc["reference", "ci_high"]),
                "iqm_batched": iqm.loc["batched", "value"],
                "iqm_batched_ci": (iqm.loc["batched", "ci_low"], iqm.loc["batched", "ci_high"]),
                "poi_batched_gt_reference": p, "poi_ci": (p_low, p_high),
                "iqm_cis_overlap": overlap,
                "poi_in_band": bool(POI_BAND[0] <= p <= POI_BAND[1]),
            })
    df = pd.DataFrame(out)
    df["agree"] = df["iqm_cis_overlap"] & df["poi_in_band"]
    return df


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, help="experiment directory (reference engine)")
    parser.add_argument("batched", type=Path, help="experiment directory (batched engine)")
    parser.add_argument("--reps", type=int, default=50_000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap random state")
    parser.add_argument("--out", type=Path, default=Path("results/perf/engine_agreement.csv"))
    args = parser.parse_args(argv)
    df = compare(final_scores(args.reference, "reference"), final_scores(args.batched, "batched"),
                 args.reps, args.seed)
    if df.empty:
        raise SystemExit("no (env, variant) has finished runs in both experiments")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)

    def ci(pair) -> str:
        return f"[{pair[0]:.3g}, {pair[1]:.3g}]"

    show = pd.DataFrame({
        "env": df.env, "variant": df.variant, "score": df.score, "seeds": df.seeds,
        "IQM reference [95% CI]": [f"{v:.1f} {ci(c)}" for v, c in zip(df.iqm_reference,
                                                                      df.iqm_reference_ci)],
        "IQM batched [95% CI]": [f"{v:.1f} {ci(c)}" for v, c in zip(df.iqm_batched,
                                                                  df.iqm_batched_ci)],
        "P(batched > reference) [95% CI]": [f"{v:.2f} {ci(c)}" for v, c in
                                            zip(df.poi_batched_gt_reference, df.poi_ci)],
        "agree": df.agree,
    })
    print(show.to_string(index=False))
    print(f"agreement: PoI within {list(POI_BAND)} and IQM CIs overlapping; "
          f"{int(df.agree.sum())} of {len(df)} rows agree. written: {args.out}")
    return 0 if bool(np.all(df.agree)) else 1


if __name__ == "__main__":
    sys.exit(main())

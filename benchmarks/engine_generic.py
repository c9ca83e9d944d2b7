"""The batched engine running each variant's own loss module, against the engine it replaced.

Issue 10's speed contract, measured side by side in one benchmark run (not a test):

* ``generic <variant> S=k`` -- this checkout's :func:`train_batched` (the variant's own loss
  module under ``torch.func.vmap``), k seeds in one process;
* ``previous <variant> S=k`` -- the same call in an older checkout (``--baseline``, a git
  worktree of the commit before the generic engine: it re-implemented torchrl's PPO losses by
  hand), for ``clip`` and ``klpen-adaptive``;
* ``dual-clip`` -- the Dual-Clip PPO example, one ``@surrogate`` formula
  (``examples/dual_clip.py``), on the generic engine; ``--variants`` adds others:
  ``dual-clip-subclass`` (the same objective as a ``ClipPPOLoss`` subclass overriding
  ``forward``, ``tests/plugins/dual_clip_subclass.py``), ``rollback``, ``clip-higher`` (the
  other surrogate examples) or any built-in; each non-``clip`` row gets ``vs_clip``;
* ``plain-torch PPO`` -- :mod:`plain_ppo`, one seed (the yardstick the README ratios use).

Every measurement is its own fresh process (one torch thread, evaluation off); the rows are
interleaved and repeated (``--repeats``) and the table gives medians of env-steps/s (all seeds'
frames / the process's own timer, set-up included). Written to ``--out``.

    git worktree add /tmp/previous <commit>
    python benchmarks/engine_generic.py --baseline /tmp/previous [--seeds 5 10] [--frames 10240]
    python benchmarks/engine_generic.py --variants clip dual-clip dual-clip-subclass --seeds 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PLUGINS = {"dual-clip": ROOT / "examples" / "dual_clip.py",
           "rollback": ROOT / "examples" / "rollback.py",
           "clip-higher": ROOT / "examples" / "clip_higher.py",
           "dual-clip-subclass": ROOT / "tests" / "plugins" / "dual_clip_subclass.py"}
"""Where the variants that are not built-ins come from."""
BASELINE_VARIANTS = ("clip", "klpen-adaptive")
"""The variants the previous engine (``--baseline``) implemented."""


def _child(args) -> dict:
    import torch

    torch.set_num_threads(1)
    if args.child == "plain":
        sys.path.insert(0, str(HERE))
        from plain_ppo import run_plain_ppo

        t0 = time.perf_counter()
        frames = run_plain_ppo(args.env, args.frames)["frames"]
        return {"frames": frames, "seconds": time.perf_counter() - t0}
    from klppo_bench.config import build_run_config
    from klppo_bench.harness.batched import train_batched

    plugins = (str(PLUGINS[args.child]),) if args.child in PLUGINS else ()
    overrides = {"eval.every": 0, "eval.episodes": 1}
    cfgs = [build_run_config(args.child, args.env, s, frames=args.frames, overrides=overrides,
                             plugins=plugins) for s in range(args.n)]
    t0 = time.perf_counter()
    results = train_batched(cfgs, progress=False)
    seconds = time.perf_counter() - t0
    return {"frames": sum(int(r.summary["frames"]) for r in results), "seconds": seconds}


def _measure(src: Path, child: str, n: int, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", child, "--n", str(n),
           "--env", args.env, "--frames", str(args.frames)]
    env = {"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=src)
    if out.returncode:
        raise RuntimeError(f"{child} S={n} in {src} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=None, help="checkout of the previous engine")
    parser.add_argument("--env", default="Hopper")
    parser.add_argument("--frames", type=int, default=10240, help="frames per seed")
    parser.add_argument("--seeds", type=int, nargs="*", default=[5, 10])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-plain", action="store_true",
                        help="leave out the plain-torch row (and the vs_plain column)")
    parser.add_argument("--variants", nargs="+", default=["clip", "klpen-adaptive", "dual-clip"],
                        help="rows of the generic engine (clip is always measured: the "
                             "others' vs_clip)")
    parser.add_argument("--out", default="results/perf/engine_generic.csv")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return
    variants = list(dict.fromkeys(["clip", *args.variants]))
    plan = [] if args.no_plain else [("plain-torch PPO", ROOT, "plain", 1)]
    for n in args.seeds:
        for variant in variants:
            plan.append((f"generic {variant} S={n}", ROOT, variant, n))
            if args.baseline and variant in BASELINE_VARIANTS:
                plan.append((f"previous {variant} S={n}", Path(args.baseline), variant, n))
    rows = []
    for rep in range(args.repeats):
        for label, src, child, n in plan:
            m = _measure(src, child, n, args)
            rows.append({"row": label, "repeat": rep, "sps": m["frames"] / m["seconds"]})
            print(f"repeat {rep}  {label:32}  {rows[-1]['sps']:8.0f} env-steps/s", flush=True)
    df = pd.DataFrame(rows)
    med = df.groupby("row", sort=False)["sps"].median().rename("median_sps").to_frame()
    if not args.no_plain:
        med["vs_plain"] = med["median_sps"] / float(med.loc["plain-torch PPO", "median_sps"])
    for n in args.seeds:
        for variant in variants:
            row, prev = f"generic {variant} S={n}", f"previous {variant} S={n}"
            if prev in med.index:
                med.loc[row, "vs_previous"] = med.loc[row, "median_sps"] / med.loc[prev,
                                                                                   "median_sps"]
            if variant != "clip":
                med.loc[row, "vs_clip"] = (med.loc[row, "median_sps"]
                                           / med.loc[f"generic clip S={n}", "median_sps"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    med.to_csv(args.out)
    df.to_csv(Path(args.out).with_suffix(".repeats.csv"), index=False)
    print(med.to_string(float_format=lambda x: f"{x:.3f}" if x < 10 else f"{x:.0f}"))


if __name__ == "__main__":
    main()

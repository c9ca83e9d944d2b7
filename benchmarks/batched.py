"""Seed-batched engine benchmark: total env-steps/s for S seeds per process.

Every measurement runs in its own fresh process (one torch thread) so that its peak RSS is
its own; in the same benchmark run it measures:

* ``raw gymnasium``            -- ``env.step`` with random actions (the ceiling per core);
* ``plain-torch PPO``          -- :mod:`plain_ppo`, one seed (the yardstick);
* ``reference engine``         -- :func:`klppo_bench.harness.reference.train`, one seed (torchrl);
* ``batched S=k``              -- :func:`klppo_bench.harness.batched.train_batched` with k seeds;
* ``2 x plain-torch``          -- two plain-torch loops at once (one per core);
* ``2 x batched S=k``          -- two batched processes at once (a 2-worker sweep of 2k seeds);
  this row and ``2 x plain-torch`` are interleaved and repeated (``--repeats``, medians);
* ``klppo-bench sweep``        -- the real 2-worker sweep command of 2k seeds, wall clock.

With ``--compare-steppers`` it measures only the environment steppers
(:mod:`klppo_bench.harness.vector_step`): gymnasium's ``SyncVectorEnv`` against the direct MuJoCo
stepper, each stepping alone (k sub-envs, random actions, ``--stepping-steps`` vector steps) and
inside ``batched S=k``, interleaved (the order alternating) and repeated ``--repeats`` times; it
prints the medians and the ratio of each repeat (measured one right after the other), by wall
clock and per CPU second of the process (``cpu_sps``: on a machine loaded by other work, the
steadier measure).

Total env-steps/s = all seeds' frames / the slowest process's own timer (setup included,
interpreter start-up not; the sweep row: the command's wall clock). Each row gets its ratio
to the single plain-torch loop, to raw stepping and to the median of the concurrent
plain-torch pairs; the table is printed and written to ``--out``. Not part of the test suite.

    python benchmarks/batched.py --env Hopper [--seeds 1 2 4 8 16 32] [--frames 10240]
    python benchmarks/batched.py --env Swimmer --compare-steppers --seeds 5 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
STEPPERS = {"gymnasium": "gymnasium", "direct": "mujoco-direct"}
"""``--stepper`` choice -> the stepper's name in provenance."""
sys.path.insert(0, str(HERE))


def _child(args) -> dict:
    """Run one measurement in this process; return frames, seconds and peak RSS."""
    import torch

    torch.set_num_threads(1)
    overrides = {"eval.every": 0, "eval.episodes": 1}
    from klppo_bench.harness import vector_step

    if args.stepper == "gymnasium":  # what make_stepper and the provenance then choose
        vector_step.fast_stepper_reason = lambda env_id: "benchmark: --stepper gymnasium"
    if args.child == "stepper":
        import numpy as np

        stepper = vector_step.make_stepper(args.env, args.n)
        stepper.reset(list(range(args.n)))
        rng = np.random.default_rng(0)
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(args.stepping_steps):
            stepper.step(rng.uniform(-1, 1, (args.n, stepper.action_dim)).astype(np.float32))
        frames = args.stepping_steps * args.n
    elif args.child == "raw":
        from throughput import raw_gym_sps

        steps = args.frames
        t0, cpu0 = time.perf_counter(), time.process_time()
        raw_gym_sps(args.env, steps)
        frames = steps
    elif args.child == "plain":
        from plain_ppo import run_plain_ppo

        t0, cpu0 = time.perf_counter(), time.process_time()
        frames = run_plain_ppo(args.env, args.frames)["frames"]
    elif args.child == "reference":
        from klppo_bench.config import build_run_config
        from klppo_bench.harness.reference import train

        cfg = build_run_config(args.variant, args.env, 0, frames=args.frames, overrides=overrides)
        t0, cpu0 = time.perf_counter(), time.process_time()
        frames = train(cfg, progress=False).summary["frames"]
    else:
        from klppo_bench.config import build_run_config
        from klppo_bench.harness.batched import train_batched

        cfgs = [build_run_config(args.variant, args.env, args.seed0 + s, frames=args.frames,
                                 overrides=overrides) for s in range(args.n)]
        t0, cpu0 = time.perf_counter(), time.process_time()
        results = train_batched(cfgs, progress=False)
        frames = sum(r.summary["frames"] for r in results if not isinstance(r, Exception))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"frames": frames, "seconds": seconds, "cpu_seconds": cpu_seconds, "rss_mb": rss_mb,
            "stepper": vector_step.stepper_name(args.env)}


def _spawn(kind: str, args, n: int = 1, seed0: int = 0, frames: int | None = None,
           stepper: str = "direct") -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--env", args.env,
           "--variant", args.variant, "--frames", str(frames or args.frames), "--n", str(n),
           "--seed0", str(seed0), "--stepper", stepper,
           "--stepping-steps", str(args.stepping_steps)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def _collect(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"benchmark child failed ({p.returncode}): {p.args}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def measure(name: str, kind: str, args, seeds: int = 1, processes: int = 1,
            frames: int | None = None, stepper: str = "direct") -> dict:
    """Start ``processes`` children at once (each ``seeds`` seeds) and time them together."""
    t0 = time.perf_counter()
    procs = [_spawn(kind, args, seeds, seed0=k * seeds, frames=frames, stepper=stepper)
             for k in range(processes)]
    results = _collect(procs)
    wall = time.perf_counter() - t0
    total = sum(r["frames"] for r in results)
    # the children's own timers exclude interpreter start-up; the slowest one sets the pace
    seconds = max(r["seconds"] for r in results)
    row = {"name": name, "seeds_per_process": seeds, "processes": processes,
           "frames_total": total, "seconds": seconds, "total_sps": total / seconds,
           "per_seed_sps": total / seconds / (seeds * processes) if kind != "raw" else total / seconds,
           "peak_rss_mb": max(r["rss_mb"] for r in results), "wall_with_startup": wall,
           "stepper": results[0]["stepper"],
           # the process's own CPU time: what a loaded machine disturbs least
           "cpu_sps": total / max(r["cpu_seconds"] for r in results)}
    print(f"  {name}: {row['total_sps']:,.0f} env-steps/s, {row['peak_rss_mb']:.0f} MB",
          file=sys.stderr, flush=True)
    return row


def measure_sweep(args, seeds: int, frames: int) -> dict:
    """The real thing: ``klppo-bench sweep`` of one config x ``seeds`` seeds, 2 workers, into
    a temporary results root (planning, worker processes, store writes and start-up included:
    frames / wall time of the whole command)."""
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "perf_sweep.yaml"
        spec.write_text(yaml.safe_dump({
            "name": "perf_sweep", "envs": [args.env], "seeds": seeds, "frames": frames,
            "variants": [{"name": args.variant}], "eval": {"every": 0, "episodes": 1}}))
        cmd = [sys.executable, "-m", "klppo_bench.cli", "sweep", str(spec), "--workers", "2",
               "--engine", "batched", "--results", str(Path(tmp) / "results")]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
    total = seeds * frames
    row = {"name": f"klppo-bench sweep, {seeds} seeds, 2 workers", "seeds_per_process":
           -(-seeds // 2), "processes": 2, "frames_total": total, "seconds": wall,
           "total_sps": total / wall, "per_seed_sps": total / wall / seeds,
           "peak_rss_mb": float("nan"), "wall_with_startup": wall}
    print(f"  {row['name']}: {row['total_sps']:,.0f} env-steps/s (wall clock, start-up "
          "included)", file=sys.stderr, flush=True)
    return row


def compare_steppers(args) -> pd.DataFrame:
    """Gymnasium's stepper against the direct one: stepping alone and ``batched S=k``, for
    each k in ``--seeds``, interleaved and repeated; each repeat's ratio is direct/gymnasium."""
    rows = []
    for k in range(args.repeats):
        order = ("gymnasium", "direct") if k % 2 == 0 else ("direct", "gymnasium")
        for n in args.seeds:
            for kind, label in (("stepper", f"stepping only, {n} sub-envs"),
                                ("batched", f"batched S={n}")):
                pair = {st: measure(f"{label}, {st}", kind, args, seeds=n, stepper=st)
                        for st in order}
                for st, row in pair.items():
                    row.update(name=label, repeat=k, requested=st)
                    if row["stepper"] != STEPPERS[st]:
                        raise RuntimeError(f"{args.env}: asked for {st}, ran {row['stepper']}")
                for col in ("total_sps", "cpu_sps"):
                    pair["direct"][f"vs_gymnasium_{col}"] = (pair["direct"][col]
                                                             / pair["gymnasium"][col])
                rows += [pair["gymnasium"], pair["direct"]]
    df = pd.DataFrame(rows)
    df["env"], df["variant"], df["frames_per_seed"] = args.env, args.variant, args.frames
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    from throughput import machine_note

    print(f"env-steps/s on {args.env}, {args.variant}, {args.frames} frames per seed, "
          f"{args.repeats} interleaved repeats ({machine_note()})")
    for name, g in df.groupby("name", sort=False):
        for col, what in (("total_sps", "wall clock"), ("cpu_sps", "per CPU second")):
            med = g.groupby("requested")[col].median()
            ratios = g[f"vs_gymnasium_{col}"].dropna()
            print(f"  {name}, {what}: gymnasium {med['gymnasium']:,.0f}, direct "
                  f"{med['direct']:,.0f}; direct/gymnasium per repeat "
                  f"{', '.join(f'{r:.2f}' for r in ratios)}, median {ratios.median():.2f}x")
    print(f"written: {out}")
    return df


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description="total env-steps/s of the seed-batched engine")
    parser.add_argument("--env", default="Hopper")
    parser.add_argument("--variant", default="clip")
    parser.add_argument("--frames", type=int, default=10240, help="frames per seed")
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32],
                        help="seeds per process to measure")
    parser.add_argument("--sweep-seeds", type=int, default=10,
                        help="seeds of the 2-worker sweep row (split over 2 processes)")
    parser.add_argument("--sweep-frames", type=int, default=20480,
                        help="frames per seed in the 2-worker rows (steady state, ~10 updates)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved repeats of the 2-worker comparison (median reported)")
    parser.add_argument("--no-reference", action="store_true", help="skip the torchrl engine row")
    parser.add_argument("--compare-steppers", action="store_true",
                        help="measure only gymnasium's stepper against the direct MuJoCo one")
    parser.add_argument("--stepping-steps", type=int, default=2000,
                        help="vector steps of the stepping-only rows of --compare-steppers")
    parser.add_argument("--out", default=None,
                        help="CSV written (default results/perf/batched.csv, or "
                        "results/perf/steppers_<env>.csv with --compare-steppers)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--seed0", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stepper", choices=sorted(STEPPERS), default="direct",
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from klppo_bench.config import resolve_env_id

    args.env = resolve_env_id(args.env)
    if args.child:
        print(json.dumps(_child(args)))
        return pd.DataFrame()
    if args.compare_steppers:
        args.out = args.out or f"results/perf/steppers_{args.env}.csv"
        return compare_steppers(args)
    args.out = args.out or "results/perf/batched.csv"

    import torch
    from throughput import machine_note

    torch.set_num_threads(1)  # as in every child, so the note says what the children ran with
    print(f"batched engine on {args.env} ({args.variant}, {args.frames} frames/seed): "
          f"{machine_note()}", file=sys.stderr)
    rows = [measure("raw gymnasium", "raw", args, frames=20_000),
            measure("plain-torch PPO", "plain", args)]
    if not args.no_reference:
        rows.append(measure(f"reference engine ({args.variant})", "reference", args))
    for n in args.seeds:
        rows.append(measure(f"batched S={n}", "batched", args, seeds=n))
    # the headline comparison: a 2-worker sweep against two concurrent plain-torch loops,
    # interleaved and repeated (this machine is noisy); every repeat is a row, ratios per pair
    half = max(1, args.sweep_seeds // 2)
    for k in range(args.repeats):
        pair = measure("2 x plain-torch (concurrent)", "plain", args, processes=2,
                       frames=args.sweep_frames)
        sweep = measure(f"2 x batched S={half} (concurrent)", "batched", args, seeds=half,
                        processes=2, frames=args.sweep_frames)
        for row in (pair, sweep):
            row["repeat"] = k
        sweep["vs_2x_plain"] = sweep["total_sps"] / pair["total_sps"]
        rows += [pair, sweep]
    rows.append(measure_sweep(args, 2 * half, args.sweep_frames))
    df = pd.DataFrame(rows)
    raw = df.loc[df.name == "raw gymnasium", "total_sps"].iloc[0]
    plain = df.loc[df.name == "plain-torch PPO", "total_sps"].iloc[0]
    df["vs_plain"] = df["total_sps"] / plain
    df["vs_raw"] = df["total_sps"] / raw
    pairs = df.loc[df.name == "2 x plain-torch (concurrent)", "total_sps"]
    single = df["repeat"].isna()
    df.loc[single, "vs_2x_plain"] = df.loc[single, "total_sps"] / pairs.median()
    df["env"], df["variant"] = args.env, args.variant
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    show = df.drop(columns=["env", "variant", "wall_with_startup"])
    show["repeat"] = show["repeat"].map(lambda r: "" if pd.isna(r) else str(int(r)))
    print(f"total env-steps/s on {args.env}, {args.variant}, {args.frames} frames per seed "
          f"({machine_note()})")
    print(show.to_string(index=False, float_format=lambda x: f"{x:,.2f}" if abs(x) < 10 else f"{x:,.0f}"))
    sweeps = df[df.name.str.startswith("2 x batched")]
    print(f"2-worker sweep of {2 * half} seeds vs 2 concurrent plain-torch loops, "
          f"{args.repeats} interleaved repeats: median {sweeps['total_sps'].median():,.0f} vs "
          f"{pairs.median():,.0f} env-steps/s; ratio per repeat "
          f"{', '.join(f'{r:.2f}' for r in sweeps['vs_2x_plain'])}, "
          f"median {sweeps['vs_2x_plain'].median():.2f}x")
    print(f"written: {out}")
    return df


if __name__ == "__main__":
    main()

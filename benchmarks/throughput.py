"""Throughput benchmark (``make perf``): env-steps per second of the training paths.

Measured in one process with one torch thread, each ``--repeats`` times, reported as the
median (min and max beside it):

* ``raw gymnasium``    -- ``env.step`` with random actions, resets included (the ceiling);
* ``torchrl env``      -- the harness's torchrl env (:func:`klppo_bench.harness.env.make_env`,
  transforms included) rolled out with random actions: what the wrapper costs;
* ``plain-torch PPO``  -- :mod:`plain_ppo`, a minimal PPO loop with the same hyperparameters;
* ``train <variant>``  -- a full :func:`klppo_bench.harness.reference.train` run of every registry
  variant (the reference engine), env-steps/s from its summary.

Every row gets its ratio to the plain-torch loop and to raw stepping. The table is printed
and written to ``--out`` as CSV. Not part of the test suite; on a shared machine the numbers
are noisy, which is why medians are reported.

    python benchmarks/throughput.py --env Hopper [--frames 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_ppo import run_plain_ppo  # noqa: E402


def raw_gym_sps(env_id: str, steps: int, seed: int = 0) -> float:
    """Steps/s of a bare gymnasium env (resets included) with uniformly random actions.

    The actions are drawn before the clock starts: ``action_space.sample()`` per step costs
    about as much as the MuJoCo step itself and would understate the env's ceiling.
    """
    import gymnasium as gym
    import numpy as np

    env = gym.make(env_id)
    space = env.action_space
    actions = np.random.default_rng(seed).uniform(space.low, space.high,
                                                  size=(steps, *space.shape))
    env.reset(seed=seed)
    start = time.perf_counter()
    for action in actions:
        _, _, term, trunc, _ = env.step(action)
        if term or trunc:
            env.reset()
    sps = steps / (time.perf_counter() - start)
    env.close()
    return sps


def torchrl_env_sps(env_id: str, steps: int, seed: int = 0) -> float:
    """Steps/s of the harness's torchrl env (wrapper + transforms), random actions."""
    from klppo_bench.harness.env import make_env

    env = make_env(env_id, seed)
    env.rollout(10, break_when_any_done=False)  # warm-up: lazy init of the transforms
    start = time.perf_counter()
    env.rollout(steps, break_when_any_done=False)
    sps = steps / (time.perf_counter() - start)
    env.close()
    return sps


def train_sps(variant: str, env_id: str, frames: int, seed: int = 0) -> float:
    """Env-steps/s of one full reference-engine run (its summary's ``sps``)."""
    from klppo_bench.config import build_run_config
    from klppo_bench.harness.reference import train

    cfg = build_run_config(variant, env_id, seed, frames=frames,
                           overrides={"eval.every": 0, "eval.episodes": 1})
    return float(train(cfg, progress=False).summary["sps"])


def measure(name: str, fn, repeats: int, **info) -> dict:
    values = [fn() for _ in range(repeats)]
    print(f"  {name}: " + ", ".join(f"{v:,.0f}" for v in values), file=sys.stderr, flush=True)
    return {"name": name, "sps": statistics.median(values), "min": min(values),
            "max": max(values), "repeats": repeats, **info}


def add_ratios(rows: list[dict], plain: float, raw: float) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    df["vs_plain"] = df["sps"] / plain
    df["vs_raw"] = df["sps"] / raw
    return df


def print_table(df: pd.DataFrame, title: str) -> None:
    print(title)
    print(df.to_string(index=False, float_format=lambda x: f"{x:,.2f}" if abs(x) < 10 else f"{x:,.0f}"))


def machine_note() -> str:
    load = os.getloadavg()
    return (f"cpus={os.cpu_count()} load_avg(1/5/15min)={load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} "
            f"torch_threads={torch.get_num_threads()} torch={torch.__version__}")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description="env-steps/s of raw stepping, plain PPO and "
                                     "every registry variant's full run")
    parser.add_argument("--env", default="Hopper", help="gymnasium id or short name (Hopper)")
    parser.add_argument("--frames", type=int, default=4096, help="frames per training run")
    parser.add_argument("--raw-steps", type=int, default=20_000, help="steps of raw stepping")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=None, help="default: all registered")
    parser.add_argument("--out", default="results/perf/throughput.csv")
    args = parser.parse_args(argv)

    from klppo_bench.config import resolve_env_id
    from klppo_bench.variants import all_variants

    torch.set_num_threads(1)
    env_id = resolve_env_id(args.env)
    variants = args.variants or list(all_variants())
    print(f"throughput on {env_id}: {machine_note()}", file=sys.stderr)
    rows = [
        measure("raw gymnasium", lambda: raw_gym_sps(env_id, args.raw_steps), args.repeats,
                kind="env", frames=args.raw_steps),
        measure("torchrl env", lambda: torchrl_env_sps(env_id, args.raw_steps // 4),
                args.repeats, kind="env", frames=args.raw_steps // 4),
        measure("plain-torch PPO", lambda: run_plain_ppo(env_id, args.frames)["sps"],
                args.repeats, kind="train", frames=args.frames),
    ]
    for name in variants:
        rows.append(measure(f"train {name}", lambda n=name: train_sps(n, env_id, args.frames),
                            args.repeats, kind="train", frames=args.frames))
    df = add_ratios(rows, plain=rows[2]["sps"], raw=rows[0]["sps"])
    df["env"] = env_id
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    print_table(df.drop(columns=["env"]), f"env-steps/s on {env_id} (median of {args.repeats}; "
                f"{machine_note()})")
    print(f"written: {out}")
    return df


if __name__ == "__main__":
    main()

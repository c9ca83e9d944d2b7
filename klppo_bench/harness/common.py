"""What both engines share: the run record (its tables and summary, one metrics row per
iteration), the step-size schedule, the evaluation cadence and the evaluation seeds.

The reference engine (:mod:`klppo_bench.harness.reference`) and the batched engine
(:mod:`klppo_bench.harness.batched`) build their records only through these functions, so the
store cannot tell their runs apart by schema.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from klppo_bench.config import RunConfig
from klppo_bench.variants.outputs import EXTRA_PREFIX

EVAL_SEED_OFFSET = 1_000_003


@dataclass
class RunResult:
    """Everything a run produces; the store writes it to disk."""

    metrics: pd.DataFrame
    """One row per iteration."""
    episodes: pd.DataFrame
    """One row per finished training episode (frames at its end, return, length)."""
    evals: pd.DataFrame
    """One row per deterministic evaluation episode."""
    summary: dict = field(default_factory=dict)

    @classmethod
    def build(cls, cfg: RunConfig, rows: list[dict], episodes: list[tuple], evals: list[tuple],
              iterations: int, wall: float, final_beta: float | None) -> "RunResult":
        """Tables and summary from a run's rows; the final score is defined here, once."""
        metrics = pd.DataFrame(rows)
        episodes_df = pd.DataFrame(episodes, columns=["frames", "return", "length"])
        evals_df = pd.DataFrame(evals, columns=["frames", "episode", "return", "length"])
        window = episodes_df["return"].tail(cfg.eval.final_window)
        frames = int(metrics["frames"].iloc[-1])
        summary = {
            "final_score": float(window.mean()) if len(window) else math.nan,
            "final_score_episodes": int(len(window)),
            "final_eval_return": float(evals_df[evals_df.frames == frames]["return"].mean()),
            "frames": frames,
            "iterations": iterations,
            "episodes": int(len(episodes_df)),
            "wall_seconds": wall,
            "sps": frames / wall,
            "final_beta": final_beta,
        }
        return cls(metrics, episodes_df, evals_df, summary)


def set_lr(optim: torch.optim.Optimizer, tc, it: int, iterations: int) -> None:
    """Iteration ``it``'s step size: linearly annealed to 0 over the run if ``anneal_lr``.

    Each parameter group anneals from its own ``base_lr`` (the batched engine's lanes may
    differ in ``train.lr``), ``tc.lr`` where a group has none.
    """
    if tc.anneal_lr:
        for group in optim.param_groups:
            group["lr"] = group.get("base_lr", tc.lr) * (1.0 - it / iterations)


def next_eval_frame(frames: int, every: int) -> float:
    """The first multiple of ``every`` after ``frames`` (``inf`` if ``every`` is 0: the last
    iteration evaluates anyway)."""
    return (frames // every + 1) * every if every else math.inf


def iteration_row(it: int, frames: int, new_frames: int, episodes: list[tuple],
                  losses: dict[str, float], *, kl_batch: float, kl_estimate: float,
                  kl_estimate_err_std: float, beta: float, entropy: float, lr: float,
                  update_seconds: float, wall_seconds: float) -> dict:
    """One iteration's metrics row, identical in both engines (the store's schema).

    ``episodes`` holds (frames at end, return, length) of every training episode so far;
    ``losses`` the iteration's mean of each loss output (a key the loss lacks is NaN), by
    metrics column; a loss module's extra outputs (``extra/<key>``,
    :mod:`klppo_bench.variants.outputs`) follow the fixed columns.
    """
    finished = [e for e in episodes if e[0] > frames - new_frames]
    nan = math.nan
    return {
        "iteration": it,
        "frames": frames,
        "episodes": len(finished),
        "episode_return": float(np.mean([e[1] for e in finished])) if finished else nan,
        "episode_length": float(np.mean([e[2] for e in finished])) if finished else nan,
        "loss_objective": losses["loss_objective"],
        "loss_critic": losses.get("loss_critic", nan),
        "kl": losses.get("kl", nan),
        "kl_batch": kl_batch,
        "kl_estimate": kl_estimate,
        "kl_estimate_err_std": kl_estimate_err_std,
        "kl_approx": losses.get("kl_approx", nan),
        "beta": beta,
        "entropy": entropy,
        "clip_fraction": losses.get("clip_fraction", nan),
        "explained_variance": losses.get("explained_variance", nan),
        "grad_norm": losses["grad_norm"],
        "lr": lr,
        "update_seconds": update_seconds,
        "wall_seconds": wall_seconds,
        "sps": frames / wall_seconds,
        "eval_return": nan,
        **{k: v for k, v in losses.items() if k.startswith(EXTRA_PREFIX)},
    }


def max_episode_steps(env_id: str) -> int:
    import gymnasium as gym

    return gym.spec(env_id).max_episode_steps or 10_000

"""One seeded PPO training run on torchrl parts (the reference engine).

Read top to bottom: seed, build env / models / loss / GAE / collector, then per iteration
collect ``steps_per_iter`` frames, compute GAE once, run ``epochs`` passes of shuffled
minibatches through the variant's loss, let the beta schedule act, log diagnostics, and
evaluate the deterministic policy now and then. The variant decides the loss and the beta
schedule; nothing here branches on a variant's name.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torchrl.collectors import Collector
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives.value import GAE

from klppo_bench.config import RunConfig
from klppo_bench.errors import DivergenceError
from klppo_bench.harness.env import make_env, sync_obs_stats
from klppo_bench.harness.models import build_models
from klppo_bench.variants import get_variant, load_plugins
from klppo_bench.variants.distributions import joint_normal_kl

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
    """Iteration ``it``'s step size: linearly annealed to 0 over the run if ``anneal_lr``."""
    if tc.anneal_lr:
        for group in optim.param_groups:
            group["lr"] = tc.lr * (1.0 - it / iterations)


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
    ``losses`` the iteration's mean of each loss output (a key the loss lacks is NaN).
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
    }


def seed_everything(seed: int) -> None:
    """One seed fixes every random stream of the run; one torch thread fixes the bits."""
    torch.set_num_threads(1)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loss_kl_estimate(loss, batch) -> torch.Tensor:
    """Per-sample KL(old || new) as the loss itself estimates it (closed form or Monte-Carlo).

    ``KLPENPPOLoss.forward`` also adapts its ``beta`` buffer; the value is restored so this
    measurement never moves beta.
    """
    beta = loss.beta.clone() if hasattr(loss, "beta") else None
    out = loss(batch)
    if beta is not None:
        loss.beta.copy_(beta)
    return out["kl"].reshape(-1)


def max_episode_steps(env_id: str) -> int:
    import gymnasium as gym

    return gym.spec(env_id).max_episode_steps or 10_000


def evaluate(eval_env, train_env, policy, episodes: int, max_steps: int) -> list[tuple]:
    """Deterministic returns (the Gaussian mean) with frozen training statistics."""
    sync_obs_stats(train_env, eval_env)
    out = []
    with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
        for _ in range(episodes):
            td = eval_env.rollout(max_steps, policy, break_when_any_done=True,
                                  auto_cast_to_device=True)
            out.append((float(td["next", "reward"].sum()), int(td.shape[-1])))
    return out


def _finished_episodes(data, frames_before: int, num_envs: int) -> list[tuple]:
    """(frames at episode end, return, length) of each episode that ended in ``data``."""
    done = data["next", "done"].squeeze(-1)
    if done.ndim == 1:
        done, ret, length = done[None], data["next", "episode_reward"][None], data["next", "step_count"][None]
    else:
        ret, length = data["next", "episode_reward"], data["next", "step_count"]
    env_idx, t_idx = torch.nonzero(done, as_tuple=True)
    rows = [
        (frames_before + (int(t) + 1) * num_envs, float(ret[e, t, 0]), int(length[e, t, 0]))
        for e, t in zip(env_idx.tolist(), t_idx.tolist())
    ]
    return sorted(rows, key=lambda r: r[0])


def train(cfg: RunConfig, progress: bool | None = None,
          on_iteration: Callable[[dict], None] | None = None) -> RunResult:
    """Train ``cfg.variant`` on ``cfg.env`` from ``cfg.seed``; raise on divergence.

    Args:
        progress: show a tqdm bar (``None``: only when stderr is a terminal).
        on_iteration: called with each iteration's metrics row.

    Raises:
        DivergenceError: a loss or a gradient became non-finite.
    """
    load_plugins(cfg.plugins)
    variant = get_variant(cfg.variant)
    tc, device = cfg.train, torch.device(cfg.device)
    seed_everything(cfg.seed)

    env = make_env(cfg.env, cfg.seed, tc.num_envs, tc.obs_norm, tc.obs_clip)
    eval_env = make_env(cfg.env, cfg.seed + EVAL_SEED_OFFSET, 1, tc.obs_norm, tc.obs_clip)
    obs_dim = env.observation_spec["observation"].shape[-1]
    action_dim = env.action_spec.shape[-1]
    models = build_models(obs_dim, action_dim, cfg.model, variant.distribution_class, device)
    loss = variant.build_loss(models.loss_actor, models.loss_critic, cfg.loss)
    beta_schedule = variant.beta_schedule(cfg.loss)
    gae = GAE(gamma=tc.gamma, lmbda=tc.lmbda, value_network=models.value, average_gae=False,
              device=device)
    params = [p for p in models.modules.parameters()]
    optim = torch.optim.Adam(params, lr=tc.lr)
    perm_gen = torch.Generator().manual_seed(cfg.seed)

    iterations = math.ceil(cfg.frames / tc.steps_per_iter)
    collector = Collector(
        env, models.policy, frames_per_batch=tc.steps_per_iter,
        total_frames=iterations * tc.steps_per_iter, env_device="cpu",
        policy_device=device, storing_device=device,
        exploration_type=ExplorationType.RANDOM, auto_register_policy_transforms=False,
    )
    eval_max_steps = max_episode_steps(cfg.env)
    rows, episodes, evals = [], [], []
    frames, next_eval = 0, next_eval_frame(0, cfg.eval.every)
    start = time.perf_counter()

    from tqdm.auto import tqdm

    bar = tqdm(total=iterations * tc.steps_per_iter, unit="frame", dynamic_ncols=True,
               disable=None if progress is None else not progress,
               desc=f"{cfg.variant} {cfg.env} s{cfg.seed}", leave=False)
    try:
        for it, data in enumerate(collector):
            t_iter = time.perf_counter()
            n_new = data.numel()
            episodes += _finished_episodes(data, frames, tc.num_envs)
            frames += n_new
            with torch.no_grad():
                gae(data)
            flat = data.reshape(-1)
            set_lr(optim, tc, it, iterations)
            stats: dict[str, list[float]] = {}
            for _ in range(tc.epochs):
                perm = torch.randperm(flat.numel(), generator=perm_gen).to(device)
                for idx in perm.split(tc.minibatch_size):
                    out = loss(flat[idx])
                    total = sum(v for k, v in out.items() if k.startswith("loss_"))
                    if not torch.isfinite(total):
                        bad = {k: float(v.mean()) for k, v in out.items() if k.startswith("loss_")}
                        raise DivergenceError(
                            f"non-finite loss at iteration {it} (frames {frames}): {bad}"
                        )
                    optim.zero_grad(set_to_none=True)
                    total.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        params, tc.max_grad_norm if tc.max_grad_norm > 0 else math.inf
                    )
                    if not torch.isfinite(grad_norm):
                        raise DivergenceError(
                            f"non-finite gradient at iteration {it} (frames {frames})"
                        )
                    optim.step()
                    for key in ("loss_objective", "loss_critic", "kl", "kl_approx",
                                "clip_fraction", "explained_variance"):
                        if key in out.keys():
                            stats.setdefault(key, []).append(float(out[key].detach().mean()))
                    stats.setdefault("grad_norm", []).append(float(grad_norm))
            with torch.no_grad():
                td = flat.select("observation").clone()
                dist = models.policy.get_dist(td)
                kl_batch = joint_normal_kl(flat["loc"], flat["scale"], td["loc"], td["scale"])
                entropy = dist.entropy().mean()
                kl_estimate = kl_estimate_err = math.nan
                if variant.kl_estimator != "none":
                    kl_samples = loss_kl_estimate(loss, flat)
                    kl_estimate = float(kl_samples.mean())
                    kl_estimate_err = float((kl_samples - kl_batch).std())
            beta_schedule.after_iteration(loss, kl_estimate, cfg.loss)
            now = time.perf_counter()
            row = iteration_row(
                it, frames, n_new, episodes, {k: float(np.mean(v)) for k, v in stats.items()},
                kl_batch=float(kl_batch.mean()), kl_estimate=kl_estimate,
                kl_estimate_err_std=kl_estimate_err,
                beta=float(loss.beta) if hasattr(loss, "beta") else math.nan,
                entropy=float(entropy), lr=optim.param_groups[0]["lr"],
                update_seconds=now - t_iter, wall_seconds=now - start)
            if frames >= next_eval or it == iterations - 1:
                for k, (ret, length) in enumerate(
                    evaluate(eval_env, env, models.policy, cfg.eval.episodes, eval_max_steps)
                ):
                    evals.append((frames, k, ret, length))
                next_eval = next_eval_frame(frames, cfg.eval.every)
                row["eval_return"] = float(np.mean([e[2] for e in evals if e[0] == frames]))
            rows.append(row)
            bar.update(n_new)
            bar.set_postfix(ret=f"{row['episode_return']:.0f}", kl=f"{row['kl_batch']:.4f}",
                            beta=f"{row['beta']:.3g}", refresh=False)
            if on_iteration is not None:
                on_iteration(row)
    finally:
        bar.close()
        collector.shutdown()
        eval_env.close()

    return RunResult.build(cfg, rows, episodes, evals, iterations, time.perf_counter() - start,
                           float(loss.beta) if hasattr(loss, "beta") else None)

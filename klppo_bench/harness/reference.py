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
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torchrl.collectors import Collector
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives.value import GAE

from klppo_bench.config import RunConfig
from klppo_bench.errors import DivergenceError
from klppo_bench.harness.common import (EVAL_SEED_OFFSET, RunResult, iteration_row,
                                        max_episode_steps, next_eval_frame, set_lr)
from klppo_bench.harness.env import make_env, sync_obs_stats
from klppo_bench.harness.models import Models, build_models
from klppo_bench.variants import get_variant, load_plugins
from klppo_bench.variants.beta import BetaSchedule
from klppo_bench.variants.distributions import joint_normal_kl
from klppo_bench.variants.outputs import recorded_columns


def seed_everything(seed: int) -> None:
    """One seed fixes every random stream of the run; one torch thread fixes the bits."""
    torch.set_num_threads(1)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loss_kl_estimate(loss, batch) -> torch.Tensor:
    """Per-sample KL(old || new) as the loss itself estimates it (closed form or Monte-Carlo).

    The beta schedule owns beta (:mod:`klppo_bench.variants.beta`), so this call moves nothing.
    """
    return loss(batch)["kl"].reshape(-1)


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
        done = done[None]
        ret, length = data["next", "episode_reward"][None], data["next", "step_count"][None]
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
    learner = Learner.build(cfg, variant, env.observation_spec["observation"].shape[-1],
                            env.action_spec.shape[-1])
    gae = GAE(gamma=tc.gamma, lmbda=tc.lmbda, value_network=learner.models.value,
              average_gae=False, device=device)
    iterations = math.ceil(cfg.frames / tc.steps_per_iter)
    collector = Collector(
        env, learner.models.policy, frames_per_batch=tc.steps_per_iter,
        total_frames=iterations * tc.steps_per_iter, env_device="cpu",
        policy_device=device, storing_device=device,
        exploration_type=ExplorationType.RANDOM, auto_register_policy_transforms=False,
    )
    eval_max_steps = max_episode_steps(cfg.env)
    rows, episodes, evals = [], [], []
    frames, next_eval = 0, next_eval_frame(0, cfg.eval.every)
    start = time.perf_counter()
    bar = _progress_bar(cfg, iterations, progress)
    try:
        for it, data in enumerate(collector):  # collect steps_per_iter frames
            t_iter = time.perf_counter()
            n_new = data.numel()
            episodes += _finished_episodes(data, frames, tc.num_envs)
            frames += n_new
            with torch.no_grad():
                gae(data)  # advantages and value targets, once per iteration
            flat = data.reshape(-1)
            set_lr(learner.optim, tc, it, iterations)
            stats = learner.update(flat, it, frames)
            kl_batch, entropy, kl_estimate, kl_estimate_err = learner.policy_change(
                flat, variant.kl_estimator)
            if learner.beta is not None:
                learner.schedule.after_iteration(learner.beta, kl_estimate, cfg.loss)
            now = time.perf_counter()
            row = iteration_row(
                it, frames, n_new, episodes, {k: float(np.mean(v)) for k, v in stats.items()},
                kl_batch=kl_batch, kl_estimate=kl_estimate, kl_estimate_err_std=kl_estimate_err,
                beta=learner.beta_value() if learner.beta is not None else math.nan,
                entropy=entropy, lr=learner.optim.param_groups[0]["lr"],
                update_seconds=now - t_iter, wall_seconds=now - start)
            if frames >= next_eval or it == iterations - 1:
                for k, (ret, length) in enumerate(evaluate(
                        eval_env, env, learner.models.policy, cfg.eval.episodes, eval_max_steps)):
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
                           learner.beta_value())


@dataclass
class Learner:
    """What an update changes: the models, the variant's loss and its beta (owned by the
    variant's beta schedule), the optimizer, and the minibatch permutation stream."""

    cfg: RunConfig
    models: Models
    loss: torch.nn.Module
    schedule: BetaSchedule
    beta: torch.Tensor | None
    params: list[torch.nn.Parameter]
    optim: torch.optim.Optimizer
    perm_gen: torch.Generator

    @classmethod
    def build(cls, cfg: RunConfig, variant, obs_dim: int, action_dim: int) -> "Learner":
        """The run's models (from torch's seeded state), its loss, Adam and streams."""
        models = build_models(obs_dim, action_dim, cfg.model, variant.distribution_class,
                              torch.device(cfg.device))
        loss = variant.build_loss(models.loss_actor, models.loss_critic, cfg.loss)
        schedule = variant.beta_schedule(cfg.loss)
        beta = getattr(loss, schedule.buffer) if schedule.buffer else None
        params = [p for p in models.modules.parameters()]
        optim = torch.optim.Adam(params, lr=cfg.train.lr)
        return cls(cfg, models, loss, schedule, beta, params, optim,
                   torch.Generator().manual_seed(cfg.seed))

    def update(self, flat, it: int, frames: int) -> dict[str, list[float]]:
        """``epochs`` passes of shuffled minibatches of ``flat`` through the loss; returns
        each recorded output's value per minibatch."""
        tc = self.cfg.train
        stats: dict[str, list[float]] = {}
        for _ in range(tc.epochs):
            perm = torch.randperm(flat.numel(), generator=self.perm_gen).to(
                torch.device(self.cfg.device))
            for idx in perm.split(tc.minibatch_size):
                self._minibatch_step(flat[idx], it, frames, stats)
        return stats

    def _minibatch_step(self, minibatch, it: int, frames: int,
                        stats: dict[str, list[float]]) -> None:
        out = self.loss(minibatch)
        if self.beta is not None:  # before backward: see MinibatchBeta
            self.schedule.after_loss(self.beta, float(out["kl"].mean()), self.cfg.loss)
        total = sum(v for k, v in out.items() if k.startswith("loss_"))
        if not torch.isfinite(total):
            bad = {k: float(v.mean()) for k, v in out.items() if k.startswith("loss_")}
            raise DivergenceError(f"non-finite loss at iteration {it} (frames {frames}): {bad}")
        self.optim.zero_grad(set_to_none=True)
        total.backward()
        max_norm = self.cfg.train.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params,
                                                   max_norm if max_norm > 0 else math.inf)
        if not torch.isfinite(grad_norm):
            raise DivergenceError(f"non-finite gradient at iteration {it} (frames {frames})")
        self.optim.step()
        for key, column in recorded_columns(out).items():  # extras: extra/<key>
            stats.setdefault(column, []).append(float(out[key].detach().mean()))
        stats.setdefault("grad_norm", []).append(float(grad_norm))

    def policy_change(self, flat, kl_estimator: str) -> tuple[float, float, float, float]:
        """``(kl_batch, entropy, kl_estimate, kl_estimate_err)``: the mean analytic KL from the
        batch's behaviour policy to the updated one, the updated policy's entropy, the loss's
        own KL estimate and the standard deviation of its error per sample (NaN without one)."""
        with torch.no_grad():
            td = flat.select("observation").clone()
            dist = self.models.policy.get_dist(td)
            kl_batch = joint_normal_kl(flat["loc"], flat["scale"], td["loc"], td["scale"])
            entropy = dist.entropy().mean()
            kl_estimate = kl_estimate_err = math.nan
            if kl_estimator != "none":
                kl_samples = loss_kl_estimate(self.loss, flat)
                kl_estimate = float(kl_samples.mean())
                kl_estimate_err = float((kl_samples - kl_batch).std())
        return float(kl_batch.mean()), float(entropy), kl_estimate, kl_estimate_err

    def beta_value(self) -> float | None:
        return float(self.beta) if self.beta is not None else None


def _progress_bar(cfg: RunConfig, iterations: int, progress: bool | None):
    from tqdm.auto import tqdm

    return tqdm(total=iterations * cfg.train.steps_per_iter, unit="frame", dynamic_ncols=True,
                disable=None if progress is None else not progress,
                desc=f"{cfg.variant} {cfg.env} s{cfg.seed}", leave=False)

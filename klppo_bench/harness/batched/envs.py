"""Environments of S seeds stepped together, with the reference engine's transforms per seed.

One stepper (:mod:`klppo_bench.harness.vector_step`) holds all ``S x num_envs`` sub-envs
(seed-major: sub-env ``s * num_envs + i`` belongs to seed ``s``), each
``ClipAction(gym.make(env_id))`` as in :func:`klppo_bench.harness.env.make_env`: gymnasium's
``SyncVectorEnv`` for any id, or, for the v5 MuJoCo tasks it reproduces, the bit-identical
:class:`~klppo_bench.harness.vector_step.MujocoStepper`, which skips gymnasium's per-step
Python. The sub-envs are stepped directly rather than through torchrl's ``GymWrapper``:
on this machine (Hopper-v5, one core, quiet) the wrapper with the harness's transforms rolls out
at ~0.15x raw ``env.step`` (``benchmarks/throughput.py``: ``torchrl env`` vs ``raw gymnasium``,
1,458 vs 10,003 steps/s on 2026-11-25), while the vector env costs about the same as a plain
loop over the sub-envs.

What the reference's torchrl transforms do is reproduced per seed, in float64 with the same
operations (so the statistics are bit-identical for the same observations):

* seeding: sub-env ``i`` of a seed is reset with ``seed + i`` once and then without a seed,
  as ``env.set_seed(seed)`` followed by the collector's first reset;
* :class:`~klppo_bench.harness.env.RunningObsNorm`: float32 observations, Chan et al.'s merge
  from mean 0 / var 1 / count 1e-4; a step merges the seed's ``num_envs`` next observations
  (the terminal one where an episode ended), a reset merges only the reset sub-envs' first
  observations; output ``(x - mean) / sqrt(var + 1e-8)`` clipped to ``+-obs_clip``;
* without normalization, ``obs_clip`` clips the raw float32 observation (``ClipTransform``);
* ``RewardSum`` / ``StepCounter``: float32 episode return and the length of each episode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from klppo_bench.harness.vector_step import (MujocoStepper, make_stepper, make_sub_env,
                                              use_fast_stepper)


class ObsNorm:
    """Per-seed running observation statistics (the math of ``RunningObsNorm``)."""

    def __init__(self, seeds: int, obs_dim: int, enabled: bool, clip: float, eps: float = 1e-8):
        self.mean = np.zeros((seeds, obs_dim))
        self.var = np.ones((seeds, obs_dim))
        self.count = np.full((seeds, 1), 1e-4)
        self.enabled, self.clip, self.eps = enabled, clip, eps

    def update(self, x: np.ndarray, seeds: np.ndarray | slice = slice(None)) -> None:
        """Merge ``x [len(seeds), n, D]`` (float64) into the statistics of ``seeds``."""
        n = x.shape[1]
        mean, var, count = self.mean[seeds], self.var[seeds], self.count[seeds]
        if n == 1:  # the mean and (population) variance of one sample, exactly; much cheaper
            batch_mean, batch_var = x[:, 0], 0.0
        else:
            batch_mean, batch_var = x.mean(1), x.var(1)
        total = count + n
        delta = batch_mean - mean
        self.mean[seeds] = mean + delta * n / total
        self.var[seeds] = (var * count + batch_var * n + delta**2 * count * n / total) / total
        self.count[seeds] = total

    def normalize(self, x: np.ndarray, seeds: np.ndarray | slice = slice(None)) -> np.ndarray:
        """``x [len(seeds), n, D]`` (float64) -> float32, normalized and clipped."""
        if self.enabled:
            mean, var = self.mean[seeds][:, None], self.var[seeds][:, None]
            x = (x - mean) / np.sqrt(var + self.eps)
        if self.clip > 0:
            x = np.clip(x, -self.clip, self.clip)
        return x.astype(np.float32)

    def __call__(self, x: np.ndarray, seeds: np.ndarray | slice = slice(None)) -> np.ndarray:
        if self.enabled:
            self.update(x, seeds)
        return self.normalize(x, seeds)

    def state(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        return self.mean[s].copy(), self.var[s].copy()


def _as_float64(obs: np.ndarray) -> np.ndarray:
    # DoubleToFloat first: the statistics see float32 observations, as in the reference
    return np.asarray(obs, dtype=np.float32).astype(np.float64)


@dataclass
class StepResult:
    """One vector step, all arrays shaped ``[S, E, ...]``."""

    next_obs: np.ndarray
    """Normalized next observation (the terminal one where an episode ended)."""
    obs: np.ndarray
    """Normalized observation the policy sees next (the reset one where an episode ended)."""
    reward: np.ndarray
    terminated: np.ndarray
    done: np.ndarray
    finished: list
    """``(seed, return, length)`` of each episode that ended in this step."""


class BatchedEnvs:
    """``seeds x num_envs`` gymnasium sub-envs with per-seed normalization."""

    def __init__(self, env_id: str, seeds: list[int], num_envs: int, obs_norm: bool,
                 obs_clip: float, fast: bool = True):
        self.S, self.E = len(seeds), num_envs
        self.stepper = make_stepper(env_id, self.S * self.E, fast=fast)
        self.obs_dim, self.action_dim = self.stepper.obs_dim, self.stepper.action_dim
        self.norm = ObsNorm(self.S, self.obs_dim, obs_norm, obs_clip)
        # sub-env i of run seed s: s * E + i, as the reference engine (no overlap between runs)
        self.stepper.reset([s * self.E + i for s in seeds for i in range(self.E)])
        self.ep_return = np.zeros((self.S, self.E), dtype=np.float32)
        self.ep_length = np.zeros((self.S, self.E), dtype=np.int64)

    def reset(self) -> np.ndarray:
        """First observations ``[S, E, D]`` (normalized, float32)."""
        raw = self.stepper.reset()
        return self.norm(_as_float64(raw).reshape(self.S, self.E, -1))

    def step(self, action: np.ndarray) -> StepResult:
        """Step every sub-env with ``action [S, E, A]`` (clipped to the box by ``ClipAction``)."""
        S, E = self.S, self.E
        raw, reward, term, trunc, final = self.stepper.step(action.reshape(S * E, -1))
        done = term | trunc
        raw = _as_float64(raw)
        next_raw = raw.copy()
        for i, final_obs in final.items():
            next_raw[i] = _as_float64(final_obs)
        next_obs = self.norm(next_raw.reshape(S, E, -1))
        obs = next_obs
        reward = reward.astype(np.float32).reshape(S, E)
        done, term = done.reshape(S, E), term.reshape(S, E)
        self.ep_return += reward
        self.ep_length += 1
        finished = []
        if done.any():
            obs = next_obs.copy()
            reset_raw = raw.reshape(S, E, -1)
            for s in np.flatnonzero(done.any(1)):
                envs = np.flatnonzero(done[s])
                obs[s, envs] = self.norm(reset_raw[s, envs][None], np.array([s]))[0]
                for e in envs:
                    finished.append((int(s), int(e), float(self.ep_return[s, e]),
                                     int(self.ep_length[s, e])))
            self.ep_return[done] = 0.0
            self.ep_length[done] = 0
        return StepResult(next_obs, obs, reward, term, done, finished)

    def close(self) -> None:
        self.stepper.close()


class BatchedEvaluator:
    """One evaluation env per seed (seeded ``seed + offset`` once, then reset without a seed,
    like the reference's ``eval_env``), run in lockstep with one batched policy call.

    The v5 MuJoCo tasks it reproduces step through :class:`MujocoStepper` (bit-identical,
    cheaper), every other id through its gymnasium env."""

    def __init__(self, env_id: str, seeds: list[int], offset: int, obs_clip: float,
                 obs_norm: bool, fast: bool = True):
        self.fast = use_fast_stepper(env_id, fast)
        if self.fast:
            self.stepper = MujocoStepper(env_id, len(seeds))
            for i, seed in enumerate(seeds):
                self.stepper.reset_one(i, seed + offset)
        else:
            self.envs = [make_sub_env(env_id) for _ in seeds]
            for env, seed in zip(self.envs, seeds):
                env.reset(seed=seed + offset)
        self.S = len(seeds)
        self.obs_norm, self.obs_clip = obs_norm, obs_clip

    def _reset(self, s: int) -> np.ndarray:
        return self.stepper.reset_one(s) if self.fast else self.envs[s].reset()[0]

    def _step(self, action: np.ndarray, running: np.ndarray):
        """Step the seeds in ``running`` (indices) with ``action[running]``."""
        if self.fast:
            obs, r, term, trunc, _ = self.stepper.step(action[running], active=running,
                                                       autoreset=False)
            return obs, r, term | trunc
        out = [self.envs[s].step(action[s]) for s in running]
        return ([o[0] for o in out], [o[1] for o in out], [o[2] or o[3] for o in out])

    def run(self, policy_mean, stats: ObsNorm, episodes: int, max_steps: int,
            active: list[int]) -> dict[int, list[tuple[float, int]]]:
        """Deterministic episodes of the seeds in ``active`` with frozen statistics.

        Args:
            policy_mean: ``obs [S, 1, D] (float32 numpy) -> action means [S, 1, A]`` numpy.
        Returns:
            ``{seed index: [(return, length), ...]}``.
        """
        S = self.S
        out = {s: [] for s in active}
        for _ in range(episodes):
            raw = np.zeros((S, 1, stats.mean.shape[1]))
            running = np.zeros(S, dtype=bool)
            ret = np.zeros(S, dtype=np.float32)
            length = np.zeros(S, dtype=np.int64)
            for s in active:
                raw[s, 0] = _as_float64(self._reset(s))
                running[s] = True
            for _ in range(max_steps):
                action = policy_mean(stats.normalize(raw))[:, 0]
                idx = np.flatnonzero(running)
                obs, r, done = self._step(action, idx)
                for row, s in enumerate(idx):
                    raw[s, 0] = _as_float64(obs[row])
                    ret[s] += np.float32(r[row])
                    length[s] += 1
                    if done[row]:
                        running[s] = False
                if not running.any():
                    break
            for s in active:
                out[s].append((float(ret[s]), int(length[s])))
        return out

    def close(self) -> None:
        if self.fast:
            self.stepper.close()
        else:
            for env in self.envs:
                env.close()

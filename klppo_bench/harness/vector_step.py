"""Stepping ``N`` gymnasium environments together for the seed-batched engine.

Two steppers share one small interface (:class:`GymStepper`, :class:`MujocoStepper`):
``reset(seeds)`` / ``step(action)`` on float64 observations, with gymnasium's same-step
autoreset (a sub-env whose episode ended is reset at once; its terminal observation is returned
beside the reset one).

Why a second stepper. Measured on this 2-core machine (Hopper-v5, seed-batched engine with
S=5, cProfile): about two thirds of the time went to gymnasium's per-sub-env Python step
(``HopperEnv.step``, ``is_healthy``, ``state_vector``, the wrappers, ``SyncVectorEnv._add_info``)
and only about a fifth to MuJoCo's ``mj_step``. :class:`MujocoStepper` keeps
gymnasium's own environments -- their MuJoCo model and data, their seeded ``reset`` (so the
initial-state noise is gymnasium's, drawn from gymnasium's generator) -- and replaces only the
per-step Python: it sets ``ctrl``, calls ``mujoco.mj_step`` for each sub-env, and computes the
observation, reward, termination and time limit of all sub-envs at once in numpy, with the same
operations in the same order as gymnasium's ``step`` (so values are bit-identical; the tests
step both side by side). ``benchmarks/batched.py`` measures the gain (README, "Speed").

Supported: the v5 tasks of :mod:`klppo_bench.harness.mujoco_tasks` (Hopper, Walker2d,
HalfCheetah, Swimmer, InvertedPendulum, InvertedDoublePendulum, Reacher: the PPO paper's seven),
made by plain ``gym.make(id)``; the shared half of the step is here, each task's observation,
reward and termination there. Every other id steps through gymnasium's ``SyncVectorEnv``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Protocol

import numpy as np

from klppo_bench.harness.mujoco_tasks import TASKS, SubEnv, task_class


def make_sub_env(env_id: str):
    """``ClipAction(gym.make(env_id))``, as :func:`klppo_bench.harness.env.make_env`."""
    import gymnasium as gym

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gym.wrappers.ClipAction(gym.make(env_id))


class Stepper(Protocol):
    num_envs: int
    obs_dim: int
    action_dim: int
    name: str

    def reset(self, seeds: list[int] | None = None) -> np.ndarray:
        """Reset every sub-env (with ``seeds[i]`` for sub-env ``i`` if given); ``[N, D]``."""

    def step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                dict[int, np.ndarray]]:
        """``action [N, A]`` -> ``(obs, reward, terminated, truncated, final_obs)``.

        ``obs`` holds the reset observation of every sub-env whose episode ended (same-step
        autoreset); ``final_obs`` maps those sub-envs to their terminal observation.
        """

    def close(self) -> None: ...


class GymStepper:
    """Any gymnasium id: one ``SyncVectorEnv`` of ``ClipAction(gym.make(id))`` sub-envs."""

    name = "gymnasium"

    def __init__(self, env_id: str, num_envs: int):
        import gymnasium as gym

        self.num_envs = num_envs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.venv = gym.vector.SyncVectorEnv(
                [lambda: make_sub_env(env_id)] * num_envs,
                autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, copy=False)
        self.obs_dim = self.venv.single_observation_space.shape[0]
        self.action_dim = self.venv.single_action_space.shape[0]

    def reset(self, seeds: list[int] | None = None) -> np.ndarray:
        obs, _ = self.venv.reset(seed=seeds)
        return np.asarray(obs, dtype=np.float64)

    def step(self, action):
        obs, reward, term, trunc, info = self.venv.step(action)
        final = {int(i): np.asarray(info["final_obs"][i], dtype=np.float64)
                 for i in np.flatnonzero(term | trunc)}
        return (np.asarray(obs, dtype=np.float64), np.asarray(reward, dtype=np.float64),
                np.asarray(term, dtype=bool), np.asarray(trunc, dtype=bool), final)

    def close(self) -> None:
        self.venv.close()


@functools.lru_cache(maxsize=None)
def fast_stepper_reason(env_id: str) -> str | None:
    """``None`` if :class:`MujocoStepper` reproduces ``env_id``, else why not."""
    import gymnasium as gym

    if not gym.__version__.startswith("1."):
        # the step math of mujoco_tasks is gymnasium 1.x's; tests/test_vector_step.py checks it
        return f"gymnasium {gym.__version__}: the direct stepper reproduces gymnasium 1.x"
    try:
        spec = gym.spec(env_id)
    except Exception as e:  # noqa: BLE001 - unknown ids are gymnasium's to report
        return f"{env_id}: {e}"
    if spec.version != 5 or spec.kwargs:
        return f"{env_id}: only v5 MuJoCo ids made without kwargs are reproduced"
    env = make_sub_env(env_id)
    try:
        base = env.unwrapped
        task = task_class(base)
        if task is None:
            return (f"{env_id}: {type(base).__name__} is not one of "
                    f"{sorted(name for name, _ in TASKS.values())} (v5)")
        why = task.unsupported(base)
        if why is not None:
            return f"{env_id}: {why}"
        if spec.max_episode_steps is None:
            return f"{env_id}: no time limit"
        return None
    finally:
        env.close()


class MujocoStepper:
    """Gymnasium's v5 MuJoCo tasks (:data:`~klppo_bench.harness.mujoco_tasks.TASKS`), stepped
    without gymnasium's per-step Python.

    The sub-envs are gymnasium's own (``ClipAction(gym.make(id))``); resets go through them
    unchanged. A step does, for all sub-envs at once, what ``ClipAction``, ``TimeLimit`` and the
    env's ``step`` do: clip the action to the box, ``data.ctrl[:] = action``,
    ``mj_step(model, data, nstep=frame_skip)``, ``mj_rnePostConstraint`` (as gymnasium's
    ``_step_mujoco_simulation``), then the task's observation, reward and termination
    (:mod:`klppo_bench.harness.mujoco_tasks`), truncated at ``max_episode_steps``.
    """

    name = "mujoco-direct"

    def __init__(self, env_id: str, num_envs: int):
        import gymnasium as gym
        import mujoco

        reason = fast_stepper_reason(env_id)
        if reason is not None:
            raise ValueError(reason)
        self._mj_step, self._mj_post = mujoco.mj_step, mujoco.mj_rnePostConstraint
        self.num_envs = num_envs
        self.envs = [make_sub_env(env_id) for _ in range(num_envs)]
        base = self.envs[0].unwrapped
        self.task = task_class(base)(base)
        self.models = [e.unwrapped.model for e in self.envs]
        self.datas = [e.unwrapped.data for e in self.envs]
        self._subs = [SubEnv(m, d, d.ctrl, d.qpos, d.qvel)
                      for m, d in zip(self.models, self.datas)]
        self.frame_skip = base.frame_skip
        # ClipAction clips to the wrapped env's box (its own space is unbounded)
        self.low, self.high = base.action_space.low, base.action_space.high
        self.obs_dim = base.observation_space.shape[0]
        self.action_dim = base.action_space.shape[0]
        self.max_steps = gym.spec(env_id).max_episode_steps
        self.elapsed = np.zeros(num_envs, dtype=np.int64)
        self.qpos = np.zeros((num_envs, base.model.nq))
        self.qvel = np.zeros((num_envs, base.model.nv))

    def reset(self, seeds: list[int] | None = None) -> np.ndarray:
        return np.stack([self.reset_one(i, None if seeds is None else seeds[i])
                         for i in range(self.num_envs)])

    def reset_one(self, i: int, seed: int | None = None) -> np.ndarray:
        """Reset sub-env ``i`` through gymnasium (its own generator draws the noise)."""
        self.elapsed[i] = 0
        return self.envs[i].reset(seed=seed)[0]

    def step(self, action, active: np.ndarray | None = None, autoreset: bool = True):
        """As :meth:`Stepper.step`; ``active`` (indices) steps only those sub-envs (the rows
        of ``action`` and of the results follow ``active``); ``autoreset=False`` leaves ended
        episodes for the caller to reset (:meth:`reset_one`)."""
        idx = np.arange(self.num_envs) if active is None else np.asarray(active)
        action = np.clip(action, self.low, self.high)  # ClipAction (float32 box)
        qpos, qvel = self.qpos[: len(idx)], self.qvel[: len(idx)]
        subs = self._subs if active is None else [self._subs[i] for i in idx]
        before = self.task.before(subs)
        step, post, n = self._mj_step, self._mj_post, self.frame_skip
        for row, (m, d, ctrl, qp, qv) in enumerate(subs):
            ctrl[:] = action[row]
            step(m, d, n)
            post(m, d)
            qpos[row] = qp
            qvel[row] = qv
        obs, reward, term = self.task.outcome(subs, qpos, qvel, action, before)
        self.elapsed[idx] += 1
        trunc = self.elapsed[idx] >= self.max_steps
        final = {}
        if autoreset:
            for row in np.flatnonzero(term | trunc):
                final[int(row)] = obs[row].copy()
                obs[row] = self.reset_one(int(idx[row]))
        return obs, reward, term, trunc, final

    def close(self) -> None:
        for env in self.envs:
            env.close()


def use_fast_stepper(env_id: str, fast: bool = True) -> bool:
    """Whether ``env_id`` steps through :class:`MujocoStepper` (if ``fast``)."""
    return fast and fast_stepper_reason(env_id) is None


def stepper_name(env_id: str, fast: bool = True) -> str:
    """Which stepper :func:`make_stepper` picks for ``env_id`` (recorded in provenance)."""
    return MujocoStepper.name if use_fast_stepper(env_id, fast) else GymStepper.name


def make_stepper(env_id: str, num_envs: int, fast: bool = True) -> Stepper:
    """The fast stepper where it reproduces ``env_id`` (and ``fast``), else gymnasium's."""
    if use_fast_stepper(env_id, fast):
        return MujocoStepper(env_id, num_envs)
    return GymStepper(env_id, num_envs)

"""What each gymnasium v5 MuJoCo task computes after its physics step, for all sub-envs at once.

The shared half of a step (clip the action, ``ctrl``, ``mj_step``, ``mj_rnePostConstraint``,
time limit, autoreset) is :class:`klppo_bench.harness.vector_step.MujocoStepper`'s; a task here
gives the other half of gymnasium's ``step``: the observation, the reward and the termination,
computed from the stepped sub-envs with the same floating-point operations in the same order as
gymnasium 1.x's ``<task>_v5.py`` (``tests/test_vector_step.py`` steps both side by side and
requires equal bits). Where a vectorized numpy call could round differently from gymnasium's
per-env one, the per-env call is kept, and the comment says why:

* ``x**2`` on a float64 scalar is libm's ``pow``, which differs from numpy's vectorized square
  in about one value in 1,000 (measured here): InvertedDoublePendulum's penalties stay scalar;
* ``np.linalg.norm`` of one 3-vector is a BLAS dot product whose rounding (FMA, order) a
  vectorized sum need not match: Reacher's distance stays one norm per sub-env.

The control costs are float32, as gymnasium computes them from ``ClipAction``'s float32 action.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class SubEnv(NamedTuple):
    """One sub-env's MuJoCo model and data, with numpy views made once (they stay valid: resets
    and checkpoint restores write into the same ``MjData``)."""

    model: object
    data: object
    ctrl: np.ndarray
    qpos: np.ndarray
    qvel: np.ndarray


class Task:
    """One v5 task's ``step`` after ``do_simulation``; ``base`` is the unwrapped gymnasium env.

    ``before(subs)`` reads what the reward needs from before the physics step;
    ``outcome(subs, qpos, qvel, action, before)`` returns ``(obs [n, D] float64, reward [n]
    float64, terminated [n] bool)`` for the sub-envs ``subs`` just stepped (``qpos`` / ``qvel``
    their new states, ``action`` the clipped float32 action)."""

    def __init__(self, base):
        self.dt = base.dt

    @staticmethod
    def unsupported(base) -> str | None:
        """Why this env's settings are not reproduced (``None``: they are)."""
        return None

    def before(self, subs: list[SubEnv]):
        return None

    def outcome(self, subs, qpos, qvel, action, before):
        raise NotImplementedError


def _ctrl_cost(weight, action: np.ndarray) -> np.ndarray:
    # float32, as ``weight * np.sum(np.square(action))`` on gymnasium's float32 action
    return weight * np.sum(np.square(action), axis=1)


class Locomotion(Task):
    """Hopper, Walker2d, HalfCheetah, Swimmer: reward ``(w_fwd * dx / dt [+ healthy bonus]) -
    ctrl cost``, observation ``[qpos[skip:], qvel]`` (qvel clipped to +-10 for Hopper and
    Walker2d), terminated when unhealthy (Hopper, Walker2d)."""

    # gymnasium module -> (positions left out of the observation, clip qvel, healthy check,
    # healthy check includes the state range (``state_vector()[2:]``))
    KINDS = {"hopper_v5": (1, True, True, True), "walker2d_v5": (1, True, True, False),
             "half_cheetah_v5": (1, False, False, False), "swimmer_v5": (2, False, False, False)}

    def __init__(self, base):
        super().__init__(base)
        self.skip, self.clip_qvel, healthy, state_range = self.KINDS[_module(base)]
        self.w_fwd, self.w_ctrl = base._forward_reward_weight, base._ctrl_cost_weight
        self.healthy = healthy
        if healthy:
            self.healthy_reward = base._healthy_reward
            self.terminate = base._terminate_when_unhealthy
            self.z_range = base._healthy_z_range
            self.angle_range = base._healthy_angle_range
            self.state_range = base._healthy_state_range if state_range else None

    @staticmethod
    def unsupported(base) -> str | None:
        if getattr(base, "_exclude_current_positions_from_observation", False) is not True:
            return "observation includes the x position"
        return None

    def before(self, subs):
        return np.array([s.qpos[0] for s in subs])

    def _is_healthy(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        z, angle = qpos[:, 1], qpos[:, 2]
        ok = (self.z_range[0] < z) & (z < self.z_range[1])
        ok &= (self.angle_range[0] < angle) & (angle < self.angle_range[1])
        if self.state_range is not None:  # state_vector()[2:] = qpos[2:], qvel in the range
            lo, hi = self.state_range
            qp, qv = qpos[:, 2:], qvel
            ok &= ((lo < qp) & (qp < hi)).all(1) & ((lo < qv) & (qv < hi)).all(1)
        return ok

    def outcome(self, subs, qpos, qvel, action, x_before):
        x_velocity = (qpos[:, 0] - x_before) / self.dt
        vel = np.clip(qvel, -10, 10) if self.clip_qvel else qvel
        obs = np.concatenate((qpos[:, self.skip:], vel), axis=1)
        ctrl_cost = _ctrl_cost(self.w_ctrl, action)
        forward = self.w_fwd * x_velocity
        if not self.healthy:
            return obs, forward - ctrl_cost, np.zeros(len(subs), dtype=bool)
        healthy = self._is_healthy(qpos, qvel)
        reward = (forward + healthy * self.healthy_reward) - ctrl_cost
        term = ~healthy if self.terminate else np.zeros(len(subs), dtype=bool)
        return obs, reward, term


class InvertedPendulum(Task):
    """Observation ``[qpos, qvel]``; terminated when it is not finite or ``|qpos[1]| > 0.2``;
    reward ``int(not terminated)``."""

    def outcome(self, subs, qpos, qvel, action, before):
        obs = np.concatenate((qpos, qvel), axis=1)
        term = ~np.isfinite(obs).all(1) | (np.abs(obs[:, 1]) > 0.2)
        return obs, (~term).astype(np.float64), term


class InvertedDoublePendulum(Task):
    """Observation ``[qpos[:1], sin(qpos[1:]), cos(qpos[1:]), clip(qvel), clip(qfrc_constraint
    [:1])]``; the tip ``(x, _, y) = site_xpos[0]``; terminated when ``y <= 1``; reward
    ``healthy_reward * alive - (0.01 x**2 + (y - 2)**2) - (1e-3 v1**2 + 5e-3 v2**2)``."""

    def __init__(self, base):
        super().__init__(base)
        self.healthy_reward = base._healthy_reward

    def outcome(self, subs, qpos, qvel, action, before):
        tip = np.array([s.data.site_xpos[0] for s in subs])
        qfrc = np.array([s.data.qfrc_constraint[0] for s in subs])
        angles = np.ascontiguousarray(qpos[:, 1:])
        obs = np.concatenate((qpos[:, :1], np.sin(angles), np.cos(angles),
                              np.clip(qvel, -10, 10), np.clip(qfrc, -10, 10)[:, None]), axis=1)
        term = tip[:, 2] <= 1
        # per sub-env, on float64 scalars as gymnasium (``**`` is libm's pow: module docstring)
        dist_penalty = np.array([0.01 * x**2 + (y - 2) ** 2 for x, _, y in tip])
        vel_penalty = np.array([1e-3 * v1**2 + 5e-3 * v2**2 for v1, v2 in qvel[:, 1:3]])
        alive_bonus = self.healthy_reward * (~term)
        return obs, alive_bonus - dist_penalty - vel_penalty, term


class Reacher(Task):
    """``vec = xpos[fingertip] - xpos[target]``; observation ``[cos(qpos[:2]), sin(qpos[:2]),
    qpos[2:], qvel[:2], vec[:2]]``; reward ``-|vec| * w_dist + (-sum(action**2) * w_ctrl)``
    (float32 control cost); never terminates."""

    def __init__(self, base):
        super().__init__(base)
        self.w_dist, self.w_ctrl = base._reward_dist_weight, base._reward_control_weight
        self.fingertip = base.model.body("fingertip").id
        self.target = base.model.body("target").id

    def outcome(self, subs, qpos, qvel, action, before):
        ft, tg = self.fingertip, self.target
        vecs = [s.data.xpos[ft] - s.data.xpos[tg] for s in subs]
        # one BLAS norm per sub-env, as gymnasium (module docstring)
        dist = np.array([np.linalg.norm(v) for v in vecs])
        theta = np.ascontiguousarray(qpos[:, :2])
        obs = np.concatenate((np.cos(theta), np.sin(theta), qpos[:, 2:], qvel[:, :2],
                              np.array(vecs)[:, :2]), axis=1)
        reward = -dist * self.w_dist + -np.sum(np.square(action), axis=1) * self.w_ctrl
        return obs, reward, np.zeros(len(subs), dtype=bool)


TASKS: dict[str, tuple[str, type[Task]]] = {
    "hopper_v5": ("HopperEnv", Locomotion), "walker2d_v5": ("Walker2dEnv", Locomotion),
    "half_cheetah_v5": ("HalfCheetahEnv", Locomotion), "swimmer_v5": ("SwimmerEnv", Locomotion),
    "inverted_pendulum_v5": ("InvertedPendulumEnv", InvertedPendulum),
    "inverted_double_pendulum_v5": ("InvertedDoublePendulumEnv", InvertedDoublePendulum),
    "reacher_v5": ("ReacherEnv", Reacher),
}
"""gymnasium module (``gymnasium.envs.mujoco.<module>``) -> (the env class it defines, its task);
a subclass defined elsewhere is not reproduced."""


def _module(base) -> str:
    return type(base).__module__.split(".")[-1]


def task_class(base) -> type[Task] | None:
    """The task that reproduces gymnasium's env ``base`` (unwrapped), or ``None``."""
    module = _module(base)
    if type(base).__module__ != f"gymnasium.envs.mujoco.{module}" or module not in TASKS:
        return None
    class_name, task = TASKS[module]
    return task if type(base).__name__ == class_name else None

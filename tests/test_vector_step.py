"""The direct MuJoCo stepper reproduces gymnasium's v5 locomotion envs bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from klppo_bench.harness.batched.envs import BatchedEnvs, BatchedEvaluator
from klppo_bench.harness.vector_step import (GymStepper, MujocoLocomotionStepper,
                                             fast_stepper_reason, make_stepper)


def _assert_same_step(a, b, where):
    for k, name in enumerate(("obs", "reward", "terminated", "truncated")):
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{where}: {name}")
    assert a[4].keys() == b[4].keys(), f"{where}: final_obs keys"
    for i in a[4]:
        np.testing.assert_array_equal(a[4][i], b[4][i], err_msg=f"{where}: final_obs[{i}]")


@pytest.mark.parametrize("env_id,steps", [("Hopper-v5", 600), ("Walker2d-v5", 600),
                                          ("HalfCheetah-v5", 1100)])
def test_fast_stepper_is_bit_identical_to_gymnasium(env_id, steps):
    """Same seeds, same float32 actions (a third outside the box): same observations, rewards,
    terminations, time-limit truncations, terminal observations and autoreset states."""
    n = 3
    gym_st, fast = GymStepper(env_id, n), MujocoLocomotionStepper(env_id, n)
    seeds = [7, 8, 9]
    np.testing.assert_array_equal(gym_st.reset(seeds), fast.reset(seeds))
    rng = np.random.default_rng(0)
    ended = truncated = 0
    for t in range(steps):
        action = rng.uniform(-1.5, 1.5, (n, gym_st.action_dim)).astype(np.float32)
        a, b = gym_st.step(action), fast.step(action)
        _assert_same_step(a, b, f"{env_id} step {t}")
        ended += len(a[4])
        truncated += int(a[3].sum())
    assert ended > 0  # resets were exercised
    if env_id == "HalfCheetah-v5":
        assert truncated == n  # the 1000-step limit, on the same step as gymnasium
    gym_st.close()
    fast.close()


def test_which_ids_get_the_fast_stepper():
    for env_id in ("Hopper-v5", "Walker2d-v5", "HalfCheetah-v5"):
        assert fast_stepper_reason(env_id) is None
        assert isinstance(make_stepper(env_id, 1), MujocoLocomotionStepper)
    assert "AntEnv" in fast_stepper_reason("Ant-v5")
    assert "v5" in fast_stepper_reason("Hopper-v4")
    assert "v5" in fast_stepper_reason("Pendulum-v1")
    assert isinstance(make_stepper("Pendulum-v1", 2), GymStepper)
    assert isinstance(make_stepper("Hopper-v5", 2, fast=False), GymStepper)


def test_partial_steps_without_autoreset_leave_other_envs_alone():
    """The evaluator's mode: only the running sub-envs step; an ended one waits for reset."""
    fast, ref = MujocoLocomotionStepper("Hopper-v5", 2), GymStepper("Hopper-v5", 1)
    fast.reset([1, 2])
    ref.reset([2])
    idle = fast.datas[0].qpos.copy()
    action = np.full((1, 3), 0.8, np.float32)
    for t in range(1000):
        a = fast.step(action, active=np.array([1]), autoreset=False)
        b = ref.step(action)
        np.testing.assert_array_equal(a[1], b[1])
        if b[2][0] or b[3][0]:
            break
        np.testing.assert_array_equal(a[0], b[0])
    assert a[2][0] and a[4] == {}  # ended, and not reset: the terminal observation comes back
    np.testing.assert_array_equal(a[0][0], b[4][0])
    assert fast.elapsed.tolist() == [0, t + 1]
    np.testing.assert_array_equal(fast.datas[0].qpos, idle)


@pytest.mark.parametrize("num_envs", [1, 2])
def test_batched_envs_fast_and_gymnasium_paths_agree(num_envs):
    seeds = [3, 5]
    fast = BatchedEnvs("Hopper-v5", seeds, num_envs, obs_norm=True, obs_clip=10.0)
    slow = BatchedEnvs("Hopper-v5", seeds, num_envs, obs_norm=True, obs_clip=10.0, fast=False)
    assert fast.stepper.name == "mujoco-direct" and slow.stepper.name == "gymnasium"
    np.testing.assert_array_equal(fast.reset(), slow.reset())
    rng = np.random.default_rng(1)
    finished = 0
    for _ in range(300):
        action = rng.uniform(-1, 1, (2, num_envs, 3)).astype(np.float32)
        a, b = fast.step(action), slow.step(action)
        for field in ("next_obs", "obs", "reward", "terminated", "done"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
        assert a.finished == b.finished
        finished += len(a.finished)
    assert finished > 0
    np.testing.assert_array_equal(fast.norm.mean, slow.norm.mean)
    np.testing.assert_array_equal(fast.norm.var, slow.norm.var)


def test_evaluator_fast_and_gymnasium_paths_agree():
    seeds = [0, 1, 2]
    stats = BatchedEnvs("Hopper-v5", seeds, 1, obs_norm=True, obs_clip=10.0).norm
    weights = np.random.default_rng(2).standard_normal((11, 3)).astype(np.float32) * 0.3

    def policy_mean(obs):  # a fixed linear policy, deterministic
        return np.tanh(obs @ weights)

    results = []
    for fast in (True, False):
        ev = BatchedEvaluator("Hopper-v5", seeds, 10_000, 10.0, True, fast=fast)
        assert ev.fast is fast
        # two rounds: the second starts from where the first left each env's generator
        results.append([ev.run(policy_mean, stats, 2, 1000, [0, 2]),
                        ev.run(policy_mean, stats, 1, 1000, [0, 1, 2])])
        ev.close()
    assert results[0] == results[1]
    assert sorted(results[0][0]) == [0, 2] and len(results[0][0][0]) == 2

"""The direct MuJoCo stepper reproduces gymnasium's v5 MuJoCo tasks bit for bit."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from klppo_bench.harness.batched.envs import BatchedEnvs, BatchedEvaluator
from klppo_bench.harness.vector_step import (GymStepper, MujocoStepper,
                                             fast_stepper_reason, make_stepper)


def _assert_same_step(a, b, where):
    for k, name in enumerate(("obs", "reward", "terminated", "truncated")):
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{where}: {name}")
    assert a[4].keys() == b[4].keys(), f"{where}: final_obs keys"
    for i in a[4]:
        np.testing.assert_array_equal(a[4][i], b[4][i], err_msg=f"{where}: final_obs[{i}]")


# env id, steps, action scale (a third of the actions outside the box), truncations expected
# (the time limit, on the same step as gymnasium); the others end by termination
BIT_IDENTITY = [("Hopper-v5", 600, 1.5, False), ("Walker2d-v5", 600, 1.5, False),
                ("HalfCheetah-v5", 1100, 1.5, True), ("Swimmer-v5", 1100, 1.5, True),
                ("InvertedPendulum-v5", 600, 4.5, False),
                ("InvertedDoublePendulum-v5", 600, 1.5, False), ("Reacher-v5", 600, 1.5, True)]


@pytest.mark.parametrize("env_id,steps,scale,truncates", BIT_IDENTITY)
def test_fast_stepper_is_bit_identical_to_gymnasium(env_id, steps, scale, truncates):
    """Same seeds, same float32 actions (a third outside the box): same observations, rewards,
    terminations, time-limit truncations, terminal observations and autoreset states."""
    n = 3
    gym_st, fast = GymStepper(env_id, n), MujocoStepper(env_id, n)
    seeds = [7, 8, 9]
    np.testing.assert_array_equal(gym_st.reset(seeds), fast.reset(seeds))
    rng = np.random.default_rng(0)
    ended = truncated = 0
    rewards = []
    for t in range(steps):
        action = rng.uniform(-scale, scale, (n, gym_st.action_dim)).astype(np.float32)
        a, b = gym_st.step(action), fast.step(action)
        _assert_same_step(a, b, f"{env_id} step {t}")
        ended += len(a[4])
        truncated += int(a[3].sum())
        rewards.append(a[1])
    assert ended > 0  # resets were exercised
    assert (truncated > 0) == truncates
    assert len(np.unique(np.concatenate(rewards))) > 1  # the reward is not a constant
    gym_st.close()
    fast.close()


def test_which_ids_get_the_fast_stepper():
    for env_id, *_ in BIT_IDENTITY:
        assert fast_stepper_reason(env_id) is None
        assert isinstance(make_stepper(env_id, 1), MujocoStepper)
    assert "AntEnv" in fast_stepper_reason("Ant-v5")
    assert "v5" in fast_stepper_reason("Hopper-v4")
    assert "v5" in fast_stepper_reason("Pendulum-v1")
    assert isinstance(make_stepper("Pendulum-v1", 2), GymStepper)
    assert isinstance(make_stepper("Hopper-v5", 2, fast=False), GymStepper)


def test_partial_steps_without_autoreset_leave_other_envs_alone():
    """The evaluator's mode: only the running sub-envs step; an ended one waits for reset."""
    fast, ref = MujocoStepper("Hopper-v5", 2), GymStepper("Hopper-v5", 1)
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


def test_double_pendulum_at_the_rail_reads_the_constraint_force():
    """Random actions topple the poles before the cart reaches its rail, so the observation's
    last entry (the clipped constraint force on the slider) is only exercised here."""
    n = 3
    gym_st, fast = GymStepper("InvertedDoublePendulum-v5", n), MujocoStepper(
        "InvertedDoublePendulum-v5", n)
    np.testing.assert_array_equal(gym_st.reset([1, 2, 3]), fast.reset([1, 2, 3]))
    for env in [*gym_st.venv.envs, *fast.envs]:  # the cart near the rail, moving towards it
        u = env.unwrapped
        qpos, qvel = u.data.qpos.copy(), u.data.qvel.copy()
        qpos[0], qvel[0] = 0.9, 3.0
        u.set_state(qpos, qvel)
    at_rail = 0
    for t in range(40):
        action = np.ones((n, 1), np.float32)
        a, b = gym_st.step(action), fast.step(action)
        _assert_same_step(a, b, f"step {t}")
        at_rail += int((a[0][:, -1] != 0).sum())
    assert at_rail >= n


@pytest.mark.parametrize("env_id", ["Reacher-v5", "InvertedDoublePendulum-v5"])
def test_envs_restored_from_a_checkpoint_state_continue_bit_for_bit(env_id):
    """The checkpoint's env state (whole MjData, gymnasium's generator, time-limit counters,
    statistics) is all the direct stepper needs: Reacher's goal lives in qpos and its
    ``self.goal`` is drawn afresh at every reset, and the tasks keep no per-env state."""
    from klppo_bench.harness.batched.checkpoint import envs_state, set_envs_state

    def make(seeds):
        return (BatchedEnvs(env_id, seeds, 2, obs_norm=True, obs_clip=10.0),
                BatchedEvaluator(env_id, seeds, 10_000, 10.0, True))

    rng = np.random.default_rng(3)
    actions = rng.uniform(-1, 1, (150, 2, 2, make([0])[0].action_dim)).astype(np.float32)
    (envs, ev), (other, other_ev) = make([0, 1]), make([5, 6])
    assert envs.stepper.name == "mujoco-direct" and ev.fast
    envs.reset()
    other.reset()
    for action in actions[:30]:
        envs.step(action)
    weights = rng.standard_normal((envs.obs_dim, envs.action_dim)).astype(np.float32) * 0.3

    def policy_mean(obs):
        return np.tanh(obs @ weights)

    ev.run(policy_mean, envs.norm, 1, 1000, [0, 1])
    set_envs_state(other, other_ev, copy.deepcopy(envs_state(envs, ev)))
    finished = 0
    for action in actions[30:]:
        a, b = envs.step(action), other.step(action)
        for field in ("next_obs", "obs", "reward", "terminated", "done"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
        assert a.finished == b.finished
        finished += len(a.finished)
    assert finished > 0  # episodes ended after the restore: resets drew from the restored RNG
    assert ev.run(policy_mean, envs.norm, 2, 1000, [0, 1]) == other_ev.run(
        policy_mean, other.norm, 2, 1000, [0, 1])

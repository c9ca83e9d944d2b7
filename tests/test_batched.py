"""The batched engine: each variant's own loss module run for all lanes at once (checked
against the module applied to each lane's own networks), GAE, observation statistics, and run
records that the store cannot tell from the reference engine's."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tensordict import TensorDict
from torchrl.objectives.value import GAE

from klppo_bench.config import build_run_config
from klppo_bench.harness.batched import (
    batch_unsupported_reason,
    build_lanes,
    check_batch,
    execute_batch,
    lane_key,
    train_batched,
)
from klppo_bench.harness.batched.envs import ObsNorm
from klppo_bench.harness.batched.engine import _gae
from klppo_bench.harness.batched.nets import (
    StackedActorCritic,
    init_seed_models,
    reference_parameters,
)
from klppo_bench.harness.batched.optim import LaneAdam, flatten_parameters
from klppo_bench.harness.env import RunningObsNorm
from klppo_bench.harness.run import execute_run
from klppo_bench.harness.reference import loss_kl_estimate, train
from klppo_bench.store import RunDir, load_experiment
from klppo_bench.variants import all_variants, get_variant, load_plugins

from tests.conftest import TINY, TINY_FRAMES

EXAMPLE = str(Path(__file__).resolve().parent.parent / "examples" / "dual_clip.py")
TIMING = ["update_seconds", "wall_seconds", "sps"]
LOGGED = ("loss_objective", "loss_critic", "loss_entropy", "kl", "kl_approx",
          "clip_fraction", "explained_variance", "entropy", "dual_clip_fraction")
OBS, ACT, B, SEEDS = 11, 3, 64, (0, 1, 2)
# per call: how far the behaviour policy is from the current one (KL well above, below,
# near and above dtarg = 0.01, so an adaptive beta grows and shrinks)
OFFSETS = (0.3, 0.005, 0.08, 0.4, 0.002)


def _cases():
    load_plugins((EXAMPLE,))
    for name, v in all_variants().items():
        if v.beta_rule == "adaptive":
            for schedule in ("minibatch", "iteration"):
                yield pytest.param(name, {"beta_schedule": schedule}, None,
                                   id=f"{name}-{schedule}")
        elif not name.startswith(("nan-", "kill-")):
            yield pytest.param(name, {}, None, id=name)
    yield pytest.param("clip", {"entropy_bonus": "true", "entropy_coeff": 0.01,
                                "loss_critic_type": "smooth_l1", "critic_coeff": 0.5,
                                "normalize_advantage": "false", "clip_epsilon": 0.1}, None,
                       id="clip-options")
    yield pytest.param("klpen-fixed-mc", {"samples_mc_kl": 4, "entropy_bonus": "true",
                                          "loss_critic_type": "l1", "beta": 3.0}, None,
                       id="klpen-fixed-mc-options")
    yield pytest.param("klpen-adaptive", {"critic_coeff": 0.0, "beta_schedule": "minibatch",
                                          "increment": 1.5, "decrement": 0.75, "dtarg": 0.03},
                       None, id="klpen-adaptive-nocritic")
    # lanes that differ in hyperparameters as well as seeds
    yield pytest.param("klpen-adaptive-mc", {"beta_schedule": "minibatch"},
                       [{"dtarg": 0.003, "increment": 1.5, "beta": 0.5},
                        {"dtarg": 0.01, "increment": 2.0, "beta": 1.0},
                        {"dtarg": 0.03, "increment": 3.0, "beta": 2.0}], id="klpen-mc-lanes")
    yield pytest.param("dual-clip", {}, [{"clip_epsilon": 0.1, "dual_clip_c": 1.5},
                                         {"clip_epsilon": 0.2, "dual_clip_c": 3.0},
                                         {"clip_epsilon": 0.3, "dual_clip_c": 2.0}],
                       id="dual-clip-lanes")


def _data(nets: StackedActorCritic, offset: float, gen: torch.Generator, key) -> TensorDict:
    """Batch for every lane whose behaviour policy is ``offset`` away from the current one."""
    S = nets.seeds
    obs = torch.randn(S, B, OBS, generator=gen)
    with torch.no_grad():
        loc, scale = nets.loc(obs), nets.scale().expand(S, B, ACT)
    old_loc = loc + offset * torch.randn(S, B, ACT, generator=gen)
    old_scale = scale * torch.exp(offset * torch.randn(S, 1, ACT, generator=gen)).expand(S, B, ACT)
    action = old_loc + old_scale * torch.randn(S, B, ACT, generator=gen)
    log_prob = torch.distributions.Normal(old_loc, old_scale).log_prob(action).sum(-1)
    return TensorDict({"observation": obs, "action": action, key: log_prob, "loc": old_loc,
                       "scale": old_scale, "advantage": torch.randn(S, B, 1, generator=gen),
                       "value_target": torch.randn(S, B, 1, generator=gen)}, [S, B])


def _total(out) -> torch.Tensor:
    return sum(out[k] for k in out.keys() if isinstance(k, str) and k.startswith("loss_"))


@pytest.mark.parametrize("variant,overrides,lanes", list(_cases()))
def test_lanes_equal_each_runs_own_loss_module(variant, overrides, lanes):
    """The batched engine's vmapped call and the variant's loss module applied to each lane's
    own networks, fed the same minibatches: equal losses, KL, beta trajectories (the beta
    schedule's hooks, both schedules) and gradients per lane; Monte-Carlo lanes make the
    draws their reference run makes, from their own streams."""
    load_plugins((EXAMPLE,))
    lanes = lanes or [{} for _ in SEEDS]
    cfgs = [build_run_config(variant, "Hopper", s, overrides={**overrides, **extra},
                             plugins=(EXAMPLE,)) for s, extra in zip(SEEDS, lanes)]
    check_batch(cfgs)
    assert len({lane_key(c) for c in cfgs}) == 1, "these lanes share one job"
    assert batch_unsupported_reason(cfgs[0]) is None
    v = get_variant(variant)
    gens = [torch.Generator().manual_seed(1000 + s) for s in SEEDS]
    nets, lane_loss, _ = build_lanes(cfgs, OBS, ACT, torch.device("cpu"), gens)
    models = [init_seed_models(OBS, ACT, c.model, v.distribution_class, c.seed)[0] for c in cfgs]
    losses = [v.build_loss(m.loss_actor, m.loss_critic, c.loss) for m, c in zip(models, cfgs)]
    ref_params = [reference_parameters(m) for m in models]
    stacked = nets.ordered_parameters()
    schedule = v.beta_schedule(cfgs[0].loss)
    beta = lane_loss.buffer(schedule.buffer) if schedule.buffer else None
    key = losses[0].tensor_keys.sample_log_prob
    gen = torch.Generator().manual_seed(7)
    betas = []
    for call, offset in enumerate(OFFSETS):
        data = _data(nets, offset, gen, key)
        states = [g.get_state() for g in gens]
        out = lane_loss(data)
        if beta is not None:
            for s, c in enumerate(cfgs):
                schedule.after_loss(beta[s], float(out["kl"][s].mean()), c.loss)
        grads = torch.autograd.grad(_total(out).sum(), stacked, allow_unused=True)
        for s, (loss, params, c) in enumerate(zip(losses, ref_params, cfgs)):
            torch.set_rng_state(states[s])  # the lane's stream as the reference's global one
            ref = loss(data[s])
            if beta is not None:
                schedule.after_loss(loss.beta, float(ref["kl"].mean()), c.loss)
            total = _total(ref)
            ref_grads = torch.autograd.grad(total, params, allow_unused=True)
            keys = [k for k in LOGGED if k in ref.keys()]
            assert keys and sorted(keys) == sorted(k for k in LOGGED if k in out.keys())
            for k in keys:
                torch.testing.assert_close(out[k][s].mean(), ref[k].detach().mean(), rtol=1e-5,
                                           atol=1e-6, msg=f"{k} lane {s} call {call}")
            torch.testing.assert_close(_total(out)[s], total.detach(), rtol=1e-5, atol=1e-6)
            if beta is not None:
                assert float(beta[s]) == float(loss.beta), f"beta lane {s} call {call}"
            for i, (g, rg) in enumerate(zip(grads, ref_grads)):
                if rg is None:
                    assert g is None or not g[s].any(), f"param {i}"
                    continue
                torch.testing.assert_close(g[s], rg, rtol=1e-4, atol=1e-6,
                                           msg=f"grad of param {i} lane {s} call {call}")
        if beta is not None:
            betas.append(beta.clone())
    if beta is None:
        return
    # the paper's once-per-update rule, from each lane's full-batch KL estimate
    data = _data(nets, 0.3, gen, key)
    states = [g.get_state() for g in gens]
    with torch.no_grad():
        est = lane_loss(data)["kl"].reshape(len(SEEDS), -1).mean(1)
    for s, (loss, c) in enumerate(zip(losses, cfgs)):
        schedule.after_iteration(beta[s], float(est[s]), c.loss)
        torch.set_rng_state(states[s])
        ref_est = loss_kl_estimate(loss, data[s]).mean()
        torch.testing.assert_close(est[s], ref_est, rtol=1e-5, atol=1e-7)
        schedule.after_iteration(loss.beta, float(ref_est), c.loss)
        assert float(beta[s]) == float(loss.beta)
    trajectory = torch.stack(betas)
    initial = torch.tensor([float(c.loss["beta"]) for c in cfgs])
    if schedule.name == "minibatch":
        steps = torch.diff(torch.cat([initial[None], trajectory]), dim=0)
        assert (steps > 0).any() and (steps < 0).any(), "beta must have grown and shrunk"
    else:
        assert (trajectory == initial).all(), "beta moves only in the minibatch schedule"
        if schedule.name == "iteration":
            grown = initial * torch.tensor([float(c.loss["increment"]) for c in cfgs])
            assert (beta == grown).all(), "one iteration step"


def test_gae_equals_torchrl_gae():
    cfg = build_run_config("clip", "Hopper", 0)
    S, E, T = 2, 2, 50
    models = [init_seed_models(OBS, ACT, cfg.model, get_variant("clip").distribution_class, s)[0]
              for s in range(S)]
    nets = StackedActorCritic.from_models(models, cfg.model)
    gen = torch.Generator().manual_seed(1)
    obs, next_obs = torch.randn(2, S, E * T, OBS, generator=gen)
    reward = torch.randn(S, E * T, generator=gen)
    done = torch.rand(S, E * T, generator=gen) < 0.1
    terminated = done & (torch.rand(S, E * T, generator=gen) < 0.5)  # the rest are truncations
    adv, target = _gae(nets, obs, next_obs, reward, done, terminated, torch.tensor(0.99),
                       torch.tensor(0.95), S, E, T)
    for s in range(S):
        gae = GAE(gamma=0.99, lmbda=0.95, value_network=models[s].value, average_gae=False)
        td = TensorDict({
            "observation": obs[s].view(E, T, OBS),
            "next": {"observation": next_obs[s].view(E, T, OBS),
                     "reward": reward[s].view(E, T, 1), "done": done[s].view(E, T, 1),
                     "terminated": terminated[s].view(E, T, 1)}}, batch_size=[E, T])
        gae(td)
        torch.testing.assert_close(adv[s], td["advantage"].reshape(E * T, 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(target[s], td["value_target"].reshape(E * T, 1), rtol=1e-5,
                                   atol=1e-5)


def test_obs_statistics_are_bit_identical_to_the_reference_transform():
    ref = RunningObsNorm(torch.Size([OBS]), clip=10.0)
    ours = ObsNorm(2, OBS, enabled=True, clip=10.0)
    rng = np.random.default_rng(0)
    for n in (1, 1, 3, 1, 2):  # a step (n = num_envs) or a partial reset
        x = (rng.standard_normal((n, OBS)) * 5 + 2).astype(np.float32)
        expected = ref._apply_transform(torch.from_numpy(x)).numpy()
        got = ours(np.stack([x, x]).astype(np.float64))
        np.testing.assert_array_equal(got[0], expected)
        np.testing.assert_array_equal(got[1], expected)
    np.testing.assert_array_equal(ours.mean[0], ref.mean.numpy())
    np.testing.assert_array_equal(ours.var[1], ref.var.numpy())


def _deterministic(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in TIMING if c in df.columns])


@pytest.mark.parametrize("variant,num_envs", [("klpen-adaptive-mc", 1), ("clip", 2)])
def test_batched_seed_tracks_the_reference_engine_and_has_its_schema(variant, num_envs):
    """Seed 3 in a batch with seed 4 starts from the reference's weights, env states and
    action noise; the first iteration reproduces the reference engine's episodes exactly, and
    its evaluations (own env seeds, deterministic policy) agree to float rounding; also with
    two envs per seed (the reference's gymnasium vector env)."""
    overrides = {**TINY, "eval.every": TINY["train.steps_per_iter"], "eval.episodes": 2,
                 "train.num_envs": num_envs}
    cfgs = [build_run_config(variant, "Hopper", s, frames=TINY_FRAMES,
                             overrides=overrides) for s in (3, 4)]
    batched = train_batched(cfgs, progress=False)
    ref = train(cfgs[0], progress=False)
    got = batched[0]
    assert list(got.metrics.columns) == list(ref.metrics.columns)
    assert list(got.episodes.columns) == list(ref.episodes.columns)
    assert list(got.evals.columns) == list(ref.evals.columns)
    assert sorted(got.summary) == sorted(ref.summary)
    first = ref.episodes[ref.episodes.frames <= TINY["train.steps_per_iter"]]
    pd.testing.assert_frame_equal(got.episodes.iloc[:len(first)], first, rtol=1e-5)
    a, b = _deterministic(ref.metrics).iloc[0], _deterministic(got.metrics).iloc[0]
    pd.testing.assert_series_equal(b, a, rtol=1e-3, atol=1e-6)
    assert len(ref.evals) == 4  # 2 evaluations x 2 episodes
    pd.testing.assert_frame_equal(got.evals, ref.evals, rtol=1e-5)
    assert not got.episodes["return"].equals(batched[1].episodes["return"])


def test_same_seeds_twice_give_identical_metrics():
    cfgs = [build_run_config("klpen-adaptive", "Hopper", s, frames=TINY_FRAMES,
                             overrides={**TINY, "beta_schedule": "minibatch"}) for s in (0, 1)]
    a, b = train_batched(cfgs, progress=False), train_batched(cfgs, progress=False)
    for x, y in zip(a, b):
        pd.testing.assert_frame_equal(_deterministic(x.metrics), _deterministic(y.metrics),
                                      check_exact=True)
        pd.testing.assert_frame_equal(x.episodes, y.episodes, check_exact=True)
        pd.testing.assert_frame_equal(x.evals, y.evals, check_exact=True)
    assert a[0].metrics["loss_objective"].iloc[-1] != a[1].metrics["loss_objective"].iloc[-1]


def test_execute_batch_writes_reference_run_dirs_and_resumes_per_seed(tmp_path):
    cfgs = [build_run_config("clip", "Hopper", s, frames=TINY_FRAMES, overrides=TINY)
            for s in (0, 1, 2)]
    ref_run = execute_run(cfgs[0], tmp_path / "reference", progress=False)
    exp = tmp_path / "batched"
    first = execute_batch(cfgs[:1], exp, progress=False, settings=["clip"])[0]
    done_at = first.status()["done_at"]
    # seed 1 looks like a batched job killed mid-way: started, never finished
    RunDir(exp / "runs" / cfgs[1].run_id()).start(cfgs[1].to_dict())
    runs = execute_batch(cfgs, exp, progress=False, settings=["clip"] * 3)
    assert [r.state() for r in runs] == ["done"] * 3
    assert runs[0].status()["done_at"] == done_at and runs[0].status()["attempts"] == 1
    assert runs[1].status()["attempts"] == 2 and runs[2].status()["attempts"] == 1
    assert runs[1].status()["provenance"]["batch_seeds"] == [1, 2]
    assert runs[1].status()["provenance"]["env_stepper"] == "mujoco-direct"
    files = lambda run: sorted(p.name for p in run.path.iterdir())  # noqa: E731
    assert files(runs[0]) == files(ref_run)
    assert runs[0].config() == ref_run.config()
    assert sorted(runs[0].summary()) == sorted(ref_run.summary())
    for table in ("metrics", "episodes", "evals"):
        assert list(runs[0].table(table).columns) == list(ref_run.table(table).columns)
        assert list(runs[0].table(table).dtypes) == list(ref_run.table(table).dtypes)
    long = load_experiment(exp)
    assert sorted(long["seed"].unique()) == [0, 1, 2]


def test_one_diverging_seed_is_recorded_failed_and_the_others_finish(tmp_path, monkeypatch):
    original = StackedActorCritic.from_models.__func__

    def poisoned(cls, models, cfg, device="cpu"):
        nets = original(cls, models, cfg, device)
        with torch.no_grad():
            nets.critic_w[0][1].fill_(math.nan)  # seed index 1 only
        return nets

    monkeypatch.setattr(StackedActorCritic, "from_models", classmethod(poisoned))
    cfgs = [build_run_config("klpen-fixed", "Hopper", s, frames=TINY_FRAMES, overrides=TINY)
            for s in (0, 1)]
    runs = execute_batch(cfgs, tmp_path, progress=False)
    assert runs[0].state() == "done"
    assert runs[1].state() == "failed"
    assert "DivergenceError: non-finite loss at iteration 0" in runs[1].status()["error"]
    assert math.isfinite(runs[0].summary()["final_score"])


def test_batches_are_checked_and_unsupported_configs_named():
    a = build_run_config("clip", "Hopper", 0)
    with pytest.raises(ValueError, match="train"):
        check_batch([a, build_run_config("clip", "Hopper", 1, overrides={"train.epochs": 3})])
    with pytest.raises(ValueError, match="distinct"):
        check_batch([a, a])
    # lanes may differ in hyperparameter values; a structural loss option makes another job
    eps = build_run_config("clip", "Hopper", 1, overrides={"clip_epsilon": 0.1, "train.lr": 1e-3})
    check_batch([a, eps])
    assert lane_key(a) == lane_key(eps)
    assert lane_key(a) != lane_key(build_run_config("clip", "Hopper", 1,
                                                    overrides={"loss_critic_type": "l1"}))
    assert batch_unsupported_reason(a) is None
    shared = build_run_config("clip", "Hopper", 0, overrides={"model.trunk": "shared"})
    assert "model.trunk=shared" in batch_unsupported_reason(shared)
    # a user's subclass is batched as it is; one that writes .data in forward is named
    nan = build_run_config("nan-clip", "Hopper", 0, plugins=("tests.plugins.nan_variant",))
    assert batch_unsupported_reason(nan) is None
    cfg = build_run_config("counting-clip", "Hopper", 0,
                           plugins=("tests.plugins.buffer_writing_variant",))
    reason = batch_unsupported_reason(cfg)
    assert reason.startswith("variant counting-clip: its loss module (CountingClipLoss) cannot "
                             "run under torch.func.vmap") and "data" in reason
    assert "\n" not in reason
    # a draw from torch's global generator, or Python state changed in forward: refused too
    for name, needle in (("dropout-clip", "draws from torch's global generator"),
                         ("remembering-clip", "changes its own Python attributes")):
        reason = batch_unsupported_reason(build_run_config(
            name, "Hopper", 0, plugins=("tests.plugins.global_rng_variant",)))
        assert reason and needle in reason, reason


def test_resumed_partial_job_retrains_its_batch_and_matches_bit_for_bit(tmp_path):
    """The sweep resumes a partly written job with ``write=``: same batch, same bits."""
    cfgs = [build_run_config("klpen-adaptive", "Hopper", s, frames=TINY_FRAMES, overrides=TINY)
            for s in (0, 1)]
    whole = execute_batch(cfgs, tmp_path / "whole", progress=False)
    exp = tmp_path / "resumed"
    first = execute_batch(cfgs, exp, progress=False)
    done_at = first[0].status()["done_at"]
    first[1].start(cfgs[1].to_dict())  # as if killed after seed 0 was written, before seed 1
    runs = execute_batch(cfgs, exp, progress=False, write=[True, True])
    assert runs[0].status()["done_at"] == done_at and runs[0].status()["attempts"] == 1
    assert runs[1].status()["attempts"] == 3 and runs[1].state() == "done"
    assert runs[1].status()["provenance"]["batch_seeds"] == [0, 1]
    for table in ("metrics", "episodes", "evals"):
        got, want = runs[1].table(table), whole[1].table(table)
        timing = [c for c in TIMING if c in got.columns]
        pd.testing.assert_frame_equal(got.drop(columns=timing), want.drop(columns=timing),
                                      check_exact=True)


def test_flat_parameter_buffer_gives_adam_bit_identical_to_separate_tensors():
    """The engine keeps its stacked parameters and grads in one aligned buffer each and runs
    one single-tensor Adam: forward passes and Adam steps equal those of separate tensors bit
    for bit, and a parameter that never gets a gradient stays exactly where it was."""
    models = [init_seed_models(OBS, ACT, build_run_config("clip", "Hopper", s).model,
                               get_variant("clip").distribution_class, s)[0] for s in SEEDS]
    cfg = build_run_config("clip", "Hopper", 0).model
    nets_a = StackedActorCritic.from_models(models, cfg)
    nets_b = StackedActorCritic.from_models(models, cfg)
    params_a, params_b = list(nets_a.parameters()), list(nets_b.parameters())
    flat, _ = flatten_parameters(params_b)
    assert all(p.data_ptr() % 64 == 0 for p in params_b)  # aligned like separate tensors
    opt_a = torch.optim.Adam(params_a, lr=3e-3, foreach=True)
    opt_b = torch.optim.Adam([flat], lr=3e-3)
    obs = torch.randn(len(SEEDS), B, OBS, generator=torch.Generator().manual_seed(0))
    critic_before = [p.detach().clone() for p in nets_b.critic_w]
    for _ in range(5):
        assert torch.equal(nets_a.loc(obs), nets_b.loc(obs))
        opt_a.zero_grad(set_to_none=True)
        flat.grad.zero_()
        nets_a.loc(obs).square().mean().backward()  # the critic gets no gradient
        nets_b.loc(obs).square().mean().backward()
        assert flat.grad.data_ptr() == params_b[0].grad.data_ptr()  # accumulated in place
        opt_a.step()
        opt_b.step()
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)
    for before, after in zip(critic_before, nets_b.critic_w):
        assert torch.equal(before, after)


def test_lanes_with_their_own_step_sizes_step_like_separate_adams():
    """Lanes that differ in ``train.lr``: one Adam group per lane; each lane's parameters
    follow a separate torch Adam with that step size, bit for bit, with annealing."""
    cfg = build_run_config("clip", "Hopper", 0)
    models = [init_seed_models(OBS, ACT, cfg.model, get_variant("clip").distribution_class, s)[0]
              for s in SEEDS]
    nets = StackedActorCritic.from_models(models, cfg.model)
    params = list(nets.parameters())
    separate = [[p[s].detach().clone().requires_grad_(True) for p in params] for s in SEEDS]
    lrs = [1e-3, 3e-4, 3e-3]
    optim = LaneAdam(params, lrs)
    refs = [torch.optim.Adam(ps, lr=lr) for ps, lr in zip(separate, lrs)]
    obs = torch.randn(len(SEEDS), B, OBS, generator=torch.Generator().manual_seed(0))
    for step in range(4):
        for group in optim.param_groups:
            group["lr"] = group["base_lr"] * (1 - step / 4)
        for s, ref in enumerate(refs):
            ref.param_groups[0]["lr"] = lrs[s] * (1 - step / 4)
        optim.zero_grad()
        nets.loc(obs).square().mean(dim=(1, 2)).sum().backward()
        for s, ps in enumerate(separate):
            for p, q in zip(ps, params):
                p.grad = q.grad[s].clone()
        optim.step()
        for ref in refs:
            ref.step()
        assert optim.lane_lrs() == [lr * (1 - step / 4) for lr in lrs]
    for s, ps in enumerate(separate):
        for p, q in zip(ps, params):
            assert torch.equal(p, q[s])


class _Stop(Exception):
    pass


@pytest.mark.parametrize("variant", ["klpen-adaptive-mc", "clip"])
def test_a_job_resumed_from_its_checkpoint_matches_the_uninterrupted_job(tmp_path, variant):
    """Interrupted after iteration 3 with a checkpoint written after iteration 2 (every 2):
    the resumed job redoes only iteration 3 and its metrics, episodes and evaluations equal
    the uninterrupted job's bit for bit (timing aside); env states, RNG streams, beta, Adam
    and observation statistics all came back. Evaluations run on their own env streams."""
    from klppo_bench.harness.batched.checkpoint import Checkpointing

    overrides = {**TINY, "eval.every": 512, "eval.episodes": 2, "beta_schedule": "minibatch"}
    if variant == "clip":
        overrides.pop("beta_schedule")
    cfgs = [build_run_config(variant, "Hopper", s, frames=6 * 256, overrides=overrides)
            for s in (0, 1)]
    whole = train_batched(cfgs, progress=False)
    path = tmp_path / "job.pt"
    seen = []

    def stop_at_iteration_3(k, row):
        seen.append(row["iteration"])
        if row["iteration"] == 3:
            raise _Stop

    with pytest.raises(_Stop):
        train_batched(cfgs, progress=False, on_iteration=stop_at_iteration_3,
                      checkpoint=Checkpointing(path, every=2))
    assert path.is_file()
    ckpt = Checkpointing(path, every=2)
    resumed = train_batched(cfgs, progress=False, checkpoint=ckpt)
    assert ckpt.resumed_iteration == 2
    for a, b in zip(whole, resumed):
        pd.testing.assert_frame_equal(_deterministic(a.metrics), _deterministic(b.metrics),
                                      check_exact=True)
        pd.testing.assert_frame_equal(a.episodes, b.episodes, check_exact=True)
        pd.testing.assert_frame_equal(a.evals, b.evals, check_exact=True)
        assert len(b.evals) == 3 * 2  # at 512, 1024 and 1536 frames, 2 episodes each


def test_a_checkpoint_of_other_runs_is_refused_in_one_line(tmp_path):
    from klppo_bench.harness.batched.checkpoint import Checkpointing

    cfgs = [build_run_config("clip", "Hopper", s, frames=2 * 256, overrides=TINY) for s in (0, 1)]
    path = tmp_path / "job.pt"
    torch.save({"run_ids": ["someone-else"], "versions": {}}, path)
    said = []
    ckpt = Checkpointing(path, every=1, say=said.append)
    got = train_batched(cfgs, progress=False, checkpoint=ckpt)
    assert len(said) == 1 and said[0].startswith(f"checkpoint {path} refused: it belongs to "
                                                 "other runs; the job starts over")
    assert path.with_name("job.pt.refused").is_file()  # kept aside, not lost
    assert ckpt.resumed_iteration is None
    want = train_batched(cfgs, progress=False)
    for a, b in zip(want, got):
        pd.testing.assert_frame_equal(_deterministic(a.metrics), _deterministic(b.metrics),
                                      check_exact=True)
    path.write_bytes(b"not a checkpoint")
    said.clear()
    Checkpointing(path, say=said.append).load([c.run_id() for c in cfgs])
    assert len(said) == 1 and "cannot be read" in said[0] and not path.exists()
    assert path.with_name("job.pt.refused").read_bytes() == b"not a checkpoint"


@pytest.mark.parametrize("env_id", ["Ant-v5", "Hopper-v5"])
def test_a_restored_mujoco_env_steps_exactly_like_the_original(env_id):
    """Ant reads quantities left from the previous step (xpos): the checkpoint copies the whole
    MjData, so a restored env gives the original's next rewards and observations exactly."""
    import gymnasium as gym

    from klppo_bench.harness.batched.checkpoint import set_sub_env_state, sub_env_state

    original, other = gym.make(env_id), gym.make(env_id)
    original.reset(seed=0)
    other.reset(seed=5)
    rng = np.random.default_rng(0)
    for _ in range(7):
        original.step(rng.uniform(-1, 1, original.action_space.shape))
    set_sub_env_state(other, sub_env_state(original))
    for _ in range(5):
        action = rng.uniform(-1, 1, original.action_space.shape)
        a, b = original.step(action), other.step(action)
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1] == b[1] and a[2] == b[2] and a[3] == b[3]
    a, b = original.reset(), other.reset()  # gymnasium's own generator came back too
    np.testing.assert_array_equal(a[0], b[0])


def test_lanes_whose_modules_differ_in_any_python_attribute_never_share_a_job():
    """Not only plain numbers: a list or dict attribute, on the loss or on a module inside it,
    that differs between lanes makes the lanes' structures differ (so the planner never packs
    them into one module object)."""
    from klppo_bench.harness.batched.lanes import lane_state_differences, loss_structure

    cfg = build_run_config("clip", "Hopper", 0)
    v = get_variant("clip")

    def loss(seed, **attrs):
        m = init_seed_models(OBS, ACT, cfg.model, v.distribution_class, seed)[0]
        out = v.build_loss(m.loss_actor, m.loss_critic, cfg.loss)
        for key, value in attrs.items():
            target, _, name = key.rpartition("__")
            setattr(out if not target else getattr(out, target), name, value)
        return out

    assert lane_state_differences([loss(0), loss(1)]) == []
    assert loss_structure(loss(0)) == loss_structure(loss(1))
    for attrs in ({"weights": [1.0]}, {"cfg": {"c": 1}}, {"actor_network__temperature": 1.0}):
        changed = {k: (v + [5.0] if isinstance(v, list) else {"c": 2} if isinstance(v, dict)
                       else 2.0) for k, v in attrs.items()}
        a, b = loss(0, **attrs), loss(1, **changed)
        assert lane_state_differences([a, b]), attrs
        assert loss_structure(a) != loss_structure(b), attrs

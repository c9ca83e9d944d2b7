"""The registry's losses are torchrl's, and each takes the KL path and beta rule it claims."""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from torch import distributions as D
from torchrl.modules.distributions import has_analytic_kl
from torchrl.objectives import ClipPPOLoss, KLPENPPOLoss, PPOLoss

from klppo_bench.config import ModelConfig
from klppo_bench.errors import ConfigError
from klppo_bench.harness.models import build_models
from klppo_bench.variants import JointNormal, JointNormalMC, Param, Variant, all_variants, get_variant, register
from klppo_bench.variants.beta import IterationBeta
from klppo_bench.variants.distributions import joint_normal_kl

OBS, ACT, N = 5, 3, 512
EXPECTED = {
    "clip": (ClipPPOLoss, "none", "none"),
    "no-clip": (PPOLoss, "none", "none"),
    "klpen-adaptive": (KLPENPPOLoss, "analytic", "adaptive"),
    "klpen-adaptive-mc": (KLPENPPOLoss, "monte-carlo", "adaptive"),
    "klpen-fixed": (KLPENPPOLoss, "analytic", "fixed"),
    "klpen-fixed-mc": (KLPENPPOLoss, "monte-carlo", "fixed"),
}


def make_loss(name: str, **overrides):
    """The loss exactly as the harness builds it, on a small actor/critic."""
    torch.manual_seed(0)
    v = get_variant(name)
    params = v.resolve(overrides)
    models = build_models(OBS, ACT, ModelConfig(), v.distribution_class)
    return v, params, models, v.build_loss(models.loss_actor, models.loss_critic, params)


def set_policy_mean(models, delta: float, log_std: float = 0.0):
    """Make the current policy N(delta * 1, exp(log_std)) for every observation."""
    actor_net = models.policy.module[0].module
    head = actor_net[1]
    with torch.no_grad():
        head[0].weight.zero_()
        head[0].bias.fill_(delta)
        for p in head[1].parameters():
            p.fill_(log_std)


def batch(old_loc=0.0, old_scale=1.0, n=N, seed=0):
    """A batch whose behaviour policy was N(old_loc, old_scale) with GAE already computed."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.full((n, ACT), old_loc)
    scale = torch.full((n, ACT), old_scale)
    action = loc + scale * torch.randn(n, ACT, generator=g)
    logp = D.Independent(D.Normal(loc, scale), 1).log_prob(action)
    return TensorDict({
        "observation": torch.randn(n, OBS, generator=g),
        "action": action, "loc": loc, "scale": scale, "action_log_prob": logp,
        "advantage": torch.randn(n, 1, generator=g), "value_target": torch.randn(n, 1, generator=g),
        "next": {"observation": torch.randn(n, OBS, generator=g), "reward": torch.zeros(n, 1),
                 "done": torch.zeros(n, 1, dtype=torch.bool),
                 "terminated": torch.zeros(n, 1, dtype=torch.bool)},
    }, batch_size=[n])


def test_builtins_registered():
    assert set(EXPECTED) <= set(all_variants())


@pytest.mark.parametrize("name", sorted(all_variants()))
def test_each_variant_builds_its_torchrl_class(name):
    v, params, models, loss = make_loss(name)
    if name in EXPECTED:
        cls, kl, rule = EXPECTED[name]
        assert type(loss) is cls
        assert (v.kl_estimator, v.beta_rule) == (kl, rule)
    assert isinstance(loss, v.loss_class)
    out = loss(batch())
    total = sum(val for k, val in out.items() if k.startswith("loss_"))
    assert torch.isfinite(total)
    # paper defaults, not torchrl's: squared-error critic, no entropy bonus
    assert loss.loss_critic_type == "l2" and loss.entropy_bonus is False
    if hasattr(loss, "beta"):
        assert loss.beta.dtype == torch.float32


def test_clip_epsilon_reaches_torchrl():
    _, _, _, loss = make_loss("clip", clip_epsilon=0.1)
    assert float(loss.clip_epsilon) == pytest.approx(0.1)
    assert float(loss._clip_bounds[1]) == pytest.approx(math.log1p(0.1))


@pytest.mark.parametrize("name", ["klpen-adaptive", "klpen-fixed"])
def test_analytic_kl_equals_closed_form_joint_kl(name):
    _, _, models, loss = make_loss(name)
    set_policy_mean(models, 0.3, log_std=-0.2)
    td = batch(old_loc=0.1, old_scale=0.9)
    dist = models.policy.get_dist(td.select("observation").clone())
    assert isinstance(dist, JointNormal)
    assert has_analytic_kl(dist, dist)
    kl = loss(td)["kl"].reshape(-1)
    new_loc, new_scale = torch.full((ACT,), 0.3), torch.full((ACT,), math.exp(-0.2))
    # closed form of KL(N(0.1, 0.9^2) || N(0.3, e^-0.4)) summed over the 3 action dims
    per_dim = math.log(new_scale[0] / 0.9) + (0.9**2 + 0.2**2) / (2 * new_scale[0] ** 2) - 0.5
    assert torch.allclose(kl, torch.full_like(kl, ACT * float(per_dim)), rtol=1e-5)
    assert torch.allclose(kl, joint_normal_kl(td["loc"], td["scale"], new_loc.expand(N, ACT),
                                              new_scale.expand(N, ACT)), rtol=1e-5)


@pytest.mark.parametrize("name", ["klpen-adaptive-mc", "klpen-fixed-mc"])
def test_monte_carlo_kl_is_random_and_converges_to_closed_form(name):
    _, _, models, loss = make_loss(name, samples_mc_kl=4)
    set_policy_mean(models, 0.3, log_std=-0.2)
    td = batch(old_loc=0.1, old_scale=0.9)
    dist = models.policy.get_dist(td.select("observation").clone())
    assert isinstance(dist, JointNormalMC) and not has_analytic_kl(dist, dist)
    exact = float(joint_normal_kl(td["loc"], td["scale"], torch.full((N, ACT), 0.3),
                                  torch.full((N, ACT), math.exp(-0.2))).mean())
    beta0 = float(loss.beta)
    estimates = []
    for _ in range(200):
        loss.beta.fill_(beta0)
        estimates.append(float(loss(td)["kl"].mean()))
    est = torch.tensor(estimates)
    assert est.std() > 1e-4  # differs from call to call: a Monte-Carlo estimate
    assert len(set(estimates)) == len(estimates)
    stderr = float(est.std()) / math.sqrt(len(est))
    assert abs(float(est.mean()) - exact) < 4 * stderr + 1e-4, (float(est.mean()), exact)


def _call(v, params, loss, td=None):
    """One loss call as both engines make it: forward, then the schedule's per-call hook."""
    out = loss(td if td is not None else batch())
    v.beta_schedule(params).after_loss(loss.beta, float(out["kl"].mean()), params)
    return out


def _beta_after(made, kl_ratio: float, dtarg: float = 0.01) -> float:
    """One loss call on a batch whose analytic KL is kl_ratio * dtarg."""
    v, params, models, loss = made
    # KL(N(0,1) || N(d,1)) over ACT dims = ACT * d^2 / 2
    delta = math.sqrt(2 * kl_ratio * dtarg / ACT)
    set_policy_mean(models, delta)
    _call(v, params, loss)
    return float(loss.beta)


@pytest.mark.parametrize("ratio, factor", [(1.5 * 1.01, 2.0), (1.5 * 0.99, 1.0), (1.0, 1.0),
                                           (1 / 1.5 * 1.01, 1.0), (1 / 1.5 * 0.99, 0.5)])
def test_minibatch_schedule_doubles_and_halves_at_torchrl_thresholds(ratio, factor):
    made = make_loss("klpen-adaptive", beta_schedule="minibatch", beta=1.0)
    assert _beta_after(made, ratio) == pytest.approx(factor)
    assert _beta_after(made, ratio) == pytest.approx(factor**2)  # every call moves it


@pytest.mark.parametrize("name", ["klpen-adaptive", "klpen-adaptive-mc", "klpen-fixed"])
def test_the_loss_itself_never_moves_beta(name):
    """torchrl's in-forward rule is switched off (dtarg = nan, increment = decrement = 1):
    the schedule is the only rule, in both engines, while the run keeps its own dtarg."""
    _, params, models, loss = make_loss(name, beta=1.0)
    assert math.isnan(loss.dtarg) and loss.increment == loss.decrement == 1.0
    assert params["dtarg"] == 0.01
    for delta in (0.0, 1.0):  # KL far below and far above dtarg
        set_policy_mean(models, delta)
        loss(batch())
        assert float(loss.beta) == 1.0


def test_minibatch_schedule_gradient_uses_the_new_beta():
    """torchrl's in-place beta update, kept by the minibatch schedule's hook (between forward
    and backward, through ``.data``): the gradient of that minibatch uses the new beta.

    objective = surrogate + beta * KL; with KL = 3 dtarg beta doubles 1 -> 2 after the call.
    d(mean KL)/d(bias) = delta per action dim, so grad(total) - grad(surrogate) = 2 * delta.
    """
    delta = math.sqrt(2 * 3 * 0.01 / ACT)
    td = batch()
    v, params, models, loss = make_loss("klpen-adaptive", beta_schedule="minibatch", beta=1.0)
    set_policy_mean(models, delta)
    bias = models.policy.module[0].module[1][0].bias
    grad_total = torch.autograd.grad(_call(v, params, loss, td)["loss_objective"], bias)[0]
    assert float(loss.beta) == 2.0
    _, _, m0, surrogate_only = make_loss("klpen-fixed", beta=0.0)
    set_policy_mean(m0, delta)
    bias0 = m0.policy.module[0].module[1][0].bias
    grad_surrogate = torch.autograd.grad(surrogate_only(td)["loss_objective"], bias0)[0]
    assert torch.allclose(grad_total - grad_surrogate, torch.full((ACT,), 2.0 * delta), atol=1e-5)


def test_iteration_schedule_moves_beta_once_per_iteration():
    v, params, models, loss = make_loss("klpen-adaptive", beta_schedule="iteration", beta=1.0)
    schedule = v.beta_schedule(params)
    assert isinstance(schedule, IterationBeta)
    delta = math.sqrt(2 * 3 * 0.01 / ACT)  # KL = 3 dtarg
    set_policy_mean(models, delta)
    for _ in range(10):
        _call(v, params, loss)
    assert float(loss.beta) == 1.0  # no change inside the epochs
    schedule.after_iteration(loss.beta, 3 * 0.01, params)
    assert float(loss.beta) == 2.0
    schedule.after_iteration(loss.beta, 0.01 / 3, params)
    assert float(loss.beta) == 1.0
    schedule.after_iteration(loss.beta, 0.01, params)
    assert float(loss.beta) == 1.0


@pytest.mark.parametrize("name", ["klpen-fixed", "klpen-fixed-mc"])
def test_fixed_beta_never_moves(name):
    v, params, models, loss = make_loss(name, beta=3.0)
    for delta in (0.0, 0.01, 1.0, 3.0):
        set_policy_mean(models, delta)
        for _ in range(3):
            _call(v, params, loss)
        v.beta_schedule(params).after_iteration(loss.beta, 100.0, params)
    assert float(loss.beta) == 3.0


def test_integer_beta_is_stored_as_float():
    v, params, models, loss = make_loss("klpen-adaptive", beta="1", beta_schedule="minibatch")
    assert isinstance(params["beta"], float) and loss.beta.dtype == torch.float32
    set_policy_mean(models, 1.0)
    _call(v, params, loss)
    assert float(loss.beta) == 2.0


@pytest.mark.parametrize("name, key, value, needle", [
    ("klpen-adaptive", "increment", "0.5", "increment"),
    ("klpen-adaptive", "decrement", "1.5", "decrement"),
    ("klpen-adaptive", "dtarg", "0", "dtarg"),
    ("klpen-adaptive", "dtarg", "abc", "dtarg"),
    ("klpen-adaptive-mc", "samples_mc_kl", "0", "samples_mc_kl"),
    ("klpen-adaptive", "beta_schedule", "epoch", "minibatch, iteration"),
    ("clip", "clip_epsilon", "1.5", "clip_epsilon"),
    ("clip", "loss_critic_type", "huber", "l1, l2, smooth_l1"),
    ("klpen-fixed", "increment", "2", "pinned"),
    ("klpen-adaptive", "samples_mc_kl", "4", "allowed:"),
    ("clip", "dtarg", "0.1", "allowed:"),
])
def test_bad_parameters_are_rejected_with_allowed_values(name, key, value, needle):
    with pytest.raises(ConfigError) as err:
        get_variant(name).resolve({key: value})
    msg = str(err.value)
    assert key in msg and needle in msg and "\n" not in msg


def test_aliases_and_duplicate_names():
    params = get_variant("clip").resolve({"entropy_coef": "0.01", "critic_coef": "0.5"})
    assert params["entropy_coeff"] == 0.01 and params["critic_coeff"] == 0.5
    with pytest.raises(ConfigError, match="registered twice: by built-in"):
        register(get_variant("clip"))


def test_user_variant_registers_without_forking():
    v = Variant(name="test-clip-0.1", loss_class=ClipPPOLoss, description="user variant",
                kl_estimator="none", beta_rule="none",
                params={"clip_epsilon": Param(0.1, float, "eps", low=0.0, low_open=True)})
    if "test-clip-0.1" not in all_variants():
        register(v)
    assert get_variant("test-clip-0.1").resolve()["clip_epsilon"] == 0.1


def test_a_variant_with_only_its_own_parameter_trains_with_clips_common_values():
    """Registered without COMMON, a variant still gets the harness's setup (no entropy bonus,
    squared-error value loss, advantage normalization, ...), not torchrl's defaults."""
    own = Variant(name="own-param-only", loss_class=ClipPPOLoss, description="user variant",
                  kl_estimator="none", beta_rule="none",
                  params={"clip_epsilon": Param(0.1, float, "eps", low=0.0, low_open=True)})
    clip = get_variant("clip")
    resolved, clip_resolved = own.resolve(), clip.resolve()
    assert set(resolved) == set(clip_resolved)
    assert {k: v for k, v in resolved.items() if k != "clip_epsilon"} == \
        {k: v for k, v in clip_resolved.items() if k != "clip_epsilon"}
    assert own.resolve({"entropy_coef": 0.01})["entropy_coeff"] == 0.01  # common aliases too
    models = build_models(OBS, ACT, ModelConfig(), own.distribution_class)
    loss = own.build_loss(models.loss_actor, models.loss_critic, resolved)
    assert (loss.entropy_bonus, loss.loss_critic_type, loss.normalize_advantage) == (False, "l2",
                                                                                    True)
    assert float(loss.critic_coeff) == 1.0 and float(loss.entropy_coeff) == 0.0
    assert own.param_origin("clip_epsilon") == "variant"
    assert own.param_origin("entropy_bonus") == "common"
    assert clip.param_origin("loss_critic_type") == "common"
    # an explicit override wins and says so; common={} opts out (a non-PPOLoss loss class)
    smooth = Variant(name="x", loss_class=ClipPPOLoss, description="", kl_estimator="none",
                     beta_rule="none", params={"loss_critic_type": Param(
                         "smooth_l1", str, "value loss", choices=("l2", "smooth_l1"))})
    assert smooth.resolve()["loss_critic_type"] == "smooth_l1"
    assert smooth.param_origin("loss_critic_type") == "variant, common default 'l2'"
    bare = Variant(name="y", loss_class=ClipPPOLoss, description="", kl_estimator="none",
                   beta_rule="none", params={}, common={})
    assert bare.resolve() == {} and bare.aliases == {}


def test_variants_params_says_where_each_value_comes_from(capsys):
    from klppo_bench.cli import main

    assert main(["variants", "--params"]) == 0
    out = capsys.readouterr().out
    assert "  clip_epsilon = 0.2  (float > 0.0 and < 1.0)  [variant]  clip range epsilon" in out
    assert "  entropy_bonus = False  (true or false)  [common]  add an entropy bonus" in out

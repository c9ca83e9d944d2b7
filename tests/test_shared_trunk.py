"""Shared actor-critic trunk: both torchrl wirings, ``separate_losses``, every variant.

Gradients are compared on one forward pass (``torch.autograd.grad`` of each loss term, then
one ``backward`` of the total), so Monte-Carlo KL samples and beta are the same for all of them.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from klppo_bench.config import ModelConfig, build_run_config
from klppo_bench.harness.models import build_models
from klppo_bench.harness.reference import train
from klppo_bench.variants import all_variants, get_variant

from tests.conftest import TINY, TINY_FRAMES

OBS, ACT, N = 5, 3, 64
WIRINGS = ("operator", "single-call")
VARIANTS = sorted(all_variants())


def shared_models(name: str, wiring: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_models(OBS, ACT, ModelConfig(trunk="shared", wiring=wiring),
                        get_variant(name).distribution_class)


def shared_loss(name: str, wiring: str, **overrides):
    v = get_variant(name)
    models = shared_models(name, wiring)
    return models, v.build_loss(models.loss_actor, models.loss_critic, v.resolve(overrides))


def trunk_params(models) -> list[torch.nn.Parameter]:
    return list(common_module(models).parameters())


def common_module(models):
    return models.value.module[0]  # ActorValueOperator.get_value_operator() = (common, head)


def batch(seed: int = 0) -> TensorDict:
    """A minibatch from a behaviour policy unlike the current one, with a stale ``hidden``.

    The stored ``hidden`` and ``state_value`` are garbage: a loss that read them instead of
    the trunk's fresh output would give different numbers than the operator wiring.
    """
    g = torch.Generator().manual_seed(seed)
    loc = 0.3 * torch.randn(N, ACT, generator=g)
    scale = torch.full((N, ACT), 0.8)
    action = loc + scale * torch.randn(N, ACT, generator=g)
    logp = torch.distributions.Independent(torch.distributions.Normal(loc, scale), 1).log_prob(action)
    return TensorDict({
        "observation": torch.randn(N, OBS, generator=g),
        "action": action, "loc": loc, "scale": scale, "action_log_prob": logp,
        "advantage": torch.randn(N, 1, generator=g),
        "value_target": torch.randn(N, 1, generator=g),
        "hidden": 100 * torch.randn(N, 64, generator=g),
        "state_value": 100 * torch.randn(N, 1, generator=g),
    }, batch_size=[N])


def grads(terms, params):
    """Gradient of ``sum(terms)`` on ``params`` (zeros where the graph does not reach)."""
    total = sum(terms)
    gs = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


@pytest.mark.parametrize("wiring", WIRINGS)
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("separate", [True, False])
def test_separate_losses_decides_what_trains_the_trunk(name, wiring, separate):
    models, loss = shared_loss(name, wiring, separate_losses=separate,
                               entropy_bonus=True, entropy_coeff=0.01)
    trunk = trunk_params(models)
    value_head = list(models.value.module[1].parameters())
    torch.manual_seed(1)
    out = loss(batch())
    policy_terms = [out[k] for k in out.keys() if k.startswith("loss_") and k != "loss_critic"]
    assert {"loss_objective", "loss_entropy"} <= set(out.keys())
    g_policy = grads(policy_terms, trunk)
    g_critic = grads([out["loss_critic"]], trunk)
    critic_norm = sum(float(g.norm()) for g in g_critic)
    # the critic always trains its own head
    assert all(float(g.norm()) > 0 for g in grads([out["loss_critic"]], value_head))

    total = sum(v for k, v in out.items() if k.startswith("loss_"))
    total.backward()
    expected = g_policy if separate else [a + b for a, b in zip(g_policy, g_critic)]
    for p, g in zip(trunk, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    if separate:
        assert critic_norm == 0.0
    else:  # the two cases really differ
        assert critic_norm > 1e-3


@pytest.mark.parametrize("name", VARIANTS)
def test_single_call_runs_the_trunk_once_less_and_gives_the_same_losses(name):
    """The critic adds a trunk pass in the operator wiring and none in the single-call one;
    losses and gradients are the same.

    torchrl's PPOLoss / ClipPPOLoss evaluate the actor once per forward, so the trunk runs
    2x (operator) vs 1x (single-call); KLPENPPOLoss evaluates the actor twice (ratio, then
    KL), so 3x vs 2x. The count is measured on the actor head, not assumed.
    """
    data = batch()
    results = {}
    op_models = None
    for wiring in WIRINGS:
        models, loss = shared_loss(name, wiring)
        if op_models is None:
            op_models = models
        else:  # same weights, copied, not just the same seed
            with torch.no_grad():
                for p in models.modules.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            models.modules.load_state_dict(op_models.modules.state_dict())
        calls = {"trunk": 0, "actor_head": 0, "value_head": 0}
        hooks = [m.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
                 for key, m in (("trunk", common_module(models)),
                                ("actor_head", models.policy.module[1]),
                                ("value_head", models.value.module[1]))]
        torch.manual_seed(1)
        out = loss(data.clone())
        for h in hooks:
            h.remove()
        sum(v for k, v in out.items() if k.startswith("loss_")).backward()
        results[wiring] = (out, calls, [p.grad for p in models.modules.parameters()])
    (op, op_calls, op_grads), (sc, sc_calls, sc_grads) = results["operator"], results["single-call"]
    assert sc_calls["value_head"] == op_calls["value_head"] == 1
    assert sc_calls["actor_head"] == op_calls["actor_head"] >= 1
    assert sc_calls["trunk"] == sc_calls["actor_head"]
    assert op_calls["trunk"] == op_calls["actor_head"] + 1
    if name in ("clip", "no-clip"):
        assert (op_calls["trunk"], sc_calls["trunk"]) == (2, 1)
    for key in ("loss_objective", "loss_critic", "explained_variance"):
        torch.testing.assert_close(sc[key], op[key], rtol=1e-6, atol=1e-7)
    if "kl" in op.keys():
        torch.testing.assert_close(sc["kl"], op["kl"])
    assert all(g is not None for g in sc_grads + op_grads)
    for g_sc, g_op in zip(sc_grads, op_grads, strict=True):
        torch.testing.assert_close(g_sc, g_op, rtol=1e-5, atol=1e-7)


def test_critic_reads_the_fresh_hidden_not_the_stored_one():
    """A stale ``hidden`` in the batch (the collector and GAE store one) changes nothing."""
    _, loss = shared_loss("clip", "single-call")
    with_stale = loss(batch())["loss_critic"]
    without = loss(batch().exclude("hidden"))["loss_critic"]
    torch.testing.assert_close(with_stale, without, rtol=0, atol=0)


@pytest.mark.parametrize("wiring", WIRINGS)
def test_deterministic_dist_of_the_shared_policy(wiring):
    """The train loop's diagnostics path: ``policy.get_dist(td)`` writes loc and scale."""
    models = shared_models("klpen-adaptive", wiring)
    td = batch().select("observation").clone()
    dist = models.policy.get_dist(td)
    torch.testing.assert_close(dist.mean, td["loc"])
    assert td["scale"].shape == (N, ACT) and bool((td["scale"] > 0).all())
    assert "hidden" in td.keys()


@pytest.mark.parametrize("wiring", WIRINGS)
@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_trains_with_a_shared_trunk(name, wiring):
    overrides = {**TINY, "train.epochs": 1, "model.trunk": "shared", "model.wiring": wiring,
                 "separate_losses": name in ("clip", "klpen-adaptive")}
    cfg = build_run_config(name, "Hopper", 0, frames=TINY_FRAMES, overrides=overrides)
    result = train(cfg, progress=False)
    m = result.metrics
    assert len(m) == 2
    assert m[["loss_objective", "loss_critic", "kl_batch", "grad_norm"]].notna().all().all()
    assert (m["kl_batch"] > 0).all()  # the policy moved

"""The batched engine's recorded loss calls (``harness/batched/replay.py``): which calls are
replayed, and that a replay follows the data and the gradient rules of the eager module."""

from __future__ import annotations

import torch
from torchrl.objectives import ClipPPOLoss

from klppo_bench.config import build_run_config
from klppo_bench.harness.batched import build_lanes
from klppo_bench.harness.batched.lanes import LaneLoss
from klppo_bench.harness.batched.nets import (
    StackedActorCritic,
    init_seed_models,
    reference_parameters,
)
from klppo_bench.harness.batched.replay import Recording
from klppo_bench.variants import get_variant

from tests.test_batched import ACT, OBS, SEEDS, _data, _total


def _lanes(loss_class):
    """Lanes of ``loss_class`` over the clip variant's networks, and reference modules built
    on separate copies of each lane's networks."""
    cfg = build_run_config("clip", "Hopper", 0)
    v = get_variant("clip")
    models = [init_seed_models(OBS, ACT, cfg.model, v.distribution_class, s)[0] for s in SEEDS]
    refs = [init_seed_models(OBS, ACT, cfg.model, v.distribution_class, s)[0] for s in SEEDS]
    nets = StackedActorCritic.from_models(models, cfg.model)
    shared = {id(p): q for p, q in zip(reference_parameters(models[0]),
                                       nets.ordered_parameters())}
    lanes = LaneLoss([loss_class(m.loss_actor, m.loss_critic) for m in models], shared,
                     [torch.Generator().manual_seed(s) for s in SEEDS])
    return nets, lanes, [(loss_class(m.loss_actor, m.loss_critic), reference_parameters(m))
                         for m in refs]


def _recorded(lanes: LaneLoss) -> list[bool]:
    return [isinstance(r, Recording) for r in lanes._recordings.values()]


def _assert_lanes_match_references(nets, lanes, refs, data):
    out = lanes(data)
    grads = torch.autograd.grad(_total(out).sum(), nets.ordered_parameters(), allow_unused=True)
    for s, (module, params) in enumerate(refs):
        ref = module(data[s])
        torch.testing.assert_close(out["loss_objective"][s], ref["loss_objective"],
                                   rtol=1e-5, atol=1e-6)
        ref_grads = torch.autograd.grad(_total(ref), params, allow_unused=True)
        for i, (g, rg) in enumerate(zip(grads, ref_grads)):
            if rg is None:
                assert g is None or not g[s].any()
            else:
                torch.testing.assert_close(g[s], rg, rtol=1e-4, atol=1e-6,
                                           msg=f"grad of param {i} lane {s}")


def test_calls_with_gradients_are_replayed_random_draws_and_no_grad_calls_are_not():
    """clip and the analytic KL penalty are recorded on their first call with gradients; the
    Monte-Carlo KL (random draws from each lane's stream) and calls without gradients run the
    module eagerly; the KL-penalty recording computes the actor network once, not twice."""
    data_gen = torch.Generator().manual_seed(0)
    for variant, recorded in (("clip", True), ("klpen-adaptive", True),
                              ("klpen-adaptive-mc", False)):
        cfgs = [build_run_config(variant, "Hopper", s) for s in SEEDS]
        nets, lanes, _ = build_lanes(cfgs, OBS, ACT, torch.device("cpu"))
        data = _data(nets, 0.1, data_gen, lanes.module.tensor_keys.sample_log_prob)
        with torch.no_grad():
            lanes(data)
        assert _recorded(lanes) == [], variant
        lanes(data)
        lanes(data)
        assert _recorded(lanes) == [recorded], variant
        if variant == "klpen-adaptive":
            recording = next(iter(lanes._recordings.values()))
            layers = [n for n in recording.graph.nodes
                      if n.target is torch.ops.aten.baddbmm.default]
            assert len(layers) == 6, "3 actor + 3 critic layers (the module runs the actor twice)"


def test_a_replayed_branch_follows_the_data():
    """A Python ``if`` on the data inside the loss: recorded with one answer, the replay is
    used only while every lane still gives it; other calls run the module, one lane at a time
    when the lanes' answers differ, so every lane always takes the branch its own module would
    (losses and gradients equal to each lane's own module)."""

    class BranchyLoss(ClipPPOLoss):
        def forward(self, tensordict):
            out = super().forward(tensordict)
            if tensordict["advantage"].mean() > 0:
                out.set("loss_objective", out["loss_objective"] * 2)
            return out

    nets, lanes, refs = _lanes(BranchyLoss)
    gen = torch.Generator().manual_seed(3)
    for shift in ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (-1.0, -1.0, -1.0), (1.0, -1.0, 1.0)):
        data = _data(nets, 0.1, gen, "action_log_prob")
        adv = data["advantage"]
        data["advantage"] = adv - adv.mean(dim=(1, 2), keepdim=True) \
            + torch.tensor(shift)[:, None, None]
        _assert_lanes_match_references(nets, lanes, refs, data)
    assert _recorded(lanes) == [True]


def test_a_no_grad_block_inside_the_loss_stays_without_gradient_in_the_replay():
    """The recording is made below autograd; a value computed under ``torch.no_grad()`` in the
    loss (here a weight from the critic) must still pass no gradient to the critic."""

    class WeightedLoss(ClipPPOLoss):
        def forward(self, tensordict):
            out = super().forward(tensordict)
            with torch.no_grad():
                weight = torch.exp(-out["loss_critic"])
            out.set("loss_objective", out["loss_objective"] * weight)
            return out

    nets, lanes, refs = _lanes(WeightedLoss)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        _assert_lanes_match_references(nets, lanes, refs, _data(nets, 0.1, gen, "action_log_prob"))
    assert _recorded(lanes) == [True]


def test_run_records_say_how_many_loss_calls_were_replayed(tmp_path):
    """``status.json`` of a batched run keeps ``loss_calls``: replayed and eager counts, and why
    a call signature was not recorded (the Monte-Carlo KL draws random numbers)."""
    from klppo_bench.harness.batched import execute_batch

    from tests.conftest import TINY, TINY_FRAMES

    minibatches = 2 * (256 // 64)  # epochs x minibatches of one iteration
    for variant in ("clip", "klpen-adaptive-mc"):
        cfgs = [build_run_config(variant, "Hopper", s, frames=TINY_FRAMES, overrides=TINY)
                for s in SEEDS[:2]]
        run = execute_batch(cfgs, tmp_path / variant, progress=False)[0]
        calls = run.status()["loss_calls"]
        iterations = TINY_FRAMES // 256
        if variant == "clip":
            assert calls == {"replayed": iterations * minibatches, "eager": 0,
                             "not_recorded": []}
        else:  # plus one KL estimate per iteration, without gradients
            assert calls["replayed"] == 0
            assert calls["eager"] == iterations * (minibatches + 1)
            assert calls["not_recorded"] == ["the loss draws random numbers"]


def test_a_replay_stops_at_the_guard_that_fails():
    """Ops recorded after a Python read belong to the branch taken while recording; with other
    values they may be invalid (here an out-of-range gather, which the module itself never
    runs). The replay stops at the failed guard and the call runs the module."""

    class GuardedGather(ClipPPOLoss):
        def forward(self, tensordict):
            out = super().forward(tensordict)
            adv = tensordict["advantage"]
            index = (adv > 10).long() * 1000  # out of range wherever an advantage is > 10
            if (index < adv.shape[0]).all():
                out.set("loss_objective", out["loss_objective"] + 0 * adv.gather(0, index).mean())
            return out

    nets, lanes, refs = _lanes(GuardedGather)
    gen = torch.Generator().manual_seed(4)
    for big in (False, False, True):
        data = _data(nets, 0.1, gen, "action_log_prob")
        if big:
            data["advantage"][:, 0] = 50.0
        _assert_lanes_match_references(nets, lanes, refs, data)
    assert lanes.calls == {"replayed": 2, "eager": 1} and _recorded(lanes) == [True]
    # the recording itself returns None at the guard: the invalid gather never runs
    recording = next(iter(lanes._recordings.values()))
    assert recording(lanes._state_leaves, [v for _, v in data.items(True, True)]) is None


def test_a_loss_that_writes_its_batch_in_place_runs_once_per_call_and_is_not_recorded():
    """Recording runs the module more than once; a loss that writes its inputs in place must
    still see, and leave, what one call of its own module leaves."""

    class InPlaceLoss(ClipPPOLoss):
        def forward(self, tensordict):
            tensordict["value_target"].mul_(2.0)
            return super().forward(tensordict)

    nets, lanes, _ = _lanes(InPlaceLoss)
    data = _data(nets, 0.1, torch.Generator().manual_seed(3), "action_log_prob")
    before = data["value_target"].clone()
    lanes(data)
    torch.testing.assert_close(data["value_target"], before * 2, rtol=0, atol=0)
    assert _recorded(lanes) == [False]
    assert lanes.call_counts()["not_recorded"] == [
        "the loss writes its inputs, parameters or buffers in place"]


def test_simplify_keeps_the_sign_of_zero_and_merges_only_identical_ops():
    """Computing identical ops once must not merge ``x * -0.0`` with ``x * 0.0`` (equal in
    Python, not to ``atan2``); truly identical ones are merged."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from klppo_bench.harness.batched.graph import compile_graph, simplify

    def f(x):
        minus_one = torch.full_like(x, -1.0)
        return [torch.atan2(x * -0.0, minus_one), torch.atan2(x * 0.0, minus_one),
                torch.tanh(x) + torch.tanh(x)], []

    x = torch.ones(3)
    graph = make_fx(f, tracing_mode="real")(x).graph
    simplify(graph, [False])
    got = compile_graph(graph)(x)
    for a, b in zip(got, f(x)[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    tanh = [n for n in graph.nodes if n.target is torch.ops.aten.tanh.default]
    assert len(tanh) == 1

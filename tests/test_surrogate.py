"""``@surrogate``: a new objective from its per-sample formula, trained like ``clip`` on both
engines; the output contract (extra outputs recorded, ``loss_objective`` required); loss
constructor errors and cross-parameter checks as config errors (exit 2, one line, nothing
written)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from tensordict import TensorDict
from torchrl.objectives import ClipPPOLoss

from klppo_bench.cli import main
from klppo_bench.config import ModelConfig, build_run_config
from klppo_bench.errors import ConfigError
from klppo_bench.harness.batched import lane_key, train_batched
from klppo_bench.harness.models import build_models
from klppo_bench.harness.reference import train
from klppo_bench.store import read_parquet
from klppo_bench.variants import JointNormalMC, Param, get_variant, load_plugins
from klppo_bench.variants.distributions import joint_normal_kl
from klppo_bench.variants.identity import code_identity
from klppo_bench.variants.outputs import output_problem, recorded_columns
from klppo_bench.variants.surrogate import surrogate_variant

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
DUAL, ROLLBACK, HIGHER = (str(ROOT / "examples" / f) for f in
                          ("dual_clip.py", "rollback.py", "clip_higher.py"))
SUBCLASS = str(ROOT / "tests" / "plugins" / "dual_clip_subclass.py")
TIMING = ["update_seconds", "wall_seconds", "sps"]
OBS, ACT, N = 5, 3, 256


def clip_formula(ratio, advantage, *, clip_epsilon):
    return torch.minimum(ratio * advantage,
                         ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon) * advantage)


def reads_everything(ratio, advantage, *, log_ratio, kl, entropy, weight):
    return ratio * advantage - weight * kl, {"seen_log_ratio": log_ratio, "seen_kl": kl,
                                              "seen_entropy": entropy, "seen_ratio": ratio}


def _models_and_batch(distribution_class, offset=0.3, seed=0):
    """Small networks and a batch whose behaviour policy is ``offset`` away from them."""
    torch.manual_seed(seed)
    models = build_models(OBS, ACT, ModelConfig(), distribution_class)
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(N, OBS, generator=g)
    with torch.no_grad():
        td = models.policy(TensorDict({"observation": obs}, [N]))
    loc = td["loc"] + offset * torch.randn(N, ACT, generator=g)
    scale = td["scale"] * torch.exp(offset * torch.randn(1, ACT, generator=g))
    action = loc + scale * torch.randn(N, ACT, generator=g)
    log_prob = torch.distributions.Normal(loc, scale).log_prob(action).sum(-1)
    batch = TensorDict({"observation": obs, "action": action, "loc": loc, "scale": scale,
                        "action_log_prob": log_prob,
                        "advantage": torch.randn(N, 1, generator=g),
                        "value_target": torch.randn(N, 1, generator=g)}, [N])
    return models, batch


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("klppo-bench: error: ")
    return lines[0]


def _deterministic(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=TIMING)


# ---------------------------------------------------------------- the contract, unit by unit

def test_output_contract_names_the_summed_recorded_and_extra_keys():
    t = torch.zeros(())
    out = {"loss_objective": t, "loss_critic": t, "loss_entropy": t, "loss_aux": t, "kl": t,
           "kl_approx": t, "clip_fraction": t, "explained_variance": t, "entropy": t,
           "ESS": t, "max_ratio": t, "my_fraction": t, "nested": TensorDict({}, [])}
    assert recorded_columns(out) == {
        "loss_objective": "loss_objective", "loss_critic": "loss_critic", "kl": "kl",
        "kl_approx": "kl_approx", "clip_fraction": "clip_fraction",
        "explained_variance": "explained_variance", "loss_aux": "extra/loss_aux",
        "my_fraction": "extra/my_fraction"}
    assert output_problem(TensorDict({"loss_objective": t}, [])) is None
    assert "lacks 'loss_objective' (it returned loss_surrogate)" in output_problem(
        TensorDict({"loss_surrogate": t}, []))
    assert "returned Tensor" in output_problem(t)


def _mismatched(advantage, ratio):
    return ratio


def _unknown(ratio, advantage, *, temperature):
    return ratio


def _unused(ratio, advantage):
    return ratio


def _takes_kwargs(ratio, advantage, **params):
    return ratio


def _with(name):
    def formula(ratio, advantage, **kw):
        return ratio
    return formula


def _kl_formula(ratio, advantage, *, kl):
    return ratio - kl


@pytest.mark.parametrize("fn,params,kwargs,needle", [
    (_mismatched, {}, {}, "first arguments are ['advantage', 'ratio']"),
    (_unknown, {}, {}, "formula argument 'temperature' is unknown"),
    (_unused, {"c": 1.0}, {}, "parameters c are not arguments of the formula"),
    (_takes_kwargs, {}, {}, "formula argument 'params' is unknown"),
    (clip_formula, {"clip_epsilon": "wide"}, {}, "clip_epsilon='wide' is invalid"),
    (clip_formula, {"clip_epsilon": True}, {}, "clip_epsilon=True is invalid"),
    (_with("entropy_coeff"), {"entropy_coeff": 0.1}, {}, "name 'entropy_coeff' is taken"),
    (_with("reduction"), {"reduction": 1.0}, {}, "name 'reduction' is taken"),
    (_with("x"), {"clip_epsilon": 0.2, "clip_epsilon_low": 0.1}, {}, "one kind of clip bound"),
    (_with("x"), {"clip_epsilon_low": 0.1}, {}, "go together; allowed: both or neither"),
    (_kl_formula, {}, {"distribution_class": JointNormalMC}, "has no closed-form KL"),
])
def test_formulas_that_break_the_contract_are_refused_in_one_line(fn, params, kwargs, needle):
    with pytest.raises(TypeError) as err:
        surrogate_variant(fn, "bad", params, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("options", [
    {},
    {"entropy_bonus": True, "entropy_coeff": 0.01, "loss_critic_type": "smooth_l1",
     "critic_coeff": 0.5, "normalize_advantage": False, "clip_epsilon": 0.1},
], ids=["common", "options"])
def test_clip_written_as_a_formula_is_clip_ppo_loss(options):
    """Every output clip has (but torchrl's extra ESS/max_ratio/mean_ratio) and every gradient,
    from a formula and the suite's parts only."""
    variant = surrogate_variant(clip_formula, "clip-formula", {"clip_epsilon": 0.2})
    clip = get_variant("clip")
    assert variant.resolve(options) == clip.resolve(options)
    models, batch = _models_and_batch(variant.distribution_class)
    ours = variant.build_loss(models.loss_actor, models.loss_critic, variant.resolve(options))
    theirs = clip.build_loss(models.loss_actor, models.loss_critic, clip.resolve(options))
    assert type(theirs) is ClipPPOLoss and isinstance(ours, ClipPPOLoss)
    a, b = ours(batch.clone()), theirs(batch.clone())
    assert set(a.keys()) == set(b.keys()) - {"ESS", "max_ratio", "mean_ratio"}
    assert 0 < float(a["clip_fraction"]) < 1
    for key in a.keys():
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)
    params = list(models.modules.parameters())
    total = lambda out: sum(v for k, v in out.items() if k.startswith("loss_"))  # noqa: E731
    for ga, gb in zip(torch.autograd.grad(total(a), params),
                      torch.autograd.grad(total(b), params)):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


def test_the_formula_gets_log_ratio_kl_and_entropy_and_its_parameters_as_buffers():
    variant = surrogate_variant(reads_everything, "reader", {"weight": 0.5})
    assert variant.kl_estimator == "analytic"  # reads kl: its kl is recorded like klpen's
    models, batch = _models_and_batch(variant.distribution_class)
    loss = variant.build_loss(models.loss_actor, models.loss_critic, variant.resolve())
    assert float(dict(loss.named_buffers())["weight"]) == 0.5
    out = loss(batch.clone())
    with torch.no_grad():
        dist = models.policy.get_dist(batch.select("observation").clone())
        log_ratio = dist.log_prob(batch["action"]) - batch["action_log_prob"]
        kl = joint_normal_kl(batch["loc"], batch["scale"], dist.base_dist.loc,
                             dist.base_dist.scale)
    torch.testing.assert_close(out["seen_log_ratio"], log_ratio.mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["seen_ratio"], log_ratio.exp().mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["seen_kl"], kl.mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["kl"].reshape(-1), kl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["seen_entropy"], dist.entropy().mean(), rtol=1e-5, atol=1e-7)
    assert "clip_fraction" not in out.keys()  # no clip bounds, no clip fraction
    # the objective really is ratio * A - weight * KL (advantages normalized as for clip)
    adv = batch["advantage"]
    adv = (adv - adv.mean()) / adv.std()
    expected = -(log_ratio.exp()[:, None] * adv - 0.5 * kl[:, None]).mean()
    torch.testing.assert_close(out["loss_objective"], expected, rtol=1e-4, atol=1e-6)


def test_the_three_examples_compute_their_papers_formulas_by_hand():
    load_plugins((DUAL, ROLLBACK, HIGHER))
    f = {n: get_variant(n).loss_class.objective for n in ("dual-clip", "rollback", "clip-higher")}
    eps, t = torch.tensor(0.2), torch.tensor
    objective, diag = f["dual-clip"](t([5.0, 1.5, 0.5]), t([-1.0, -1.0, 1.0]), clip_epsilon=eps,
                                     dual_clip_c=t(3.0))
    assert objective.tolist() == pytest.approx([-3.0, -1.5, 0.5])
    assert diag["dual_clip_fraction"].tolist() == [True, False, False]
    rolled = f["rollback"](t([0.5, 1.1, 1.5, 1.5, 0.5]), t([1.0, 1.0, 1.0, -1.0, -1.0]),
                           clip_epsilon=eps, rollback_alpha=t(0.3))
    # F(1.5) = -0.3 * 1.5 + 1.3 * 1.2 = 1.11; F(0.5) = -0.15 + 1.3 * 0.8 = 0.89
    assert rolled.tolist() == pytest.approx([0.5, 1.1, 1.11, -1.5, -0.89])
    higher = f["clip-higher"](t([0.7, 1.25, 1.35]), t([-1.0, 1.0, 1.0]),
                              clip_epsilon_low=eps, clip_epsilon_high=t(0.28))
    assert higher.tolist() == pytest.approx([-0.8, 1.25, 1.28])


def test_clip_higher_has_asymmetric_bounds_and_refuses_high_below_low():
    load_plugins((HIGHER,))
    variant = get_variant("clip-higher")
    models, batch = _models_and_batch(variant.distribution_class)
    loss = variant.build_loss(models.loss_actor, models.loss_critic, variant.resolve())
    assert (float(loss.clip_epsilon_low), float(loss.clip_epsilon_high)) == pytest.approx(
        (0.2, 0.28))
    out = loss(batch.clone())
    with torch.no_grad():
        dist = models.policy.get_dist(batch.select("observation").clone())
        ratio = (dist.log_prob(batch["action"]) - batch["action_log_prob"]).exp()
    outside = ((ratio < 0.8) | (ratio > 1.28)).float().mean()
    torch.testing.assert_close(out["clip_fraction"], outside, rtol=1e-5, atol=2 / N)
    with pytest.raises(ConfigError) as err:
        variant.resolve({"clip_epsilon_high": 0.1})
    assert str(err.value) == ("--set: variant clip-higher: clip_epsilon_high=0.1 is below "
                              "clip_epsilon_low=0.2; allowed: clip_epsilon_high >= "
                              "clip_epsilon_low")


def test_the_formulas_code_is_part_of_the_run_id():
    def other(ratio, advantage, *, clip_epsilon):
        return torch.minimum(ratio * advantage, ratio.clamp(1 - clip_epsilon, 1.5) * advantage)

    same = [code_identity(surrogate_variant(clip_formula, "x", {"clip_epsilon": 0.2}))["hash"]
            for _ in range(2)]
    changed = code_identity(surrogate_variant(other, "x", {"clip_epsilon": 0.2}))["hash"]
    assert same[0] == same[1] != changed


# ---------------------------------------------------------------- training on both engines

@pytest.mark.parametrize("plugin,variant", [(DUAL, "dual-clip"), (ROLLBACK, "rollback"),
                                            (HIGHER, "clip-higher")])
def test_each_example_trains_on_the_batched_engine_with_every_call_replayed(plugin, variant):
    cfgs = [build_run_config(variant, "Hopper", s, frames=256, plugins=(plugin,),
                             overrides={**TINY, "train.lr": 0.003}) for s in (0, 1)]
    calls: dict = {}
    results = train_batched(cfgs, progress=False, loss_calls=calls)
    assert calls["eager"] == 0 and calls["replayed"] == 8 and calls["not_recorded"] == []
    row = results[0].metrics.iloc[0]
    assert 0 < row["clip_fraction"] < 1 and math.isfinite(row["loss_objective"])
    assert math.isfinite(row["explained_variance"]) and math.isnan(row["kl"])
    if variant == "dual-clip":
        assert 0 <= row["extra/dual_clip_fraction"] < 1


def test_parameters_are_buffers_so_settings_share_a_batched_job():
    load_plugins((DUAL,))
    cfgs = [build_run_config("dual-clip", "Hopper", 0, plugins=(DUAL,), overrides={
        "dual_clip_c": c, "clip_epsilon": e}) for c, e in ((1.5, 0.1), (3.0, 0.3))]
    assert lane_key(cfgs[0]) == lane_key(cfgs[1])


def test_a_surrogate_trains_like_the_same_formula_as_a_clip_ppo_loss_subclass():
    """First-iteration metrics of the Dual-Clip formula (examples/dual_clip.py) and of the
    ClipPPOLoss subclass (tests/plugins/dual_clip_subclass.py) agree to 1e-5 relative on the
    batched engine, extra output included; the reference engine gives the same numbers."""
    plugins = (DUAL, SUBCLASS)
    overrides = {**TINY, "train.lr": 0.003, "train.epochs": 4, "dual_clip_c": 1.2}
    rows = {}
    for variant in ("dual-clip", "dual-clip-subclass"):
        cfgs = [build_run_config(variant, "Hopper", s, frames=256, plugins=plugins,
                                 overrides=overrides) for s in (0, 1)]
        rows[variant] = _deterministic(train_batched(cfgs, progress=False)[0].metrics).iloc[0]
    rows["reference"] = _deterministic(train(cfgs[0], progress=False).metrics).iloc[0]
    ours = rows["dual-clip"]
    assert ours["clip_fraction"] > 0.05 and ours["extra/dual_clip_fraction"] > 0.01
    for other in ("dual-clip-subclass", "reference"):
        pd.testing.assert_series_equal(rows[other], ours, rtol=1e-5, check_names=False)


SPO = '''
from klppo_bench.variants import surrogate


@surrogate(name="spo-test", params={"clip_epsilon": 0.2}, description="SPO (test)")
def spo(ratio, advantage, *, clip_epsilon):
    penalty = advantage.abs() / (2 * clip_epsilon) * (ratio - 1) ** 2
    return ratio * advantage - penalty, {"spo_penalty": penalty}
'''


@pytest.mark.parametrize("form", ["surrogate", "subclass"])
def test_a_plugin_trains_from_the_cli_replayed_with_its_extra_output_in_metrics_parquet(
        form, tmp_path, capsys, fresh_registry):
    if form == "surrogate":
        plugin, variant, extra = tmp_path / "spo.py", "spo-test", "extra/spo_penalty"
        plugin.write_text(SPO)
    else:
        plugin, variant, extra = SUBCLASS, "dual-clip-subclass", "extra/dual_clip_fraction"
    out = tmp_path / "exp"
    sets = [x for k, v in {**TINY, "train.lr": 0.003}.items() for x in ("--set", f"{k}={v}")]
    assert main(["run", "--variant", variant, "--plugin", str(plugin), "--env", "Hopper",
                 "--frames", "256", "--out", str(out), "--quiet", *sets]) == 0
    (run,) = (out / "runs").iterdir()
    status = json.loads((run / "status.json").read_text())
    assert status["provenance"]["engine"] == "batched"
    assert status["loss_calls"]["eager"] == 0 and status["loss_calls"]["replayed"] == 8
    metrics = read_parquet(run / "metrics.parquet")  # no Arrow thread pools: no exit abort
    assert extra in metrics.columns and metrics[extra].notna().all()
    assert (metrics[extra] > 0).any() if form == "surrogate" else (metrics[extra] >= 0).all()


# ---------------------------------------------------------------- config errors at planning

SWEEP = """\
name: ctor
envs: [Hopper]
seeds: 2
frames: 256
train: {steps_per_iter: 256, epochs: 1}
plugins: [PLUGIN]
variants:
  - clip
  - name: VARIANT
    params: PARAMS
"""


def _argv(command: str, tmp_path: Path, plugin: str, variant: str, params: dict,
          engine: str = "auto") -> list[str]:
    if command == "run":
        sets = [x for k, v in params.items() for x in ("--set", f"{k}={v}")]
        return ["run", "--variant", variant, "--plugin", plugin, "--env", "Hopper", "--frames",
                "256", "--set", "train.steps_per_iter=256", "--out", str(tmp_path / "out"),
                "--engine", engine, *sets]
    spec = tmp_path / "ctor.yaml"
    spec.write_text(SWEEP.replace("PLUGIN", plugin).replace("VARIANT", variant)
                    .replace("PARAMS", json.dumps(params)))
    return ["sweep", str(spec), "--results", str(tmp_path / "out"), "--workers", "1",
            "--engine", engine, *(["--dry-run"] if command == "dry-run" else [])]


@pytest.mark.parametrize("command,engine", [("run", "auto"), ("run", "reference"),
                                            ("sweep", "auto"), ("dry-run", "auto"),
                                            ("dry-run", "reference")])
def test_a_loss_constructor_error_is_one_line_exit_2_and_nothing_written(
        command, engine, tmp_path, capsys):
    """dual_clip_c=0.5 passes the Param's range (>= 0) but the loss's constructor raises
    ValueError: a config error naming variant, parameter and message, found for the second
    setting of the sweep before any run (or any dry-run line) starts."""
    params = {"dual_clip_c": [3.0, 0.5]} if command != "run" else {"dual_clip_c": 0.5}
    assert main(_argv(command, tmp_path, SUBCLASS, "dual-clip-subclass", params, engine)) == 2
    line = _one_error_line(capsys)
    assert ("variant dual-clip-subclass with dual_clip_c=0.5: its loss class DualClipPPOLoss "
            "rejected them (ValueError: dual_clip_c must be > 1, got 0.5 at ") in line
    assert "torch.func.vmap" not in line
    if command != "run":
        assert line.startswith(f"klppo-bench: error: {tmp_path / 'ctor.yaml'}: variants[1]: ")
    assert not (tmp_path / "out").exists()
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("command,engine", [("run", "auto"), ("run", "reference"),
                                            ("dry-run", "auto")])
def test_a_module_without_loss_objective_is_refused_at_planning(command, engine, tmp_path,
                                                                capsys):
    assert main(_argv(command, tmp_path, SUBCLASS, "no-objective", {}, engine)) == 2
    line = _one_error_line(capsys)
    assert ("variant no-objective: its forward's output lacks 'loss_objective' (it returned "
            "ESS, clip_fraction, explained_variance, kl_approx, loss_critic, loss_surrogate, "
            "max_ratio, mean_ratio)") in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["run", "dry-run"])
def test_a_failed_cross_parameter_check_is_one_line_exit_2(command, tmp_path, capsys):
    params = {"clip_epsilon_high": 0.1} if command == "run" else {"clip_epsilon_high": [0.3, 0.1]}
    assert main(_argv(command, tmp_path, HIGHER, "clip-higher", params)) == 2
    line = _one_error_line(capsys)
    assert "variant clip-higher: clip_epsilon_high=0.1 is below clip_epsilon_low=0.2" in line
    assert not (tmp_path / "out").exists()

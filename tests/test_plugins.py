"""A user's variant plugs in without forking: --plugin file or module, and entry points."""

from __future__ import annotations

from pathlib import Path

import pytest
from torchrl.objectives import KLPENPPOLoss

from klppo_bench.cli import main
from klppo_bench.config import build_run_config
from klppo_bench.errors import ConfigError
from klppo_bench.harness.reference import train
from klppo_bench.variants import registry
from klppo_bench.variants.registry import get_variant, load_plugins

from tests.conftest import TINY, TINY_FRAMES


def test_readme_example_plugin_lists_and_trains(capsys):
    assert main(["variants", "--plugin", "examples/my_variants.py"]) == 0
    out = capsys.readouterr().out
    assert "klpen-tight" in out and "clip-kl" in out
    assert get_variant("klpen-tight").loss_class is KLPENPPOLoss
    for name in ("klpen-tight", "clip-kl"):
        cfg = build_run_config(name, "Hopper", 0, frames=TINY_FRAMES, overrides=TINY,
                               plugins=("examples/my_variants.py",))
        metrics = train(cfg, progress=False).metrics
        assert metrics["kl"].notna().all() and metrics["kl"].ge(0).all()


def test_missing_plugin_is_a_clear_error():
    with pytest.raises(ConfigError, match="--plugin no_such_module: cannot import"):
        load_plugins(["no_such_module"])


def test_entry_point_group_registers_variants(monkeypatch, fresh_registry):
    class EP:
        name = "demo"

        @staticmethod
        def load():
            from klppo_bench.variants import Variant
            from klppo_bench.variants.builtin import COMMON
            from torchrl.objectives import PPOLoss

            return lambda: [Variant(name="ep-demo", loss_class=PPOLoss, description="demo",
                                    kl_estimator="none", beta_rule="none", params=dict(COMMON))]

    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)  # fresh_registry restores it
    monkeypatch.setattr(registry.metadata, "entry_points",
                        lambda group: [EP()] if group == registry.ENTRY_POINT_GROUP else [])
    assert "ep-demo" in registry.all_variants()
    assert registry.variant_source("ep-demo")["kind"] == "entry point"
    assert registry.variant_source("ep-demo")["name"] == "demo"


def test_dual_clip_example_trains_on_the_batched_engine_beside_clip(tmp_path):
    """The shipped spec of a user's objective: both variants run on the batched engine, the
    two dual_clip_c settings as lanes of one job."""
    import json

    from klppo_bench.cli import main

    spec = Path(__file__).resolve().parent.parent / "experiments" / "dual_clip.yaml"
    assert main(["sweep", str(spec), "--seeds", "1", "--frames", "2048", "--results",
                 str(tmp_path), "--workers", "1"]) == 0
    statuses = [json.loads(p.read_text()) for p in (tmp_path / "dual_clip" / "runs").glob("*/status.json")]
    assert len(statuses) == 3
    assert {s["provenance"]["engine"] for s in statuses} == {"batched"}
    dual = [s for s in statuses if s["setting"].startswith("dual-clip")]
    assert len(dual) == 2 and len(dual[0]["provenance"]["batch_runs"]) == 2

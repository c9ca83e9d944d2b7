"""An experiment is its current definition (manifest.json), and a run's id includes its
variant's code: sweeps of one spec name at other frames, or after an edit to the loss code,
never pool into one setting. Real tiny sweeps (experiments/smoke.yaml budgets) end to end,
plus unit tests of the manifest and of the code hash."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from klppo_bench import cli
from klppo_bench.config import RunConfig, build_run_config
from klppo_bench.errors import ConfigError
from klppo_bench.manifest import (DiskRun, build_manifest, definition, definition_labels,
                                  partition, read_manifest)
from klppo_bench.store import RunDir, experiment_runs
from klppo_bench.variants import get_variant, registry
from klppo_bench.variants.identity import code_identity, variant_code_hash
from tests.conftest import TINY, TINY_FRAMES
from tests.test_report_store import RANDOM_EPISODES, seed_random_cache

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "experiments" / "smoke.yaml")


def report(exp: Path, *extra: str) -> int:
    return cli.main(["report", str(exp), "--reps", "30", "--random-episodes",
                     str(RANDOM_EPISODES), *extra])


def scores(exp: Path) -> pd.DataFrame:
    return pd.read_csv(exp / "report" / "scores.csv")


def run_configs(exp: Path) -> dict[str, dict]:
    return {run.run_id: run.config() for run in experiment_runs(exp)}


# ------------------------------------------------------------- point 1: the current definition

def test_report_uses_the_spec_as_last_swept_and_names_the_runs_it_left_out(tmp_path, capsys):
    results = tmp_path / "results"
    exp = results / "smoke"
    seed_random_cache(results)
    assert cli.main(["sweep", SMOKE, "--results", str(results), "--workers", "2"]) == 0  # 1,024
    first = set(run_configs(exp))
    manifest = json.loads((exp / "manifest.json").read_text())
    assert set(manifest["envs"]["Hopper-v5"]["runs"]) == first and len(first) == 4

    # --dry-run at 2,048 frames: names the 1,024-frame runs it would leave out, writes nothing
    before = sorted((str(p), p.stat().st_mtime_ns) for p in exp.rglob("*"))
    capsys.readouterr()
    assert cli.main(["sweep", SMOKE, "--results", str(results), "--frames", "2048",
                     "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 runs of another definition: frames 1024 (this definition: 2048)" in out
    assert sorted((str(p), p.stat().st_mtime_ns) for p in exp.rglob("*")) == before

    assert cli.main(["sweep", SMOKE, "--results", str(results), "--frames", "2048",
                     "--workers", "2"]) == 0
    assert "4 runs of another definition: frames 1024" in capsys.readouterr().out
    configs = run_configs(exp)
    assert len(configs) == 8 and first < set(configs)  # the old runs stay on disk

    assert report(exp) == 0
    s = scores(exp)
    assert sorted(s.groupby("setting").size().items()) == [("clip", 2), ("klpen-adaptive", 2)]
    assert set(s.frames) == {2048} and not set(s.run_id) & first
    md = (exp / "report" / "report.md").read_text()
    assert "## Runs of other definitions" in md
    assert "4 runs of another definition: frames 1024 (this definition: 2048)" in md
    assert "4 run(s) on disk are not part of this experiment's current definition" in md

    # side by side only when asked: each definition its own setting, never pooled
    assert report(exp, "--all-definitions") == 0
    s = scores(exp)
    assert sorted(s.groupby("setting").size().items()) == [
        ("clip", 2), ("clip [frames=1024]", 2), ("klpen-adaptive", 2),
        ("klpen-adaptive [frames=1024]", 2)]
    assert set(s[s.setting == "clip [frames=1024]"].frames) == {1024}

    # sweeping the 1,024-frame spec again makes it current again (nothing to train)
    assert cli.main(["sweep", SMOKE, "--results", str(results)]) == 0
    assert len(run_configs(exp)) == 8
    assert report(exp) == 0
    assert set(scores(exp).run_id) == first


def test_frames_requested_and_run_are_shown_by_sweep_and_report(tmp_path, capsys):
    results = tmp_path / "results"
    seed_random_cache(results)
    spec = tmp_path / "frames.yaml"
    spec.write_text("name: frames\nenvs: [Hopper]\nseeds: 1\nframes: 500\nvariants: [clip]\n"
                    "train: {steps_per_iter: 256, epochs: 1}\neval: {every: 0, episodes: 1}\n")
    assert cli.main(["sweep", str(spec), "--results", str(results), "--workers", "1"]) == 0
    assert capsys.readouterr().out.count("frames 500 (runs 512: whole iterations of 256)") == 1
    assert report(results / "frames") == 0
    md = (results / "frames" / "report" / "report.md").read_text()
    assert "Frames per run: 500 requested, 512 run" in md


def _config(env="Hopper-v5", seed=0, frames=1024, code="c0de", epochs=2):
    return {"variant": "clip", "env": env, "seed": seed, "frames": frames, "code": code,
            "loss": {"clip_epsilon": 0.2}, "train": {"epochs": epochs}, "plugins": ["x.py"]}


def test_manifest_keeps_other_envs_of_the_same_definition_only():
    hopper = build_manifest("e", {"envs": ["Hopper-v5"]},
                            [("h0", "clip", _config()), ("h1", "clip", _config(seed=1))])
    walker = build_manifest("e", {"envs": ["Walker2d-v5"]},
                            [("w0", "clip", _config("Walker2d-v5"))], previous=hopper)
    assert sorted(walker["envs"]) == ["Hopper-v5", "Walker2d-v5"]  # make bench ENV=... twice
    assert walker["spec"] == {"envs": ["Walker2d-v5", "Hopper-v5"]}  # the whole experiment
    again = build_manifest("e", {"envs": ["Walker2d-v5"]},
                           [("w0", "clip", _config("Walker2d-v5"))], previous=walker)
    assert again == walker  # a rerun of the same sweep changes nothing
    longer = build_manifest("e", {"envs": ["Walker2d-v5"]},
                            [("w1", "clip", _config("Walker2d-v5", frames=2048))],
                            previous=walker)
    assert sorted(longer["envs"]) == ["Walker2d-v5"]  # another definition: Hopper is dropped
    assert longer["spec"] == {"envs": ["Walker2d-v5"]}
    assert definition(_config()) == {"variant": "clip", "frames": 1024, "code": "c0de",
                                     "loss.clip_epsilon": 0.2, "train.epochs": 2}


def test_per_env_sweeps_record_one_spec_that_sweeps_the_whole_experiment(tmp_path, capsys):
    """``make bench ENV=Hopper`` then ``ENV=InvertedPendulum``: the experiment's spec.yaml lists
    both tasks, so sweeping it again finds every run done."""
    results = tmp_path / "results"
    spec = tmp_path / "two.yaml"
    spec.write_text("name: two\nenvs: [Hopper]\nseeds: 1\nframes: 256\nvariants: [clip]\n"
                    "train: {steps_per_iter: 256, minibatch_size: 64, epochs: 1}\n"
                    "eval: {every: 0, episodes: 1}\n")
    for env in ("Hopper", "InvertedPendulum"):
        assert cli.main(["sweep", str(spec), "--env", env, "--results", str(results),
                         "--workers", "1"]) == 0
    exp = results / "two"
    recorded = exp / "spec.yaml"
    assert "envs:\n- InvertedPendulum-v5\n- Hopper-v5\n" in recorded.read_text()
    assert sorted(read_manifest(exp)["envs"]) == ["Hopper-v5", "InvertedPendulum-v5"]
    before = sorted((str(p), p.stat().st_mtime_ns) for p in exp.rglob("*"))
    capsys.readouterr()
    assert cli.main(["sweep", str(recorded), "--results", str(results)]) == 0
    assert "all 2 runs are done; nothing to run" in capsys.readouterr().out
    assert sorted((str(p), p.stat().st_mtime_ns) for p in exp.rglob("*")) == before


def test_left_out_runs_are_grouped_by_what_differs():
    manifest = build_manifest("e", {}, [("a0", "clip", _config()), ("a1", "clip",
                                                                     _config(seed=1))])
    runs = [DiskRun("a0", "clip", _config()), DiskRun("a1", "clip", _config(seed=1)),
            DiskRun("old0", "clip", _config(frames=512, code=None)),
            DiskRun("old1", "clip", _config(seed=1, frames=512, code=None)),
            DiskRun("s5", "clip", _config(seed=5)),
            DiskRun("w0", "clip", _config("Walker2d-v5")),
            DiskRun("g0", "gone", _config()), DiskRun("broken")]
    current, left_out = partition(manifest, runs)
    assert current == {"a0", "a1"}
    assert [g.line() for g in left_out] == [
        "2 runs of another definition: code unrecorded (this definition: c0de), frames 512 "
        "(this definition: 1024); settings: clip",
        "1 run at seeds not in this definition: 5 (this definition: seeds 0, 1; settings: clip)",
        "1 run on environments not in this definition: Walker2d-v5 (this definition: "
        "Hopper-v5)",
        "1 run of settings not in this definition: gone",
        "1 run not in this definition whose record cannot be read: broken"]
    labels = definition_labels(manifest, runs)
    assert labels == {"old0": "clip [code=unrecorded, frames=512]",
                      "old1": "clip [code=unrecorded, frames=512]"}
    # no manifest: the most common definition of a label keeps it
    assert definition_labels(None, runs[:3]) == {"old0": "clip [code=unrecorded, frames=512]"}


def test_a_damaged_manifest_is_a_one_line_error(tmp_path, capsys):
    exp = tmp_path / "exp"
    (exp / "runs").mkdir(parents=True)
    (exp / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="manifest.json: not readable"):
        read_manifest(exp)
    assert report(exp) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "remove it to report every run" in err


# ------------------------------------------------------------------ point 2: code identity

PLUGIN = '''
from torchrl.objectives import ClipPPOLoss

from klppo_bench.variants import Param, Variant, register
from klppo_bench.variants.builtin import ALIASES, COMMON


class ScaledClipLoss(ClipPPOLoss):
    """Clipped surrogate, scaled."""

    def forward(self, tensordict):
        out = super().forward(tensordict)
        scale = 1.0
        out.set("loss_objective", out.get("loss_objective") * scale)
        return out


register(Variant(
    name="scaled-clip", loss_class=ScaledClipLoss, description="test plugin",
    kl_estimator="none", beta_rule="none",
    params={"clip_epsilon": Param(0.2, float, "DOC", low=0.0, low_open=True), **COMMON},
    aliases=ALIASES))
'''


def _reload(path: Path) -> None:
    """Forget the plugin's variant so the next load_plugins imports the edited file."""
    registry._REGISTRY.pop("scaled-clip", None)
    registry._SOURCES.pop("scaled-clip", None)
    registry._LOADED_PLUGINS.discard(str(path.resolve()))


def test_edited_loss_code_gives_new_runs_and_the_report_uses_them(tmp_path, capsys,
                                                                   fresh_registry):
    plugin = tmp_path / "scaled.py"
    plugin.write_text(PLUGIN)
    spec = tmp_path / "scaled.yaml"
    spec.write_text("name: scaled\nenvs: [Hopper]\nseeds: 2\nframes: 512\n"
                    "plugins: [scaled.py]\nvariants: [scaled-clip]\n"
                    "train: {steps_per_iter: 256, epochs: 1}\neval: {every: 0, episodes: 1}\n")
    results = tmp_path / "results"
    exp = results / "scaled"
    seed_random_cache(results)
    assert cli.main(["sweep", str(spec), "--results", str(results), "--workers", "1"]) == 0
    old = run_configs(exp)
    (old_code,) = {c["code"] for c in old.values()}
    status = RunDir(exp / "runs" / next(iter(old))).status()
    variant = status["provenance"]["variant"]  # the batched engine's record
    assert status["provenance"]["engine"] == "batched"
    assert variant["kind"] == "plugin file" and variant["path"] == str(plugin.resolve())
    assert variant["sha256"] == hashlib.sha256(plugin.read_bytes()).hexdigest()
    assert variant["code"] == old_code and variant["classes"] == ["ScaledClipLoss",
                                                                  "JointNormal"]
    assert set(variant["libraries"]) == {"torchrl"}

    plugin.write_text(PLUGIN.replace("scale = 1.0", "scale = 0.75"))
    _reload(plugin)
    capsys.readouterr()
    assert cli.main(["sweep", str(spec), "--results", str(results), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "(2 run now)" in out  # trained again, not reused
    new = {k: v for k, v in run_configs(exp).items() if k not in old}
    assert len(new) == 2 and {c["code"] for c in new.values()} != {old_code}
    (new_code,) = {c["code"] for c in new.values()}

    assert report(exp) == 0
    assert set(scores(exp).run_id) == set(new)
    md = (exp / "report" / "report.md").read_text()
    assert (f"2 runs of another definition: code {old_code[:8]} (this definition: "
            f"{new_code[:8]})") in md
    sources = md.split("## Variant sources")[1].split("##")[0]
    path = re.escape(str(plugin.resolve()))
    assert re.search(rf"\| scaled-clip \| plugin file \| {path} \(sha256 [0-9a-f]{{12}}\) "
                     rf"\| `{new_code}` \| 2 \|", sources), sources


def test_code_hash_follows_the_code_and_the_definition(tmp_path, fresh_registry):
    plugin = tmp_path / "scaled.py"
    plugin.write_text(PLUGIN)
    hashes = {}
    for name, text in [("base", PLUGIN), ("doc", PLUGIN.replace('"DOC"', '"other doc"')),
                       ("body", PLUGIN.replace("scale = 1.0", "scale = 0.5")),
                       ("default", PLUGIN.replace("Param(0.2,", "Param(0.3,")),
                       ("docstring", PLUGIN.replace("scaled.", "scaled!"))]:
        plugin.write_text(text)
        _reload(plugin)
        registry.load_plugins([str(plugin)])
        hashes[name] = variant_code_hash("scaled-clip")
    assert hashes["doc"] == hashes["base"]  # a parameter's doc does not change results
    assert len({hashes[k] for k in ("base", "body", "default", "docstring")}) == 4

    clip = code_identity(get_variant("clip"))
    assert clip["classes"] == ["JointNormal"] and set(clip["libraries"]) == {"torchrl"}
    mc = code_identity(get_variant("klpen-adaptive-mc"))
    assert set(mc["libraries"]) == {"torch", "torchrl"}
    assert len({variant_code_hash(n) for n in registry.all_variants()}) == \
        len(registry.all_variants())
    cfg = build_run_config("clip", "Hopper", 0, frames=TINY_FRAMES, overrides=TINY)
    assert cfg.code == clip["hash"] == variant_code_hash("clip")


def test_configs_stored_before_the_code_hash_load_with_their_run_id():
    cfg = build_run_config("clip", "Hopper", 0, frames=TINY_FRAMES, overrides=TINY)
    legacy = cfg.to_dict()
    del legacy["code"]
    loaded = RunConfig.from_dict(legacy)
    assert loaded.code is None
    old = {k: v for k, v in legacy.items() if k != "plugins"}  # the id before `code` existed
    digest = hashlib.sha1(json.dumps(old, sort_keys=True).encode()).hexdigest()[:10]
    assert loaded.run_id() == f"clip-Hopperv5-s0-{digest}" != cfg.run_id()
    assert RunConfig.from_dict(cfg.to_dict()).run_id() == cfg.run_id()


def test_reference_engine_records_the_variant_source(tmp_path):
    from klppo_bench.harness.run import execute_run

    cfg = build_run_config("clip", "Hopper", 0, frames=TINY_FRAMES, overrides=TINY)
    run = execute_run(cfg, tmp_path, progress=False)
    prov = run.status()["provenance"]
    assert prov["engine"] == "reference"
    assert prov["variant"]["kind"] == "builtin" and prov["variant"]["package"] == "klppo-bench"
    assert prov["variant"]["code"] == cfg.code == run.config()["code"]

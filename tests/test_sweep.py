"""Experiment specs: expansion, stable run ids, setting labels, and bad specs (no runs)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from klppo_bench import cli
from klppo_bench.errors import ConfigError
from klppo_bench.spec import expand, load_spec

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


def spec_runs(name: str, **overrides):
    return expand(load_spec(EXPERIMENTS / f"{name}.yaml", **overrides))


def test_shipped_specs_expand_to_their_grids():
    bench = spec_runs("bench")
    assert len(bench) == 6 * 10
    assert {r.setting for r in bench} == {"clip", "no-clip", "klpen-adaptive",
                                          "klpen-adaptive-mc", "klpen-fixed", "klpen-fixed-mc"}
    assert {r.config.frames for r in bench} == {1_000_000}

    walker = spec_runs("bench", envs=["Walker2d"], seeds=2, frames=20_000)
    assert len(walker) == 6 * 2
    assert {(r.config.env, r.config.frames) for r in walker} == {("Walker2d-v5", 20_000)}
    assert [r.config.seed for r in walker] == [0] * 6 + [1] * 6  # seed-major order

    grid = spec_runs("dtarg_increment", seeds=1)
    assert len(grid) == 1 + 3 * 3
    for run in grid[1:]:
        loss = run.config.loss
        assert loss["decrement"] == 1.0 / loss["increment"]
        assert run.setting == (f"klpen-adaptive(dtarg={loss['dtarg']:g},"
                               f"increment={loss['increment']:g})")
    assert "klpen-adaptive(dtarg=0.003,increment=1.5)" in {r.setting for r in grid}
    assert grid[0].setting == "clip"

    table1 = spec_runs("ppo_table1")
    assert len(table1) == (1 + 3 + 3 + 4) * 7 * 3
    assert len({r.config.env for r in table1}) == 7
    fixed = {r.config.loss["beta"] for r in table1 if r.config.variant == "klpen-fixed"}
    assert fixed == {0.3, 1.0, 3.0, 10.0}
    assert "clip(clip_epsilon=0.1)" in {r.setting for r in table1}

    smoke = spec_runs("smoke")
    assert len(smoke) == 4
    assert smoke[0].config.train.steps_per_iter == 256 and smoke[0].config.eval.every == 0


def test_run_ids_are_stable_unique_and_follow_the_config(tmp_path):
    first = spec_runs("dtarg_increment", seeds=2)
    again = spec_runs("dtarg_increment", seeds=2)
    assert [r.run_id for r in first] == [r.run_id for r in again]
    assert len({r.run_id for r in first}) == len(first)

    # One changed grid value renames exactly the runs it touches.
    text = (EXPERIMENTS / "dtarg_increment.yaml").read_text().replace("0.03]", "0.05]")
    (tmp_path / "changed.yaml").write_text(text)
    changed = expand(load_spec(tmp_path / "changed.yaml", seeds=2))
    old, new = {r.run_id for r in first}, {r.run_id for r in changed}
    moved = [r for r in changed if r.run_id not in old]
    assert len(moved) == 3 * 2  # dtarg 0.05 x 3 increments x 2 seeds
    assert all(r.config.loss["dtarg"] == 0.05 for r in moved)
    assert len(old - new) == 3 * 2


def test_labels_aliases_and_fixed_values(tmp_path):
    spec = tmp_path / "labels.yaml"
    spec.write_text(BASE + "  - name: klpen-adaptive\n    label: klpen-minibatch\n"
                    "    params: {dtarg: [0.01], beta_schedule: minibatch, entropy_coef: 0.0}\n")
    runs = expand(load_spec(spec))
    assert [r.setting for r in runs[:3]] == ["klpen-adaptive(dtarg=0.01)",
                                             "klpen-adaptive(dtarg=0.03)",
                                             "klpen-minibatch(dtarg=0.01)"]
    assert runs[2].config.loss["beta_schedule"] == "minibatch"
    assert runs[2].config.loss["entropy_coeff"] == 0.0
    assert runs[0].config.loss["beta_schedule"] == "iteration"
    assert len(runs) == 3 * 2


def snapshot(root: Path) -> list:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


BASE = """\
name: bad
envs: [Hopper]
seeds: 2
frames: 4096
variants:
  - name: klpen-adaptive
    params: {dtarg: [0.01, 0.03]}
"""

BAD_SPECS = {
    "yaml-syntax": (BASE + "  - name: [clip\n", ["YAML syntax error", "line"]),
    "unknown-top-key": (BASE + "seed: 3\n", ["unknown key 'seed'", "allowed: name,"]),
    "unknown-variant-key": (BASE.replace("    params", "    param"),
                            ["variants[0]: unknown key 'param'", "allowed: name, params"]),
    "unknown-variant": (BASE.replace("klpen-adaptive", "klpen-adaptiv"),
                        ["variants[0].name", "'klpen-adaptiv'", "allowed: clip,"]),
    "unknown-param": (BASE.replace("dtarg:", "dtargs:"),
                      ["variants[0].params", "'dtargs'", "allowed: dtarg, beta,"]),
    "unknown-env": (BASE.replace("[Hopper]", "[Hoper]"), ["envs", "'Hoper'", "Hopper"]),
    "bad-type-frames": (BASE.replace("4096", "lots"), ["frames='lots'", "allowed: int >= 1"]),
    "bad-type-seeds": (BASE.replace("seeds: 2", "seeds: [0, a]"), ["seeds=", "allowed: a count"]),
    "bad-type-grid": (BASE.replace("0.03]", "big]"),
                      ["variants[0].params: dtarg='big'", "allowed: float > 0"]),
    "out-of-range": (BASE.replace("0.03]", "-0.1]"), ["dtarg=-0.1", "out of range",
                                                      "allowed: float > 0"]),
    "bad-device": (BASE + "device: gpu\n", ["device='gpu' is invalid",
                                          "allowed: cpu, cuda, cuda:N or auto"]),
    "out-of-range-train": (BASE + "train: {epochs: 0}\n", ["train.epochs=0", "allowed: int >= 1"]),
    "unknown-train-key": (BASE + "train: {epoch: 3}\n", ["train: unknown key 'epoch'",
                                                         "allowed: steps_per_iter"]),
    "too-few-frames": (BASE.replace("4096", "100"), ["frames=100", "allowed: >= 2048"]),
    "empty-grid-param": (BASE.replace("[0.01, 0.03]", "[]"), ["params.dtarg=[]", "empty grid"]),
    "empty-grid-seeds": (BASE.replace("seeds: 2", "seeds: 0"), ["seeds=0", "empty grid"]),
    "empty-grid-variants": (BASE.split("variants:")[0] + "variants: []\n",
                            ["variants=[]", "empty grid"]),
    "derived-unset": (BASE + "    derived: {decrement: {reciprocal: increment}}\n",
                      ["derived.decrement", "allowed: one rule"]),
    "derived-op": (BASE + "    derived: {decrement: {inverse: dtarg}}\n",
                   ["unknown key 'inverse'", "allowed: reciprocal"]),
    "duplicate-run": (BASE + "  - name: klpen-adaptive\n    params: {dtarg: 0.03}\n",
                      ["variants[1]", "defined twice", "allowed: distinct configs"]),
    "colliding-settings": (BASE + "  - name: klpen-adaptive\n    params: {dtarg: [0.01, 0.03], "
                           "beta_schedule: minibatch}\n",
                           ["variants[1]", "setting 'klpen-adaptive(dtarg=0.01)'",
                            "allowed: distinct labels"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_fails_up_front_naming_file_key_and_allowed(case, tmp_path, capsys):
    text, expected = BAD_SPECS[case]
    spec = tmp_path / f"{case}.yaml"
    spec.write_text(text)
    results = tmp_path / "results"
    (results / "other").mkdir(parents=True)
    (results / "other" / "keep.txt").write_text("untouched")
    before = snapshot(results)

    with pytest.raises(ConfigError) as err:
        expand(load_spec(spec))
    assert cli.main(["sweep", str(spec), "--results", str(results)]) == 2
    message = capsys.readouterr().err.strip()
    assert message == f"klppo-bench: error: {err.value}"  # one line
    assert "\n" not in message and str(spec) in message
    for fragment in expected:
        assert fragment in message, (fragment, message)
    assert snapshot(results) == before


def test_bad_command_line_values(tmp_path, capsys):
    smoke = str(EXPERIMENTS / "smoke.yaml")
    for argv, fragment in [
        (["--seeds", "0"], "--seeds=0 is invalid"),
        (["--frames", "-5"], "--frames=-5 is invalid"),
        (["--env", "NoSuchEnv"], "--env: unknown gymnasium environment 'NoSuchEnv'"),
        (["--workers", "0"], "--workers=0 is invalid; allowed: int >= 1"),
        (["--ray-address", "auto"], "--ray-address applies to --backend ray only"),
    ]:
        assert cli.main(["sweep", smoke, "--results", str(tmp_path / "r"), *argv]) == 2
        assert fragment in capsys.readouterr().err
    assert cli.main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert "no such spec file" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_dry_run_lists_runs_and_writes_nothing(tmp_path, capsys):
    results = tmp_path / "results"
    rc = cli.main(["sweep", str(EXPERIMENTS / "smoke.yaml"), "--results", str(results),
                   "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    runs = spec_runs("smoke")
    for run in runs:
        assert run.run_id in out
    assert out.count(" missing ") == len(runs)
    assert "4 runs" in out and "4 to run" in out
    assert not results.exists()


def test_jobs_batch_the_seeds_of_one_config():
    from klppo_bench.plan import plan_jobs

    runs = spec_runs("smoke", seeds=5)  # 2 settings x 5 seeds
    jobs, _ = plan_jobs(runs, "auto", None, workers=2)
    assert [len(j) for j in jobs] == [5, 5]  # the largest batches that still feed 2 workers
    for job in jobs:
        assert {e["engine"] for e in job} == {"batched"}
        assert len({e["setting"] for e in job}) == 1
        assert sorted(e["config"]["seed"] for e in job) == [0, 1, 2, 3, 4]
    assert [len(j) for j in plan_jobs(runs, "auto", None, workers=4)[0]] == [2, 3, 2, 3]
    assert [len(j) for j in plan_jobs(runs, "auto", 2, workers=1)[0]] == [1, 2, 2, 1, 2, 2]
    reference, _ = plan_jobs(runs, "reference", None, workers=2)
    assert len(reference) == 10 and {j[0]["engine"] for j in reference} == {"reference"}


def test_unbatchable_configs_fall_back_or_fail_clearly(tmp_path):
    from klppo_bench.plan import plan_jobs

    spec = tmp_path / "shared.yaml"
    spec.write_text("name: shared\nenvs: [Hopper]\nseeds: 2\nframes: 512\n"
                    "variants: [{name: clip}]\nmodel: {trunk: shared}\ntrain: {steps_per_iter: 256}\n")
    runs = expand(load_spec(spec))
    jobs, reasons = plan_jobs(runs, "auto", None, 2)
    assert {j[0]["engine"] for j in jobs} == {"reference"}
    assert list(reasons.values()) == ["model.trunk=shared (batched engine: separate trunks only)"]
    with pytest.raises(ConfigError, match="--engine batched: clip on Hopper-v5: .*allowed"):
        plan_jobs(runs, "batched", None, 2)


def test_spec_plugins_resolve_against_the_spec_folder(tmp_path, monkeypatch, capsys,
                                                      fresh_registry):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "my_plugin.py").write_text(
        "import dataclasses\nfrom klppo_bench.variants import get_variant, register\n"
        "register(dataclasses.replace(get_variant('clip'), name='spec-local-clip'))\n")
    spec = sub / "spec.yaml"
    spec.write_text(BASE.replace("klpen-adaptive", "spec-local-clip")
                    .replace("params: {dtarg: [0.01, 0.03]}", "params: {clip_epsilon: 0.1}")
                    + "plugins: [my_plugin.py]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    runs = expand(load_spec(spec))
    assert {r.config.variant for r in runs} == {"spec-local-clip"}
    # workers and `report` load the plugin from any directory: the path is absolute
    assert runs[0].config.plugins == (str(sub / "my_plugin.py"),)

    # a missing spec plugin names the spec file and its plugins key, not --plugin
    missing = sub / "missing.yaml"
    missing.write_text(BASE + "plugins: [nowhere.py]\n")
    assert cli.main(["sweep", str(missing), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"klppo-bench: error: {missing}: plugins: nowhere.py: cannot import")
    assert f"no such file: {sub / 'nowhere.py'}" in err and "--plugin" not in err
    assert "\n" not in err

    # --plugin keeps resolving against the current directory
    assert cli.main(["sweep", str(spec), "--dry-run", "--plugin", "my_plugin.py"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("klppo-bench: error: --plugin my_plugin.py: cannot import")
    assert f"no such file: {elsewhere / 'my_plugin.py'}" in err


def test_variant_names_alone_expand_like_mapping_entries(tmp_path):
    head = "envs: [Hopper]\nseeds: 2\nframes: 4096\n"
    forms = {
        "short": "variants: [clip, klpen-adaptive]\n",
        "mapping": "variants:\n  - name: clip\n  - name: klpen-adaptive\n    params: {}\n",
        "mixed": "variants:\n  - clip\n  - {name: klpen-adaptive}\n",
    }
    expanded = {}
    for form, variants in forms.items():
        (tmp_path / f"{form}.yaml").write_text("name: same\n" + head + variants)
        runs = expand(load_spec(tmp_path / f"{form}.yaml"))
        expanded[form] = [(r.run_id, r.setting) for r in runs]
    assert expanded["short"] == expanded["mapping"] == expanded["mixed"]
    assert [s for _, s in expanded["short"]] == ["clip", "klpen-adaptive"] * 2

    (tmp_path / "bad.yaml").write_text("name: same\n" + head + "variants: [clip, 3]\n")
    with pytest.raises(ConfigError, match=r"variants\[1\]=3 is invalid; allowed: a variant "
                                          r"name or a mapping with keys name, params"):
        load_spec(tmp_path / "bad.yaml")


def test_dry_run_shows_requested_and_actual_frames(tmp_path, capsys):
    spec = tmp_path / "frames.yaml"
    spec.write_text(BASE.replace("4096", "20000"))
    results = str(tmp_path / "results")
    assert cli.main(["sweep", str(spec), "--results", results, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("frames 20000 (runs 20480: whole iterations of 2048)") == 1
    runs = expand(load_spec(spec))
    assert {r.config.frames for r in runs} == {20000}  # the config keeps what was asked

    # whole iterations: no note, and the run ids are those of a spec that says 4096
    spec.write_text(BASE)
    assert cli.main(["sweep", str(spec), "--results", results, "--dry-run"]) == 0
    assert "(runs " not in capsys.readouterr().out


def test_settings_that_differ_in_hyperparameter_values_share_jobs(capsys, tmp_path):
    """dtarg x increment with 2 seeds: the 9 adaptive settings are lanes of the same jobs
    (clip's structure differs, so it gets its own), and --dry-run shows each job's engine."""
    from klppo_bench.cli import main
    from klppo_bench.plan import plan_jobs

    runs = spec_runs("dtarg_increment", seeds=2)  # (9 + 1) settings x 2 seeds
    jobs, reasons = plan_jobs(runs, "auto", None, workers=2)
    assert not reasons and {j[0]["engine"] for j in jobs} == {"batched"}
    settings = [{e["setting"] for e in j} for j in jobs]
    packed = [s for s in settings if any(x.startswith("klpen-adaptive") for x in s)]
    assert len(set().union(*packed)) == 9 and all(len(s) > 1 for s in packed)
    assert all("clip" not in s or len(s) == 1 for s in settings)
    assert sorted(len(j) for j in jobs) == [2, 9, 9]
    assert main(["sweep", str(EXPERIMENTS / "dtarg_increment.yaml"), "--seeds", "2",
                 "--results", str(tmp_path), "--dry-run", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 jobs:" in out
    assert out.count("batched    9 lanes  Hopper-v5  klpen-adaptive") == 2


def test_dry_run_lists_only_the_jobs_the_sweep_would_start(capsys, tmp_path):
    """dtarg x increment, 2 seeds: 3 jobs (clip's 2 seeds, two of 9 adaptive lanes). With
    clip done and one adaptive lane done, --dry-run lists 2 jobs, as the real sweep starts
    them, and says the partly done one writes only its 8 missing runs; with every run done, none."""
    from klppo_bench.cli import main
    from klppo_bench.store import RunDir

    runs = spec_runs("dtarg_increment", seeds=2)
    adaptive = next(r for r in runs if r.setting.startswith("klpen-adaptive"))
    for run in [r for r in runs if r.setting == "clip"] + [adaptive]:
        RunDir(tmp_path / "dtarg_increment" / "runs" / run.run_id).set_status("done")
    assert main(["sweep", str(EXPERIMENTS / "dtarg_increment.yaml"), "--seeds", "2",
                 "--results", str(tmp_path), "--dry-run", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 jobs: (1 more planned, all of their runs done)" in out
    assert "clip seeds" not in out.split("2 jobs:")[1]
    assert out.count("trains all 9 lanes again (the same bits), writes 8") == 1
    assert "20 runs in " in out and ": 3 skipped, 17 to run" in out
    for run in runs:
        RunDir(tmp_path / "dtarg_increment" / "runs" / run.run_id).set_status("done")
    assert main(["sweep", str(EXPERIMENTS / "dtarg_increment.yaml"), "--seeds", "2",
                 "--results", str(tmp_path), "--dry-run", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "0 jobs: (all 3 planned jobs done)" in out and "  job 1" not in out


def test_dry_run_shows_a_running_runs_progress(tmp_path, capsys):
    from klppo_bench.cli import main
    from klppo_bench.store import RunDir

    run = spec_runs("smoke")[0]
    rd = RunDir(tmp_path / "smoke" / "runs" / run.run_id)
    rd.start(run.config.to_dict(), setting=run.setting)
    rd.set_progress({"frames": 512, "episode_return": 41.7}, total_frames=1024,
                    started=time.time() - 10)
    assert main(["sweep", str(EXPERIMENTS / "smoke.yaml"), "--results", str(tmp_path),
                 "--dry-run"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if run.run_id in l)
    assert "running" in line and "512/1,024 frames, return 42, eta 0 min" in line


def test_checkpoint_every_is_a_spec_key_checked_like_the_others(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("envs: [Hopper]\nseeds: 1\nframes: 2048\nvariants: [clip]\n"
                    "checkpoint_every: 5\n")
    spec = load_spec(good)
    assert spec.checkpoint_every == 5
    assert [r.run_id for r in expand(spec)] == [r.run_id for r in expand(load_spec(
        _write(tmp_path / "plain.yaml", "envs: [Hopper]\nseeds: 1\nframes: 2048\n"
                                        "variants: [clip]\n")))]  # no part of a run id
    bad = _write(tmp_path / "bad.yaml", "envs: [Hopper]\nseeds: 1\nframes: 2048\n"
                                        "variants: [clip]\ncheckpoint_every: 0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: checkpoint_every=0 is invalid; "
                                          r"allowed: int >= 1"):
        load_spec(bad)


def test_device_is_a_spec_key_the_command_line_replaces(tmp_path):
    """The spec a sweep records (``spec.yaml``, with its ``device``) loads as a spec again."""
    text = "envs: [Hopper]\nseeds: 1\nframes: 2048\nvariants: [clip]\n"
    assert load_spec(_write(tmp_path / "plain.yaml", text)).device == "cpu"
    spec = _write(tmp_path / "cuda.yaml", text + "device: cuda:1\n")
    assert load_spec(spec).device == "cuda:1"
    assert load_spec(spec, device="cpu").device == "cpu"  # --device cpu
    assert load_spec(spec).resolved()["device"] == "cuda:1"
    cpu = load_spec(_write(tmp_path / "cpu.yaml", text + "device: cpu\n"))
    assert [r.run_id for r in expand(cpu)] == [
        r.run_id for r in expand(load_spec(tmp_path / "plain.yaml"))]


def _write(path, text):
    path.write_text(text)
    return path

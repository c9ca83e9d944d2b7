"""The report end to end: a tiny real experiment (torchrl training through ``execute_run``)
and a store-made grid experiment; every table and figure is written, each PDF embeds
TrueType fonts, each PNG shows something, and failed runs and fewer seeds are reported."""

from __future__ import annotations

import json
import shutil

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pypdf import PdfReader

from klppo_bench.cli import main
from klppo_bench.config import build_run_config
from klppo_bench.harness.run import execute_run
from klppo_bench.stats.random_policy import CACHE_NAME, cache_key
from klppo_bench.store import RunDir, run_index

TINY = {"train.steps_per_iter": 256, "train.epochs": 1, "eval.every": 0, "eval.episodes": 1}
RANDOM_EPISODES = 5


@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory):
    """clip x 3 seeds, klpen-adaptive-mc x 2 seeds (one fewer), and one failed run."""
    exp = tmp_path_factory.mktemp("results") / "tiny"
    for variant, seeds in (("clip", 3), ("klpen-adaptive-mc", 2)):
        for seed in range(seeds):
            cfg = build_run_config(variant, "Hopper", seed, frames=512, overrides=TINY)
            assert execute_run(cfg, exp, progress=False, setting=variant).state() == "done"
    failed = RunDir(exp / "runs" / "klpen-adaptive-mc-Hopperv5-s2-failed")
    failed.start({"variant": "klpen-adaptive-mc", "env": "Hopper-v5", "seed": 2, "loss": {}},
                 setting="klpen-adaptive-mc")
    failed.fail("DivergenceError: non-finite loss at iteration 1 (frames 512)")
    return exp


def _report(exp, *extra):
    return main(["report", str(exp), "--reps", "60", "--random-state", "3",
                 "--random-episodes", str(RANDOM_EPISODES), *extra])


def pdf_font_subtypes(path) -> set[str]:
    """Font types of every font a PDF uses: a Type 42 font as matplotlib embeds it (Type0
    whose descendant is CIDFontType2 with a FontFile2, i.e. TrueType outlines) counts as
    TrueType; Type 3 is what ``pdf.fonttype 42`` must avoid."""
    kinds = set()
    for page in PdfReader(str(path)).pages:
        for ref in page["/Resources"].get("/Font", {}).values():
            font = ref.get_object()
            subtype = font["/Subtype"]
            if subtype == "/Type0":
                desc = font["/DescendantFonts"][0].get_object()
                has_ttf = "/FontFile2" in desc["/FontDescriptor"].get_object()
                subtype = "/TrueType" if desc["/Subtype"] == "/CIDFontType2" and has_ttf \
                    else f"/Type0:{desc['/Subtype']}"
            kinds.add(str(subtype))
    return kinds


def check_figures(report_dir, names):
    for name in names:
        pdf, png = report_dir / "figures" / f"{name}.pdf", report_dir / "figures" / f"{name}.png"
        assert pdf.is_file() and png.is_file(), name
        assert pdf_font_subtypes(pdf) == {"/TrueType"}, (name, pdf_font_subtypes(pdf))
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and float(image[..., :3].std()) > 0.01, name  # not blank
        assert Image.open(png).info["dpi"] == pytest.approx((300, 300), abs=0.01), name


def test_tiny_experiment_report(tiny_experiment):
    assert _report(tiny_experiment) == 0
    out = tiny_experiment / "report"
    for table in ("aggregate", "aggregate_raw", "aggregate_reference", "env_setting"):
        for ext in ("md", "tex", "csv"):
            assert (out / "tables" / f"{table}.{ext}").is_file(), (table, ext)
    check_figures(out, ["learning_curves_Hopper-v5", "aggregate_intervals",
                        "performance_profiles", "poi_vs_baseline", "poi_pairwise",
                        "sample_efficiency", "kl_diagnostics_Hopper-v5",
                        "mc_vs_analytic_kl_Hopper-v5", "wall_clock"])

    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == 5 and scores.run_id.is_unique
    assert scores.groupby("setting").size().to_dict() == {"clip": 3, "klpen-adaptive-mc": 2}
    assert np.isfinite(scores[["final_score", "score_minmax", "score_reference"]]).all().all()
    aggregates = pd.read_csv(out / "aggregates.csv")
    assert (aggregates.reps == 60).all() and (aggregates.random_state == 3).all()
    assert {"aggregate", "poi_vs_baseline", "poi_pairwise", "env_setting", "wall_clock"} <= \
        set(aggregates.kind)
    mc = aggregates[(aggregates.kind == "aggregate") & (aggregates.setting == "klpen-adaptive-mc")]
    assert (mc.n_runs == 2).all()                                # the fewer seeds, all kept
    assert (aggregates.ci_low <= aggregates.value + 1e-12).all()
    assert (aggregates.value <= aggregates.ci_high + 1e-12).all()

    # the optimality gap (shortfall below a score of 1) only for normalized scores
    assert "Optimality Gap" in (out / "tables" / "aggregate.md").read_text()
    assert "Optimality Gap" not in (out / "tables" / "aggregate_raw.md").read_text()
    raw = aggregates[(aggregates.kind == "aggregate") & (aggregates.normalization == "raw")]
    assert set(raw.metric) == {"IQM", "Mean", "Median"}

    tex = (out / "tables" / "aggregate.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex
    assert "\\mathbf{" in tex or "\\underline{" in tex     # a best, or the tied leaders
    md = (out / "report.md").read_text()
    assert "klpen-adaptive-mc-Hopperv5-s2-failed" in md and "DivergenceError" in md
    assert "60 repetitions, random state 3" in md and "rliable 1.2.0" in md
    assert "Settings have different numbers of runs" in md
    assert "dtarg x increment" in md                            # skipped, and said so
    for figure in ("learning_curves_Hopper-v5", "kl_diagnostics_Hopper-v5"):
        assert f"figures/{figure}.png" in md
    cache = json.loads((tiny_experiment.parent / ".cache" / CACHE_NAME).read_text())
    assert cache_key("Hopper-v5", RANDOM_EPISODES, 0) in cache

    # the same inputs give the same numbers
    first = aggregates.value.to_numpy()
    assert _report(tiny_experiment) == 0
    np.testing.assert_array_equal(pd.read_csv(out / "aggregates.csv").value.to_numpy(), first)


def test_garbage_metrics_gives_a_complete_report_listing_the_run(tiny_experiment, tmp_path,
                                                                 capsys):
    """One run's metrics.parquet overwritten with garbage: the report is complete without it,
    lists it under *Runs not readable* with its path and error, and the CLI exits 1."""
    exp = tmp_path / "results" / "tiny"
    shutil.copytree(tiny_experiment, exp, ignore=shutil.ignore_patterns("report", ".report*"))
    if (tiny_experiment.parent / ".cache").is_dir():  # the random-policy scores, if measured
        shutil.copytree(tiny_experiment.parent / ".cache", tmp_path / "results" / ".cache")
    index = run_index(exp, states=("done",))
    victim = index[index.setting == "clip"].sort_values("seed").iloc[0]
    garbage = exp / "runs" / victim.run_id / "metrics.parquet"
    garbage.write_bytes(b"this is not a parquet file at all")
    assert _report(exp) == 1
    assert f"{garbage}: ArrowInvalid" in capsys.readouterr().err

    out = exp / "report"
    check_figures(out, ["learning_curves_Hopper-v5", "aggregate_intervals",
                        "performance_profiles", "poi_vs_baseline", "poi_pairwise",
                        "sample_efficiency", "kl_diagnostics_Hopper-v5",
                        "mc_vs_analytic_kl_Hopper-v5", "wall_clock"])
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == 4 and victim.run_id not in set(scores.run_id)
    assert scores.groupby("setting").size().to_dict() == {"clip": 2, "klpen-adaptive-mc": 2}
    aggregates = pd.read_csv(out / "aggregates.csv")
    clip = aggregates[(aggregates.kind == "aggregate") & (aggregates.setting == "clip")]
    assert (clip.n_runs == 2).all()
    md = (out / "report.md").read_text()
    unreadable = md.split("## Runs not readable")[1].split("\n## ")[0]
    listed = [line for line in unreadable.splitlines() if line.startswith("- ")]
    assert len(listed) == 1 and str(garbage) in listed[0]
    assert "Parquet magic bytes not found" in listed[0]
    assert "klpen-adaptive-mc-Hopperv5-s2-failed" in md.split("## Runs not done")[1]
    for section in ("## Aggregate (min-max normalized)", "## Final score per environment",
                    "## Figures"):
        assert section in md


def _store_run(exp, setting, variant, env, seed, loss, level):
    rng = np.random.default_rng([seed, int(level)])
    frames = np.arange(1, 11) * 256
    ret = level * frames / frames[-1] + rng.normal(0, 5, 10)
    kl = np.abs(rng.normal(loss.get("dtarg", 0.01), 0.003, 10))
    m = pd.DataFrame({"frames": frames, "episode_return": ret, "kl_batch": kl,
                      "kl_estimate": kl, "kl_estimate_err_std": 0.0,
                      "beta": np.exp(rng.normal(0, 0.3, 10)) if "dtarg" in loss else np.nan})
    run = RunDir(exp / "runs" / f"{setting}-{env}-s{seed}".replace("=", "").replace(",", "-"))
    run.start({"variant": variant, "env": env, "seed": seed, "loss": loss}, setting=setting)
    run.finish({"metrics": m}, {"final_score": float(ret[-3:].mean()),
                                "final_eval_return": float(ret[-1]), "frames": 2560,
                                "sps": 100.0}, seconds=25.0 + seed)


def test_grid_experiment_sensitivity_and_table1(tmp_path):
    """A dtarg x increment grid over two envs, written with the store API (no training)."""
    exp = tmp_path / "results" / "grid"
    envs = ("Hopper-v5", "InvertedPendulum-v5")
    for env in envs:
        for seed in range(2):
            _store_run(exp, "clip", "clip", env, seed, {"clip_epsilon": 0.2}, 900)
            for dtarg in (0.003, 0.03):
                for inc in (1.5, 2.0):
                    loss = {"beta": 1.0, "dtarg": dtarg, "increment": inc, "decrement": 1 / inc}
                    _store_run(exp, f"klpen-adaptive(dtarg={dtarg},increment={inc})",
                               "klpen-adaptive", env, seed, loss, 500 + 1e4 * dtarg * inc)
    cache = tmp_path / "results" / ".cache"
    cache.mkdir(parents=True)
    (cache / CACHE_NAME).write_text(json.dumps({  # pre-seeded: no measurement in this test
        cache_key(env, RANDOM_EPISODES, 0): {"env": env, "mean": 10.0, "std": 1.0,
                                             "episodes": RANDOM_EPISODES, "seed": 0}
        for env in envs}))
    assert _report(exp, "--baseline", "clip") == 0
    out = exp / "report"
    for table in ("table1", "aggregate", "env_setting", "dtarg_increment"):
        assert (out / "tables" / f"{table}.tex").is_file()
    check_figures(out, ["dtarg_increment_lines", "dtarg_increment_heatmap",
                        "learning_curves_InvertedPendulum-v5", "kl_diagnostics_Hopper-v5"])
    assert not (out / "figures" / "mc_vs_analytic_kl_Hopper-v5.png").exists()
    aggregates = pd.read_csv(out / "aggregates.csv")
    grid = aggregates[aggregates.kind == "dtarg_increment"]
    assert len(grid) == 4 and set(grid.normalization) == {"minmax"}
    md = (out / "report.md").read_text()
    assert "Table 1 style" in md and "No Monte-Carlo KL setting" in md
    assert "No shipped reference score for InvertedPendulum" not in md  # CleanRL has it
    # the paper's Table 1 number beside each setting that is one of its rows (clip 0.2,
    # adaptive KL with increment 2), none for the others (increment 1.5 is not the paper's)
    table1 = pd.read_csv(out / "tables" / "table1.csv").set_index("setting")
    paper = table1["PPO paper (-v1)"]
    assert paper["clip"] == 0.82
    assert paper["klpen-adaptive(dtarg=0.003,increment=2.0)"] == 0.68
    assert paper["klpen-adaptive(dtarg=0.03,increment=2.0)"] == 0.71
    assert paper[[s for s in paper.index if "increment=1.5" in s]].isna().all()


def test_report_of_a_spec_finds_its_experiment_by_name(tiny_experiment, tmp_path, capsys):
    """``report SPEC --results ROOT`` reports ROOT/<the spec's name:>, whatever the file is
    called (what ``make bench`` / ``make report`` run)."""
    spec = tmp_path / "renamed_file.yaml"
    spec.write_text("name: tiny\nenvs: [Hopper]\nseeds: 1\nframes: 512\n"
                    "variants:\n  - name: clip\n")
    out = tmp_path / "out"
    assert main(["report", str(spec), "--results", str(tiny_experiment.parent), "--reps", "60",
                 "--random-episodes", str(RANDOM_EPISODES), "--out", str(out)]) == 0
    assert "report: 5 finished runs" in capsys.readouterr().out
    assert (out / "report.md").is_file()
    spec.write_text("name: tiny\nenvs: [Hopper]\nseeds: many\nvariants: [{name: clip}]\n")
    assert main(["report", str(spec), "--results", str(tiny_experiment.parent)]) == 2
    assert "seeds" in capsys.readouterr().err


def test_report_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err and "allowed" in err
    assert not (tmp_path / "missing").exists()
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert not (tmp_path / "empty" / "report").exists()


def test_a_failed_rebuild_leaves_the_previous_report_whole(tiny_experiment, monkeypatch):
    from klppo_bench.report import build

    report = tiny_experiment / "report"
    if not (report / "report.md").exists():
        assert _report(tiny_experiment) == 0
    before = {p: p.stat().st_mtime_ns for p in report.rglob("*") if p.is_file()}

    def broken(rep):
        (rep.out / "figures").mkdir(exist_ok=True)
        (rep.out / "figures" / "half.png").write_bytes(b"partial")
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(build, "draw", broken)
    with pytest.raises(RuntimeError, match="drawing failed"):
        build.build_report(tiny_experiment)
    assert {p: p.stat().st_mtime_ns for p in report.rglob("*") if p.is_file()} == before
    assert not list(tiny_experiment.glob(".report.building-*"))


def test_a_partly_finished_experiment_lists_its_running_runs_with_progress(tiny_experiment,
                                                                          tmp_path):
    """The report of an experiment still running: the finished runs are reported, the running
    one is listed under *Runs not done* with its frames, latest return and ETA."""
    import time

    from klppo_bench.store import RunDir

    exp = tmp_path / "results" / "tiny"
    shutil.copytree(tiny_experiment, exp, ignore=shutil.ignore_patterns("report", ".report*"))
    if (tiny_experiment.parent / ".cache").is_dir():
        shutil.copytree(tiny_experiment.parent / ".cache", tmp_path / "results" / ".cache")
    index = run_index(exp, states=("done",))
    victim = index[index.setting == "clip"].sort_values("seed").iloc[-1]
    run = RunDir(exp / "runs" / victim.run_id)
    run.start(run.config(), setting="clip")
    run.set_progress({"frames": 256, "episode_return": 12.3}, total_frames=512,
                     started=time.time() - 5)
    assert _report(exp) == 0
    scores = pd.read_csv(exp / "report" / "scores.csv")
    assert victim.run_id not in set(scores.run_id) and len(scores) == 4
    md = (exp / "report" / "report.md").read_text()
    not_done = md.split("## Runs not done")[1].split("\n## ")[0]
    line = next(l for l in not_done.splitlines() if victim.run_id in l)
    assert "| running |" in line and "256/512 frames, return 12, eta 0 min" in line

"""Reports of experiments written with the store API (no training): damaged run records are
listed and skipped, engines are shown and wall-clock is compared within one engine, and
statistical ties are underlined instead of bold. Plus the KL / dtarg figure's aggregation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from klppo_bench.cli import main
from klppo_bench.report import figures, style
from klppo_bench.report.build import ReportOptions, build_report
from klppo_bench.report.draw import kl_ratio_and_beta
from klppo_bench.report.tables import MARK_LEGEND, mark_mask, to_latex, to_markdown
from klppo_bench.stats.random_policy import CACHE_NAME, cache_key
from klppo_bench.store import RunDir, atomic_write_parquet, load_tables, run_index, scan_runs

RANDOM_EPISODES = 5
ENV = "Hopper-v5"


def store_run(exp, setting, seed, level, engine="reference", seconds=25.0, variant=None,
              loss=None, noise=5.0, env=ENV):
    """A done run written through the store: a rising return curve ending near ``level``."""
    loss = loss if loss is not None else {"clip_epsilon": 0.2}
    rng = np.random.default_rng([seed, int(level)])
    frames = np.arange(1, 11) * 256
    ret = level * frames / frames[-1] + rng.normal(0, noise, 10)
    m = pd.DataFrame({"frames": frames, "episode_return": ret,
                      "kl_batch": np.abs(rng.normal(0.01, 0.003, 10)), "beta": np.nan})
    suffix = "" if env == ENV else f"-{env}"
    run = RunDir(exp / "runs" / f"{setting}-s{seed}-{engine}{suffix}")
    run.start({"variant": variant or setting, "env": env, "seed": seed, "loss": loss},
              setting=setting, provenance={"engine": engine} if engine else {})
    run.finish({"metrics": m}, {"final_score": float(level + rng.normal(0, noise)),
                                "final_eval_return": float(ret[-1]), "frames": 2560,
                                "sps": 100.0}, seconds=seconds + seed)
    return run


def seed_random_cache(results_root, envs=(ENV,)):
    cache = results_root / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / CACHE_NAME).write_text(json.dumps({
        cache_key(env, RANDOM_EPISODES, 0): {"env": env, "mean": 10.0, "std": 1.0,
                                             "episodes": RANDOM_EPISODES, "seed": 0}
        for env in envs}))


def options(**kw):
    return ReportOptions(reps=50, random_state=1, random_episodes=RANDOM_EPISODES, **kw)


@pytest.fixture
def experiment(tmp_path):
    exp = tmp_path / "results" / "exp"
    for seed in range(3):
        store_run(exp, "clip", seed, 900)
        store_run(exp, "no-clip", seed, 300)
    seed_random_cache(tmp_path / "results")
    return exp


# ----------------------------------------------------------------------------- reading

def test_damaged_records_are_listed_and_the_rest_reported(experiment, capsys):
    runs = {r.name: r for r in (experiment / "runs").iterdir()}
    (runs["clip-s0-reference"] / "metrics.parquet").write_bytes(b"garbage, not parquet")
    (runs["clip-s1-reference"] / "status.json").write_text("{not json")
    (runs["no-clip-s0-reference"] / "metrics.parquet").unlink()
    atomic_write_parquet(runs["no-clip-s1-reference"] / "metrics.parquet",
                         pd.DataFrame({"frames": [256], "kl": [0.1]}))  # no episode_return
    (runs["no-clip-s2-reference"] / "summary.json").write_text("[1, 2]")  # not an object
    (experiment / "runs" / "bad-config").mkdir()
    (experiment / "runs" / "bad-config" / "status.json").write_text('{"state": "done"}')
    (experiment / "runs" / "bad-config" / "config.yaml").write_text("env: Hopper-v5\n")

    index, unreadable = scan_runs(experiment)
    assert sorted(index.run_id) == ["clip-s0-reference", "clip-s2-reference",
                                    "no-clip-s0-reference", "no-clip-s1-reference",
                                    "no-clip-s2-reference"]
    assert {u.run_id: u.error.split(":")[0] for u in unreadable} == {
        "bad-config": "ValueError", "clip-s1-reference": "JSONDecodeError"}
    assert "missing keys: variant, seed" in unreadable[0].error
    assert list(run_index(experiment).run_id) == list(index.run_id)   # unchanged contract
    _, bad = load_tables(index, "metrics", ("frames", "episode_return"))
    assert [u.run_id for u in bad] == ["clip-s0-reference", "no-clip-s0-reference",
                                       "no-clip-s1-reference"]

    rep = build_report(experiment, options(baseline="clip"))
    bad = {u.run_id: u for u in rep.unreadable}
    assert set(bad) == {"bad-config", "clip-s0-reference", "clip-s1-reference",
                        "no-clip-s0-reference", "no-clip-s1-reference", "no-clip-s2-reference"}
    assert "Parquet magic bytes not found" in bad["clip-s0-reference"].error
    assert bad["clip-s0-reference"].path.endswith("clip-s0-reference/metrics.parquet")
    assert bad["no-clip-s0-reference"].error.startswith("FileNotFoundError")
    assert "missing columns: episode_return" in bad["no-clip-s1-reference"].error
    assert bad["clip-s1-reference"].path.endswith("status.json")
    assert bad["no-clip-s2-reference"].path.endswith("summary.json")
    assert list(rep.runs.run_id) == ["clip-s2-reference"]             # the one readable run
    assert set(rep.metrics.run_id) == {"clip-s2-reference"}
    md = (experiment / "report" / "report.md").read_text()
    section = md.split("## Runs not readable")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(lines) == 6 and all("\n" not in u.error for u in rep.unreadable)
    assert any("clip-s0-reference/metrics.parquet" in line and "magic bytes" in line
               for line in lines)
    assert "6 run(s) could not be read" in md

    assert main(["report", str(experiment), "--reps", "50", "--random-episodes",
                 str(RANDOM_EPISODES)]) == 1                           # written, but exit 1
    captured = capsys.readouterr()
    assert "6 not readable" in captured.out
    assert captured.err.count("run not readable") == 6


def test_png_resolution_is_an_option(experiment, tmp_path):
    """``--png-dpi`` sets the PNGs' resolution (the shipped reports use 150 to fit the size
    budget); the PDFs stay vector and report.md says which resolution it used."""
    from PIL import Image

    sizes = {}
    for dpi in (300, 100):
        out = tmp_path / f"report{dpi}"
        assert main(["report", str(experiment), "--reps", "50", "--random-episodes",
                     str(RANDOM_EPISODES), "--out", str(out), "--png-dpi", str(dpi)]) == 0
        png = out / "figures" / "aggregate_intervals.png"
        with Image.open(png) as image:
            assert round(image.info["dpi"][0]) == dpi
            sizes[dpi] = image.size
        assert f"{dpi}-dpi .png" in (out / "report.md").read_text()
    assert sizes[100][0] < sizes[300][0] / 2.5     # a third of the pixels across


def test_nothing_readable_is_a_one_line_error(experiment, capsys):
    for run in (experiment / "runs").iterdir():
        (run / "metrics.parquet").write_bytes(b"garbage bytes, not parquet")
    assert main(["report", str(experiment), "--random-episodes", str(RANDOM_EPISODES)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "6 not readable" in err and "magic bytes" in err


# ----------------------------------------------------------------------------- engines

def test_engines_are_shown_and_wall_clock_compared_within_one(tmp_path):
    exp = tmp_path / "results" / "engines"
    for seed in range(3):
        store_run(exp, "clip", seed, 900, engine="batched", seconds=10.0)
        store_run(exp, "no-clip", seed, 300, engine="reference", seconds=60.0)
        store_run(exp, "dual-clip", seed, 800, engine="batched" if seed < 2 else "reference",
                  seconds=12.0 if seed < 2 else 70.0)
    seed_random_cache(tmp_path / "results")
    rep = build_report(exp, options(baseline="clip"))
    assert rep.engines == {"clip": "batched", "dual-clip": "batched+reference",
                           "no-clip": "reference"}
    md = (exp / "report" / "report.md").read_text()
    top = md.split("**Score.**")[0]
    assert "**Engines differ.**" in top
    assert ("batched: `clip`; batched+reference: `dual-clip`; reference: `no-clip`" in top
            and "per-run wall-clock is not comparable across engines" in top)
    settings = md.split("## Settings")[1].split("\n## ")[0]
    assert "| `dual-clip` | dual-clip | batched+reference |" in settings
    assert "| `no-clip` | no-clip | reference |" in settings

    cost = rep.cost.set_index(["engine", "setting"])
    assert sorted(cost.index) == [("batched", "clip"), ("batched", "dual-clip"),
                                  ("reference", "dual-clip"), ("reference", "no-clip")]
    assert cost.loc[("batched", "dual-clip"), "value"] == pytest.approx(12.5)  # seeds 0, 1
    assert cost.loc[("reference", "dual-clip"), "value"] == pytest.approx(72.0)
    assert cost.loc[("batched", "dual-clip"), "n_runs"] == 2
    table = pd.read_csv(exp / "report" / "tables" / "wall_clock.csv")
    assert list(table.engine) == ["batched", "batched", "reference", "reference"]
    wall = md.split("## Wall-clock per run (within each engine)")[1].split("\n## ")[0]
    # the fastest of each engine is marked, not one across engines; a setting measured by
    # one job (reference dual-clip: seed 2 only) has no CI, so the reference group has one
    # interval and ranks nothing
    bold = [line for line in wall.splitlines() if "**" in line and line.startswith("|")]
    assert wall.count("**") == 2 and len(bold) == 1 and bold[0].startswith("| batched | clip |")
    assert cost.loc[("reference", "dual-clip"), "jobs"] == 1
    assert np.isnan(cost.loc[("reference", "dual-clip"), "ci_low"])
    aggregates = pd.read_csv(exp / "report" / "aggregates.csv")
    assert set(aggregates[aggregates.kind == "wall_clock"].engine) == {"batched", "reference"}

    fig = figures.wall_clock(rep.cost, style.setting_styles(rep.settings))
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["clip [batched]", "dual-clip [batched]", "dual-clip [reference]",
                      "no-clip [reference]"]             # top to bottom, grouped by engine


def test_one_engine_says_nothing_about_engines(experiment):
    build_report(experiment, options(baseline="clip"))
    md = (experiment / "report" / "report.md").read_text()
    assert "Engines differ" not in md and "| `clip` (baseline) | clip | reference |" in md


def test_unrecorded_engine_is_named(tmp_path):
    exp = tmp_path / "results" / "old"
    for seed in range(2):
        store_run(exp, "clip", seed, 900, engine=None)
    seed_random_cache(tmp_path / "results")
    rep = build_report(exp, options())
    assert rep.engines == {"clip": "unrecorded"} and not rep.mixed_engines


# ----------------------------------------------------------------------------- ties

def _cells(a, b):
    return pd.DataFrame({"setting": ["clip", "dual-clip"], "IQM": [a, b]})


def test_tie_up_to_1e5_is_underlined_not_bold():
    tied = _cells((0.81, 0.70, 0.92), (0.81 + 1e-5, 0.70 + 1e-5, 0.92 + 1e-5))
    assert list(mark_mask(tied, {"IQM": "max"}, None).IQM) == ["underline", "underline"]
    md = to_markdown(tied, {"IQM": "max"})
    assert "**" not in md and md.count("<ins>0.81</ins>") == 2
    tex = to_latex(tied, {"IQM": "max"})
    assert "\\mathbf" not in tex and tex.count("\\underline{0.81}") == 2

    apart = _cells((0.81, 0.75, 0.88), (0.41, 0.30, 0.52))
    assert list(mark_mask(apart, {"IQM": "max"}, None).IQM) == ["bold", ""]
    md = to_markdown(apart, {"IQM": "max"})
    assert "**0.81** [0.75, 0.88]" in md and "<ins>" not in md
    assert "$\\mathbf{0.81}_{" in to_latex(apart, {"IQM": "max"})
    # a lower is better column, and degenerate CIs that print the same
    gap = _cells((0.2, 0.1, 0.3), (0.6, 0.5, 0.7))
    assert list(mark_mask(gap, {"IQM": "min"}, None).IQM) == ["bold", ""]
    same = _cells((0.5, 0.5, 0.5), (0.500001, 0.500001, 0.500001))
    assert list(mark_mask(same, {"IQM": "max"}, None).IQM) == ["underline", "underline"]


def test_report_underlines_tied_settings_and_says_the_best_is_tied(tmp_path):
    exp = tmp_path / "results" / "ties"
    for seed in range(3):
        store_run(exp, "clip", seed, 900.0)
        store_run(exp, "dual-clip", seed, 900.0 + 1e-5)   # the same up to 1e-5
        store_run(exp, "no-clip", seed, 100.0, noise=1.0)
    seed_random_cache(tmp_path / "results")
    rep = build_report(exp, options(baseline="clip"))
    assert rep.constants.best_setting.iloc[0] == "dual-clip"
    assert rep.best_tied == {ENV: ["clip"]}
    md = (exp / "report" / "report.md").read_text()
    norm = md.split("## Normalization constants")[1].split("\n## ")[0]
    assert "`dual-clip` (tied with `clip`: overlapping 95% CIs)" in norm
    per_env = md.split("## Final score per environment")[1].split("\n## ")[0]
    rows = {line.split("|")[2].strip(): line for line in per_env.splitlines()
            if line.startswith(f"| {ENV}")}
    assert "<ins>" in rows["clip"] and "<ins>" in rows["dual-clip"]
    assert "**" not in rows["clip"] + rows["dual-clip"] and "<ins>" not in rows["no-clip"]
    assert MARK_LEGEND in per_env and "underlined: statistically tied for best" in per_env
    tex = (exp / "report" / "tables" / "env_setting.tex").read_text()
    assert "\\underline{" in tex and "\\mathbf{" not in tex and MARK_LEGEND in tex

    # clearly separated: bold, and the best setting is not tied
    exp2 = tmp_path / "results" / "apart"
    for seed in range(3):
        store_run(exp2, "clip", seed, 900.0, noise=1.0)
        store_run(exp2, "no-clip", seed, 100.0, noise=1.0)
    rep = build_report(exp2, options(baseline="clip"))
    assert rep.best_tied == {ENV: []}
    md = (exp2 / "report" / "report.md").read_text()
    assert "| `clip` |" in md.split("## Normalization constants")[1].split("\n## ")[0]
    assert "tied with" not in md
    per_env = md.split("## Final score per environment")[1].split("\n## ")[0]
    assert per_env.count("**") == 4 and "<ins>" not in per_env   # mean and IQM of clip


# ----------------------------------------------------------------------------- KL figure

def test_kl_ratio_is_the_median_seed_and_beta_the_geometric_mean():
    """Hand-made KL of 3 seeds, constant over 4 iterations: seed 2's KL is 100 x dtarg."""
    dtarg, frames = 0.01, np.array([100, 200, 300, 400])
    rows = []
    for seed, (ratio, beta) in enumerate([(1.0, 1.0), (2.0, 4.0), (100.0, 16.0)]):
        for f in frames:
            for metric, value in (("kl_batch", ratio * dtarg), ("beta", beta)):
                rows.append({"run_id": f"r{seed}", "env": ENV, "variant": "klpen",
                             "setting": "klpen", "params": f"dtarg={dtarg}", "seed": seed,
                             "frames": f, "metric": metric, "value": value})
    grid, ratio, beta = kl_ratio_and_beta(pd.DataFrame(rows), ENV, ["klpen"], reps=100,
                                          random_state=0, points=4)
    np.testing.assert_allclose(grid, frames)
    np.testing.assert_allclose(ratio["klpen"][0], 2.0)            # median; the mean is 34.3
    np.testing.assert_allclose(beta["klpen"][0], 4.0)             # (1 * 4 * 16) ** (1/3)
    for point, low, high in (ratio["klpen"], beta["klpen"]):
        assert (low <= point + 1e-12).all() and (point <= high + 1e-12).all()


def test_wall_clock_counts_a_batched_job_once(tmp_path):
    """Lanes of one batched job share its time: one job is one measurement, so a setting
    trained by one job gets no CI (the report never bolds a scheduling accident)."""
    exp = tmp_path / "results" / "jobs"
    runs = [store_run(exp, s, seed, 900, engine="batched", seconds=7.0)
            for s in ("clip", "no-clip") for seed in range(3)]
    for run in runs:  # clip's 3 lanes in one job, no-clip's in another
        status = json.loads((run.path / "status.json").read_text())
        mates = [r.run_id for r in runs if r.run_id.split("-s")[0] == run.run_id.split("-s")[0]]
        status["provenance"]["batch_runs"] = mates
        status["seconds"] = 7.0
        (run.path / "status.json").write_text(json.dumps(status))
    seed_random_cache(tmp_path / "results")
    rep = build_report(exp, options(baseline="clip"))
    cost = rep.cost.set_index("setting")
    assert cost.loc["clip", "jobs"] == 1 and cost.loc["clip", "n_runs"] == 3
    assert cost.loc["clip", "lanes_per_job"] == 3
    assert np.isnan(cost.loc["clip", "ci_low"]) and cost.loc["clip", "value"] == 7.0
    wall = (exp / "report" / "report.md").read_text() \
        .split("## Wall-clock per run (within each engine)")[1].split("\n## ")[0]
    assert "**" not in wall.split("*underlined")[0]
    # the figure draws no interval for a one-job setting and says why
    fig = figures.wall_clock(rep.cost, style.setting_styles(rep.settings))
    notes = [t.get_text() for t in fig.axes[0].texts]
    assert notes == ["1 job, no CI", "1 job, no CI"]
    from matplotlib.container import BarContainer, ErrorbarContainer

    containers = fig.axes[0].containers
    assert not any(isinstance(c, ErrorbarContainer) for c in containers)
    assert all(c.errorbar is None for c in containers if isinstance(c, BarContainer))


def test_settings_are_ordered_by_the_values_in_their_labels():
    """beta=0.3 < 1 < 3 < 10 in every table and figure, not 1 < 10 < 3 as strings sort."""
    from klppo_bench.report.collect import natural_key

    labels = ["klpen-fixed(beta=10)", "klpen-fixed(beta=3)", "no-clip", "klpen-fixed(beta=0.3)",
              "klpen-fixed(beta=1)", "clip(clip_epsilon=0.1)", "clip [frames=1024]",
              "klpen-adaptive(dtarg=0.003,increment=4)", "klpen-adaptive(dtarg=0.003,increment=2)"]
    assert sorted(labels, key=natural_key) == [
        "clip [frames=1024]", "clip(clip_epsilon=0.1)",
        "klpen-adaptive(dtarg=0.003,increment=2)", "klpen-adaptive(dtarg=0.003,increment=4)",
        "klpen-fixed(beta=0.3)", "klpen-fixed(beta=1)", "klpen-fixed(beta=3)",
        "klpen-fixed(beta=10)", "no-clip"]


def test_few_runs_per_cell_get_a_note_that_their_cis_understate_the_uncertainty(tmp_path):
    """A percentile bootstrap CI over 3 runs cannot reach beyond them: the report says so
    (Table 1 has 3 seeds a cell); with 5 runs a cell, or one run (no CI at all), it does not."""
    from klppo_bench.report.collect import collect

    exp = tmp_path / "results" / "exp"
    for seed in range(3):
        store_run(exp, "no-clip", seed, 300)
    for seed in range(5):
        store_run(exp, "clip", seed, 900)
    store_run(exp, "lone", 0, 500)
    seed_random_cache(tmp_path / "results")
    notes = [n for n in collect(exp, options(baseline="clip")).notes if n.startswith("Few")]
    assert len(notes) == 1
    assert notes[0].startswith("Few runs: 1 of 3 setting x environment cells have 3 runs "
                               "(fewer than 5). A percentile bootstrap interval never reaches "
                               "beyond the lowest and highest of the runs")
    for seed in range(3, 5):
        store_run(exp, "no-clip", seed, 300)
    assert not [n for n in collect(exp, options(baseline="clip")).notes if n.startswith("Few")]


def test_aggregates_use_only_the_environments_every_setting_ran_on(tmp_path):
    """A sweep still under way: on its second task only `no-clip` is done. Its runs there are
    that task's best (min-max 1), so pooling them would lift `no-clip`'s average; aggregates
    over environments use the first task only, and the note names what is left out."""
    exp = tmp_path / "results" / "exp"
    other = "Swimmer-v5"  # no shipped reference score: no reason to skip Hopper's
    for seed in range(3):
        store_run(exp, "clip", seed, 900)
        store_run(exp, "no-clip", seed, 300)
        store_run(exp, "no-clip", seed, 800, env=other)
    seed_random_cache(tmp_path / "results", envs=(ENV, other))
    rep = build_report(exp, options(baseline="clip"))
    assert rep.envs == [ENV, other] and rep.aggregate_envs == [ENV]
    agg = rep.aggregates
    rows = agg[(agg.kind == "aggregate") & (agg.normalization == "minmax")]
    assert set(rows.n_tasks) == {1} and set(rows.n_runs) == {3}
    mean = rows[rows.metric == "Mean"].set_index("setting").value
    expected = rep.scores[(rep.scores.env == ENV)].groupby("setting").score_minmax.mean()
    assert mean["no-clip"] == pytest.approx(expected["no-clip"], abs=1e-12)
    assert mean["no-clip"] < 0.5  # with Swimmer's 1.0s pooled it would be about 0.66
    assert set(agg.normalization) >= {"minmax", "reference"}
    assert not [n for n in rep.notes if n.startswith("No shipped reference")]
    notes = [n for n in rep.notes if n.startswith("Aggregates over environments")]
    assert len(notes) == 1 and f"use the 1 environment(s) every setting ran on ({ENV})" \
        in notes[0] and f"Left out of them: {other} (no run of clip)" in notes[0]
    assert not [n for n in rep.notes if n.startswith("Unequal seeds")]
    table1 = rep.tables["table1"]
    assert f"average over {ENV} (every setting ran there)" in table1
    header, _, *lines = table1.splitlines()
    assert other in header  # its column stays, with no-clip's runs in it
    row = next(line for line in lines if line.startswith("| no-clip"))
    assert row.split("|")[header.split("|").index(f" {other} ")].strip().startswith("1.00")

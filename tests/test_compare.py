"""``report --compare-to``: a tiny user experiment pooled with a tiny stored reference made
here. Matching stored runs join (under the user's label where the definition is the same),
stored runs of another definition are listed with why, and the stored runs' code version is
named. Also the results API (``kb.load_runs`` / ``load_curves`` / ``score_matrices``) on the
same directories, and the probability-of-improvement baseline at the variant's defaults."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pandas as pd
import pytest

import klppo_bench as kb
from klppo_bench.cli import main

TRAIN = """
train:
  steps_per_iter: 256
  minibatch_size: 64
  epochs: {epochs}
eval:
  every: 0
  episodes: 1
"""


def _sweep(tmp_path, name: str, variants: str, epochs: int = 1, seeds="2") -> None:
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: {name}
        envs: [Hopper]
        seeds: {seeds}
        frames: 512
        variants:
        """) + textwrap.indent(textwrap.dedent(variants), "  ")
        + TRAIN.format(epochs=epochs))
    assert main(["sweep", str(spec), "--results", str(tmp_path / "results"),
                 "--workers", "1", "--progress-interval", "1000"]) == 0


def _as_other_version(exp_dir) -> None:
    """Rewrite the stored runs' provenance as if an older release had trained them."""
    for status in exp_dir.glob("runs/*/status.json"):
        s = json.loads(status.read_text())
        s["provenance"]["git"] = {"commit": "0123456789abcdef0123", "dirty": False}
        s["provenance"]["versions"]["klppo-bench"] = "0.0.9"
        status.write_text(json.dumps(s))


@pytest.fixture(scope="module")
def experiments(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    # the stored reference: clip at two epsilons and no-clip, seeds 1, 2, 3, epochs 1
    _sweep(tmp, "stored", """
        - name: clip
          params: {clip_epsilon: [0.1, 0.2]}
        - name: no-clip
        """, seeds="[1, 2, 3]")
    # stored runs of another harness (epochs 2): all left out of a comparison
    _sweep(tmp, "stored_other", """
        - name: clip
        """, epochs=2)
    # the user's experiment: their own setting, plus clip at its defaults, seeds 0 and 1
    _sweep(tmp, "mine", """
        - name: klpen-fixed
        - name: clip
        """)
    results = tmp / "results"
    _as_other_version(results / "stored")
    return results


def _report(exp, out, *extra):
    return main(["report", str(exp), "--out", str(out), "--reps", "50",
                 "--random-episodes", "3", *extra])


def test_compare_to_pools_matching_runs_and_names_their_version(experiments, tmp_path):
    out = tmp_path / "report"
    assert _report(experiments / "mine", out, "--compare-to", str(experiments / "stored")) == 0
    scores = pd.read_csv(out / "scores.csv")
    per_setting = scores.groupby("setting").size().to_dict()
    # stored clip(clip_epsilon=0.2) has the definition of the user's clip: its seeds 2 and
    # 3 join as clip; its seed 1 is the user's run already (same run id): left out
    assert per_setting == {"clip": 4, "klpen-fixed": 2, "clip(clip_epsilon=0.1)": 3,
                           "no-clip": 3}
    stored = scores[scores.source.str.endswith("stored")]
    assert set(stored.commit) == {"0123456789ab"}
    text = (out / "report.md").read_text()
    assert "commit 0123456789ab (klppo-bench 0.0.9" in text
    assert "## Stored runs left out" in text
    assert "- the same run is in this experiment: 1 run(s): clip-Hopperv5-s1-" in text
    assert "Stored `clip(clip_epsilon=0.2)` has the definition of this experiment's `clip`" \
        in text


def test_compare_to_lists_runs_of_another_harness(experiments, tmp_path):
    out = tmp_path / "report"
    assert _report(experiments / "mine", out, "--compare-to",
                   str(experiments / "stored_other")) == 0
    scores = pd.read_csv(out / "scores.csv")
    assert set(scores.setting) == {"clip", "klpen-fixed"}
    assert len(scores) == 4  # nothing stored joined
    text = (out / "report.md").read_text()
    assert "harness differs: train.epochs 2 (this experiment: 1): 2 run(s)" in text


def test_compare_to_a_missing_directory_is_one_line(experiments, tmp_path, capsys):
    out = tmp_path / "report"
    assert _report(experiments / "mine", out, "--compare-to", str(tmp_path / "nope")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compare-to" in err[0] and "no runs directory" in err[0]
    assert not out.exists()


def test_baseline_is_the_variant_at_its_defaults(experiments, tmp_path):
    # clip(clip_epsilon=0.1) sorts first; the baseline must be clip at 0.2 (its default)
    out = tmp_path / "report"
    assert _report(experiments / "stored", out) == 0
    poi = pd.read_csv(out / "aggregates.csv")
    versus = set(poi.loc[poi.kind == "poi_vs_baseline", "versus"])
    assert versus == {"clip(clip_epsilon=0.2)"}


def test_api_reads_an_experiment_and_a_results_root(experiments):
    runs = kb.load_runs(experiments / "mine")
    assert len(runs) == 4 and set(runs.state) == {"done"}
    clip = runs[runs.setting == "clip"].iloc[0]
    assert clip.params["clip_epsilon"] == 0.2 and clip.variant == "clip"
    assert str(runs.frames.dtype) == "Int64"
    curves_params = kb.load_curves(experiments / "mine").params
    assert curves_params.notna().all() and curves_params.str.contains("clip_epsilon=").any()
    assert {"experiment", "final_score", "engine", "commit", "versions"} <= set(runs.columns)
    everything = kb.load_runs(experiments)  # the root: all three experiments
    assert set(everything.experiment) == {"mine", "stored", "stored_other"}
    curves = kb.load_curves(experiments / "mine", metric="episode_return")
    assert set(curves.metric) == {"episode_return"}
    assert set(curves.run_id) == set(runs.run_id)
    assert curves.groupby("run_id").size().eq(2).all()  # 512 frames = 2 iterations of 256
    matrices = kb.score_matrices(runs)
    assert set(matrices) == {"clip", "klpen-fixed"}
    assert matrices["clip"].shape == (2, 1)
    np.testing.assert_array_equal(
        matrices["clip"][:, 0],
        runs[runs.setting == "clip"].sort_values("seed").final_score.to_numpy())
    fig = kb.plot_curves(curves)
    assert len(fig.axes[0].lines) == 2


def test_api_errors_are_one_line(experiments, tmp_path):
    from klppo_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="no experiment directory"):
        kb.load_runs(tmp_path)
    with pytest.raises(ConfigError, match="not in the runs' metrics tables; allowed"):
        kb.load_curves(experiments / "mine", metric="no_such_metric")


def test_make_report_survives_the_report_package_import(experiments, tmp_path):
    """``kb.make_report`` is not shadowed by the ``klppo_bench.report`` subpackage."""
    import klppo_bench.report  # noqa: F401 -- sets the package attribute klppo_bench.report

    rep = kb.make_report(experiments / "mine", out=tmp_path / "r", reps=20)
    assert (tmp_path / "r" / "report.md").is_file() and len(rep.scores) == 4
    assert callable(kb.make_report)

"""Statistics on hand-made numbers: the suite's estimates are rliable's, normalization is the
written definition, and nothing is dropped (fewer seeds, failed runs). No training here."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from rliable import library as rly
from rliable import metrics

from klppo_bench.stats import aggregate as agg
from klppo_bench.stats import random_policy
from klppo_bench.stats.curves import curve_sets, frame_grid, smooth
from klppo_bench.stats.scores import (collect_runs, env_family, load_reference_scores,
                                      parse_params, score_table)
from klppo_bench.store import RunDir

REPS, SEED = 300, 7


def rliable_intervals(matrix, func, reps=REPS, seed=SEED):
    """rliable called the documented way, with its global generator seeded (see aggregate)."""
    np.random.seed(seed)
    points, intervals = rly.get_interval_estimates({"x": matrix}, func, reps=reps,
                                                   random_state=np.random.RandomState(seed))
    return np.asarray(points["x"]), np.asarray(intervals["x"])


def rliable_aggregates(x):
    return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x),
                     metrics.aggregate_median(x), metrics.aggregate_optimality_gap(x)])


@pytest.fixture
def score_sets():
    rng = np.random.default_rng(0)
    tasks = ("Hopper-v5", "Walker2d-v5", "HalfCheetah-v5")
    return {
        "clip": {t: rng.normal(0.8, 0.2, 5) for t in tasks},
        "klpen": {t: rng.normal(0.7, 0.3, 5) for t in tasks},
        "no-clip": {t: rng.normal(0.2, 0.3, 3) for t in tasks},  # fewer seeds, same per task
    }


def test_aggregates_and_cis_equal_rliable(score_sets):
    table = agg.aggregate_table(score_sets, REPS, SEED)
    for setting, tasks in score_sets.items():
        matrix = np.stack(list(tasks.values()), axis=1)
        points, intervals = rliable_intervals(matrix, rliable_aggregates)
        rows = table[table.setting == setting].set_index("metric").loc[list(agg.METRICS)]
        np.testing.assert_array_equal(rows.value.to_numpy(), points)
        np.testing.assert_array_equal(rows.ci_low.to_numpy(), intervals[0])
        np.testing.assert_array_equal(rows.ci_high.to_numpy(), intervals[1])
        assert (rows.ci_low <= rows.value).all() and (rows.value <= rows.ci_high).all()
        assert rows.n_runs.iloc[0] == matrix.size and rows.equal_runs_per_task.all()


def test_intervals_reproducible_whatever_numpy_global_state(score_sets):
    tasks = score_sets["klpen"]
    np.random.seed(1)
    first = agg.aggregate_table({"s": tasks}, REPS, SEED)
    np.random.seed(2)
    state = np.random.get_state()
    second = agg.aggregate_table({"s": tasks}, REPS, SEED)
    pd.testing.assert_frame_equal(first, second)
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # global state restored
    # why the suite seeds the global generator: rliable 1.2.0's random_state alone does not
    matrix = np.stack(list(tasks.values()), axis=1)
    func = lambda x: np.array([metrics.aggregate_iqm(x)])  # noqa: E731
    cis = []
    for global_seed in (1, 2):
        np.random.seed(global_seed)
        _, ci = rly.get_interval_estimates({"x": matrix}, func, reps=REPS,
                                           random_state=np.random.RandomState(SEED))
        cis.append(ci["x"])
    assert not np.array_equal(cis[0], cis[1])


def test_probability_of_improvement_equals_rliable(score_sets):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 4, size=(6, 3)).astype(float)   # ties on purpose
    y = rng.integers(0, 4, size=(4, 3)).astype(float)
    assert agg.poi(x, y) == pytest.approx(metrics.probability_of_improvement(x, y), abs=1e-12)
    assert agg.poi(x, x) == 0.5
    pairs = [("klpen", "clip"), ("no-clip", "clip")]
    table = agg.poi_table(score_sets, pairs, REPS, SEED)
    for row in table.itertuples():
        mx = np.stack(list(score_sets[row.x].values()), axis=1)
        my = np.stack(list(score_sets[row.y].values()), axis=1)
        point, ci = rliable_intervals([mx, my], metrics.probability_of_improvement)
        assert row.value == pytest.approx(float(point), abs=1e-12)
        np.testing.assert_allclose([row.ci_low, row.ci_high], np.ravel(ci), atol=1e-12)
        assert row.tasks == 3


def test_profiles_and_curves_equal_rliable(score_sets):
    matrix = np.stack(list(score_sets["clip"].values()), axis=1)
    taus = np.linspace(0, 1.2, 13)
    np.testing.assert_array_equal(agg.profile_func(taus)(matrix),
                                  rly.score_distributions(matrix, taus))
    curves = np.random.default_rng(4).normal(size=(5, 3, 4))
    iqm = agg.curve_func("iqm")(curves)
    mean = agg.curve_func("mean")(curves)
    for k in range(4):
        assert iqm[k] == pytest.approx(metrics.aggregate_iqm(curves[..., k]), abs=1e-12)
        assert mean[k] == pytest.approx(metrics.aggregate_mean(curves[..., k]), abs=1e-12)


def test_unequal_seed_counts_are_kept_and_weighted_by_task():
    tasks = {"a": np.array([0.0, 1.0, 2.0, 3.0, 4.0]), "b": np.array([10.0, 12.0])}
    table = agg.aggregate_table({"s": tasks}, REPS, SEED).set_index("metric")
    assert table.n_runs.iloc[0] == 7 and not table.equal_runs_per_task.iloc[0]
    assert "unequal" in table.bootstrap.iloc[0] and table.runs_per_task.iloc[0] == "a:5, b:2"
    assert table.loc["Mean", "value"] == pytest.approx((2.0 + 11.0) / 2)        # task means
    assert table.loc["Median", "value"] == pytest.approx(np.median([2.0, 11.0]))
    assert table.loc["Optimality Gap", "value"] == pytest.approx(
        1 - np.mean([np.mean(np.minimum(tasks["a"], 1)), np.mean(np.minimum(tasks["b"], 1))]))
    for metric in agg.METRICS:
        row = table.loc[metric]
        assert row.ci_low <= row.value <= row.ci_high
    # the task-weighted IQM reduces to rliable's IQM when counts are equal
    values = np.random.default_rng(5).normal(size=(8, 2))
    assert agg.weighted_iqm([values[:, 0], values[:, 1]]) == pytest.approx(
        metrics.aggregate_iqm(values), abs=1e-12)
    # hand-computed: weights 1/10 for a's runs, 1/4 for b's; middle half of the mass
    assert agg.weighted_iqm(list(tasks.values())) == pytest.approx(
        (0.05 * 2.0 + 0.1 * 3.0 + 0.1 * 4.0 + 0.25 * 10.0) / 0.5)


def test_minmax_and_reference_normalization_by_hand():
    runs = pd.DataFrame({
        "experiment": "e", "env": ["Hopper-v5"] * 4 + ["Swimmer-v5"] * 2,
        "variant": ["clip", "clip", "klpen", "klpen", "clip", "klpen"],
        "setting": ["clip", "clip", "klpen", "klpen", "clip", "klpen"],
        "params": "", "seed": [0, 1, 0, 1, 0, 0], "run_id": list("abcdef"),
        "final_score": [1000.0, 1200.0, 500.0, 700.0, 40.0, 60.0],
        "final_score_episodes": 100, "final_eval_return": [1100.0, 1300.0, 0, 0, 0, 0],
        "frames": 100, "wall_seconds": 1.0, "sps": 1.0})
    references = pd.DataFrame({"env": ["Hopper"], "reference_env": ["Hopper-v4"],
                               "score": [2100.0], "frames": [1e6], "algorithm": ["x"],
                               "source": ["somewhere"]})
    scores, constants = score_table(runs, {"Hopper-v5": 100.0, "Swimmer-v5": 0.0}, references)
    c = constants.set_index("env")
    assert c.loc["Hopper-v5", "best_setting"] == "clip" and c.loc["Hopper-v5", "best_score"] == 1100
    assert c.loc["Swimmer-v5", "best_setting"] == "klpen"
    np.testing.assert_allclose(scores.score_minmax,
                               [900 / 1000, 1100 / 1000, 400 / 1000, 600 / 1000, 40 / 60, 1.0])
    np.testing.assert_allclose(scores.score_reference[:4],
                               [900 / 2000, 1100 / 2000, 400 / 2000, 600 / 2000])
    assert scores.score_reference[4:].isna().all()          # no reference for Swimmer
    np.testing.assert_allclose(scores.eval_minmax[:2], [1.0, 1.2])


def test_reference_table_cites_a_source_per_row():
    refs = load_reference_scores()
    assert {"env", "reference_env", "score", "source"} <= set(refs.columns)
    assert refs.env.is_unique and refs.score.notna().all()
    assert all(len(s) > 20 for s in refs.source)
    assert env_family("Hopper-v5") in set(refs.env)


def _fake_run(exp, setting, seed, score, fail=False):
    run = RunDir(exp / "runs" / f"{setting}-s{seed}")
    run.start({"variant": setting, "env": "Hopper-v5", "seed": seed, "loss": {"dtarg": 0.01}},
              setting=setting)
    if fail:
        run.fail("DivergenceError: non-finite loss at iteration 3")
        return
    frames = np.array([256, 512])
    metrics_df = pd.DataFrame({"frames": frames, "episode_return": [score / 2, score]})
    run.finish({"metrics": metrics_df}, {"final_score": score, "final_eval_return": score,
                                         "frames": 512, "sps": 100.0}, seconds=5.0)


def test_collect_runs_lists_failed_and_keeps_fewer_seeds(tmp_path):
    exp = tmp_path / "exp"
    for seed in range(3):
        _fake_run(exp, "a", seed, 100.0 + seed)
    _fake_run(exp, "b", 0, 50.0)
    _fake_run(exp, "b", 1, 0.0, fail=True)
    done, not_done = collect_runs(exp)
    assert sorted(done.groupby("setting").size().items()) == [("a", 3), ("b", 1)]
    assert list(not_done.run_id) == ["b-s1"] and not_done.state.iloc[0] == "failed"
    assert "DivergenceError" in not_done.error.iloc[0]
    assert parse_params(done.params.iloc[0]) == {"dtarg": "0.01"}
    assert done.wall_seconds.iloc[0] == 5.0


def test_curves_fill_gaps_and_share_a_grid():
    long = pd.DataFrame({
        "run_id": ["r1"] * 4 + ["r2"] * 3, "env": "E", "setting": "s", "params": "", "seed": 0,
        "frames": [10, 20, 30, 40, 10, 20, 30], "metric": "episode_return",
        "value": [1.0, np.nan, 3.0, 4.0, 2.0, 2.0, 2.0]})
    grid = frame_grid(long, 5)
    np.testing.assert_allclose(grid, np.linspace(10, 30, 5))  # frames both runs reached
    sets = curve_sets(long, "episode_return", grid)
    assert sets["s"]["E"].shape == (2, 5)
    np.testing.assert_allclose(sets["s"]["E"][0], [1, 1.5, 2, 2.5, 3])  # NaN interpolated
    assert smooth(np.array([np.nan, np.nan])) is None


def test_random_score_is_seeded_and_cached(tmp_path, monkeypatch):
    a = random_policy.measure_random_score("InvertedPendulum-v5", episodes=3, seed=1)
    b = random_policy.measure_random_score("InvertedPendulum-v5", episodes=3, seed=1)
    assert a == b and a["episodes"] == 3 and np.isfinite(a["mean"])
    out = random_policy.random_scores(["InvertedPendulum-v5"], tmp_path, episodes=3, seed=1)
    assert out["InvertedPendulum-v5"] == a
    cache = json.loads((tmp_path / random_policy.CACHE_NAME).read_text())
    assert list(cache) == [random_policy.cache_key("InvertedPendulum-v5", 3, 1)]

    def no_measure(*args, **kwargs):
        raise AssertionError("measured again despite the cache")
    monkeypatch.setattr(random_policy, "measure_random_score", no_measure)
    assert random_policy.random_scores(["InvertedPendulum-v5"], tmp_path, 3, 1) == out


def test_trim_mean_is_rliable_iqm():
    # the vectorized sample-efficiency IQM relies on this identity
    x = np.random.default_rng(6).normal(size=(7, 3))
    assert scipy.stats.trim_mean(x.reshape(-1), 0.25) == metrics.aggregate_iqm(x)


def test_run_median_curves_on_hand_made_numbers():
    """The KL / dtarg curves' statistic: the median run at each point, not the mean one
    runaway seed would drag (hand-computed)."""
    # 5 seeds x 1 task x 2 points; seed 4's KL ran away at the first point
    curves = np.array([[1.0, 2.0], [1.2, 2.0], [0.8, 3.0], [1.1, 1.0], [50.0, 2.5]])[:, None, :]
    np.testing.assert_allclose(agg.curve_func("run_median")(curves), [1.1, 2.0])
    np.testing.assert_allclose(agg.curve_func("mean")(curves), [54.1 / 5, 10.5 / 5])
    point, low, high = agg.curve_estimates({"E": curves[:, 0, :]}, "run_median", 200, SEED)
    np.testing.assert_allclose(point, [1.1, 2.0])
    assert (low <= point).all() and (point <= high).all()
    # unequal seeds per task: every task weighs the same
    assert agg.weighted_median([np.array([1.0, 2.0, 3.0])]) == 2.0
    assert agg.weighted_median([np.array([1.0, 2.0, 3.0, 4.0])]) == 2.5
    # task a (3 runs, weight 1/6 each), task b (1 run, weight 1/2): the half lies between 2 and 9
    assert agg.weighted_median([np.array([1.0, 2.0, 3.0]), np.array([9.0])]) == 6.0
    # weights 1/12 (a), 1/3 (b), 1/6 (c): 0, 1, 2, 3, 4 hold exactly half the mass
    assert agg.weighted_median([np.array([1.0, 2.0, 3.0, 4.0]), np.array([9.0]),
                                np.array([0.0, 10.0])]) == pytest.approx(6.5)
    three_seeds = np.array([[1.0, 5.0], [2.0, 6.0], [3.0, 7.0]])[:, None, :]
    one_seed = np.array([[9.0, 0.0]])[:, None, :]
    unequal = agg.curve_func("run_median")(three_seeds, one_seed)
    np.testing.assert_allclose(unequal, [6.0, 2.5])
    with pytest.raises(ValueError, match="allowed: mean, iqm, run_median"):
        agg.curve_func("median")


def test_best_and_tied_on_hand_made_intervals():
    close = {"clip": (1.00001, 0.95, 1.05), "dual-clip": (1.0, 0.95, 1.05),
             "no-clip": (0.2, 0.1, 0.3)}
    assert agg.best_and_tied(close, "max") == ("clip", ["dual-clip"])
    apart = {"clip": (1.0, 0.95, 1.05), "dual-clip": (0.8, 0.7, 0.9), "no-clip": (0.2, 0.1, 0.3)}
    assert agg.best_and_tied(apart, "max") == ("clip", [])
    # a lower point with a wide CI that reaches the best's CI is tied too
    wide = {**apart, "no-clip": (0.5, 0.0, 0.96)}
    assert agg.best_and_tied(wide, "max") == ("clip", ["no-clip"])
    assert agg.best_and_tied(apart, "min") == ("no-clip", [])
    # degenerate CIs (one seed): tied only when `same` says the points are equal
    points = {"a": (1.00001, 1.00001, 1.00001), "b": (1.0, 1.0, 1.0)}
    assert agg.best_and_tied(points) == ("a", [])
    assert agg.best_and_tied(points, same=lambda x, y: abs(x - y) < 1e-4) == ("a", ["b"])
    assert agg.best_and_tied({"a": (np.nan, 0, 1)}) == (None, [])
    assert agg.intervals_overlap((0, 0, 1), (0, np.nan, np.nan))   # no CI: no evidence


def test_a_setting_with_one_run_on_a_task_has_no_ci():
    """Resampling one run gives it back every time: a zero-width CI would read as certainty."""
    table = agg.aggregate_table({"one": {"a": np.array([2517.0])},
                                 "two": {"a": np.array([1.0, 3.0]), "b": np.array([2.0])},
                                 "many": {"a": np.array([1.0, 2.0, 3.0])}},
                                REPS, SEED)
    for setting in ("one", "two"):
        rows = table[table.setting == setting]
        assert rows.ci_low.isna().all() and rows.ci_high.isna().all(), setting
        assert (rows.bootstrap == "none (one run on a task)").all()
    assert table[table.setting == "one"].set_index("metric").loc["Mean", "value"] == 2517.0
    many = table[(table.setting == "many") & (table.metric != "Optimality Gap")]  # gap 0: >= 1
    assert (many.ci_low < many.ci_high).all() and (many.bootstrap == "stratified").all()

"""rliable aggregates with reproducible stratified-bootstrap confidence intervals.

Score sets: ``{setting: {task: array of shape (runs, ...)}}``. A setting's tasks may have
different run counts (a failed seed, a sweep still running). rliable's matrix form needs the
same number of runs on every task, so this module never truncates:

* equal counts on every task: the setting's scores are the ``(runs x tasks [x points])``
  matrix, resampled by rliable's ``StratifiedBootstrap`` and aggregated by rliable's own
  ``metrics`` functions -- the numbers are exactly rliable's;
* unequal counts: the tasks are passed as a list of ``(runs_t x 1 [x points])`` arrays, which
  rliable resamples with ``StratifiedIndependentBootstrap`` (runs resampled within each task,
  independently per task: the same stratified bootstrap), and the aggregates weight every
  task equally (each run of task t weighs ``1 / (tasks * runs_t)``; for equal counts these
  reduce to rliable's definitions). Every table says which form was used.

Reproducibility: rliable 1.2.0's bootstraps draw their resampling indices from numpy's
*global* generator (``np.random.choice`` in ``update_indices``); the ``random_state`` argument
alone does not fix the intervals (tests/test_stats.py shows it). :func:`seeded` therefore
seeds the global generator with ``random_state`` for the duration of each call (and restores
it afterwards) and also passes ``np.random.RandomState(random_state)``. Each estimate gets a
fresh seed, so a setting's intervals do not depend on which other settings are present.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.stats
from rliable import library as rly
from rliable import metrics

METRICS = ("IQM", "Mean", "Median", "Optimality Gap")
CI_SIZE = 0.95
METHOD = "percentile"

ScoreSet = Mapping[str, np.ndarray]          # task -> (runs, ...) array


@contextlib.contextmanager
def seeded(random_state: int):
    """Seed numpy's global generator (rliable draws from it) and yield a ``RandomState``."""
    saved = np.random.get_state()
    np.random.seed(random_state)
    try:
        with warnings.catch_warnings():
            # arch deprecates ``random_state`` in favour of ``seed``; rliable 1.2.0 passes it.
            warnings.simplefilter("ignore", FutureWarning)
            yield np.random.RandomState(random_state)
    finally:
        np.random.set_state(saved)


def pack(tasks: ScoreSet) -> np.ndarray | list[np.ndarray]:
    """rliable's input for one setting: a ``(runs x tasks [x points])`` matrix when every task
    has the same number of runs, else a list of ``(runs_t x 1 [x points])`` arrays."""
    arrays = [np.asarray(a, float) for a in tasks.values()]
    if len({a.shape[0] for a in arrays}) == 1:
        return np.stack(arrays, axis=1)
    return [a[:, None] for a in arrays]


def _task_columns(args: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per-task run arrays from either form (one matrix, or one array per task)."""
    if len(args) == 1:
        return [args[0][:, j] for j in range(args[0].shape[1])]
    return [a[:, 0] for a in args]


def weighted_iqm(columns: Sequence[np.ndarray]) -> float:
    """Interquartile mean where every task carries the same total weight."""
    values = np.concatenate([np.ravel(c) for c in columns])
    weights = np.concatenate([np.full(np.size(c), 1.0 / (len(columns) * np.size(c)))
                              for c in columns])
    order = np.argsort(values, kind="stable")
    values, weights = values[order], weights[order]
    upper = np.cumsum(weights)
    lower = upper - weights
    # the part of each run's weight that lies between the 25% and 75% quantiles
    kept = np.clip(np.minimum(upper, 0.75) - np.maximum(lower, 0.25), 0.0, None)
    return float(np.sum(kept * values) / np.sum(kept))


def weighted_median(columns: Sequence[np.ndarray]) -> float:
    """Median of the runs of every task, where every task carries the same total weight
    (``np.median`` of all runs when the counts are equal)."""
    values = np.concatenate([np.ravel(c) for c in columns])
    weights = np.concatenate([np.full(np.size(c), 1.0 / (len(columns) * np.size(c)))
                              for c in columns])
    order = np.argsort(values, kind="stable")
    values, upper = values[order], np.cumsum(weights[order])
    k = int(np.searchsorted(upper, 0.5 - 1e-12))        # first run whose mass reaches 1/2
    if k + 1 < len(values) and np.isclose(upper[k], 0.5, rtol=0, atol=1e-12):
        return float((values[k] + values[k + 1]) / 2)   # the half falls between two runs
    return float(values[k])


def iqm(*args) -> float:
    """rliable's IQM of one matrix; the task-weighted IQM of one array per task."""
    if len(args) == 1:
        return metrics.aggregate_iqm(args[0])
    return weighted_iqm(_task_columns(args))


def mean(*args) -> float:
    """Mean over tasks of the per-task mean score (rliable's ``aggregate_mean``)."""
    if len(args) == 1:
        return metrics.aggregate_mean(args[0])
    return float(np.mean([np.mean(c) for c in _task_columns(args)]))


def median(*args) -> float:
    """Median over tasks of the per-task mean score (rliable's ``aggregate_median``)."""
    if len(args) == 1:
        return metrics.aggregate_median(args[0])
    return float(np.median([np.mean(c) for c in _task_columns(args)]))


def optimality_gap(*args, gamma: float = 1.0) -> float:
    """How far scores fall short of ``gamma`` (rliable's ``aggregate_optimality_gap``)."""
    if len(args) == 1:
        return metrics.aggregate_optimality_gap(args[0], gamma)
    return float(gamma - np.mean([np.mean(np.minimum(c, gamma)) for c in _task_columns(args)]))


def aggregate_func(*args) -> np.ndarray:
    """IQM, mean, median and optimality gap (in :data:`METRICS` order) of one setting."""
    return np.array([iqm(*args), mean(*args), median(*args), optimality_gap(*args)])


def interval_estimate(data, func: Callable, reps: int, random_state: int):
    """``(point, low, high)`` of ``func`` on packed ``data``: rliable's stratified bootstrap,
    percentile method, 95%. ``point`` has ``func``'s output shape; low/high the same."""
    with seeded(random_state) as rng:
        points, intervals = rly.get_interval_estimates(
            {"x": data}, func, method=METHOD, reps=reps, confidence_interval_size=CI_SIZE,
            random_state=rng)
    point = np.asarray(points["x"], float)
    low, high = np.asarray(intervals["x"], float)
    return point, low, high


def describe_counts(tasks: ScoreSet) -> str:
    return ", ".join(f"{t}:{np.shape(a)[0]}" for t, a in tasks.items())


def _equal_counts(tasks: ScoreSet) -> bool:
    return len({np.shape(a)[0] for a in tasks.values()}) == 1


def aggregate_table(score_sets: Mapping[str, ScoreSet], reps: int,
                    random_state: int) -> pd.DataFrame:
    """One row per (setting, metric): value, 95% CI and how it was computed.

    A setting with one run on some task has no CI (NaN, bootstrap ``"none (one run on a
    task)"``): resampling one run returns it every time, a zero-width interval that would read
    as certainty."""
    rows = []
    for setting, tasks in score_sets.items():
        data = pack(tasks)
        point, low, high = interval_estimate(data, aggregate_func, reps, random_state)
        equal = _equal_counts(tasks)
        one_run = min(np.shape(a)[0] for a in tasks.values()) < 2
        for k, name in enumerate(METRICS):
            rows.append({
                "setting": setting, "metric": name, "value": point[k],
                "ci_low": np.nan if one_run else low[k],
                "ci_high": np.nan if one_run else high[k],
                "n_runs": int(sum(np.shape(a)[0] for a in tasks.values())),
                "n_tasks": len(tasks), "runs_per_task": describe_counts(tasks),
                "equal_runs_per_task": equal,
                "bootstrap": "none (one run on a task)" if one_run else "stratified" if equal
                else "stratified-independent (unequal runs per task, task-weighted)",
            })
    return pd.DataFrame(rows)


def _poi_task(x: np.ndarray, y: np.ndarray) -> float:
    """P(x > y) + P(x = y) / 2 over all pairs of runs: the Mann-Whitney U statistic divided by
    ``len(x) * len(y)``, which is what rliable computes per task with scipy (identical arrays
    give 0.5 either way), without scipy's per-call overhead (~3 ms, paid reps x tasks times)."""
    diff = x[:, None] - y[None, :]
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


def poi(scores_x: np.ndarray, scores_y: np.ndarray) -> float:
    """``rliable.metrics.probability_of_improvement`` on ``(runs x tasks)`` matrices, vectorized
    (tests check it equals rliable's)."""
    return float(np.mean([_poi_task(scores_x[:, j], scores_y[:, j])
                          for j in range(scores_x.shape[1])]))


def _poi_per_task(x_cols, y_cols) -> float:
    return float(np.mean([_poi_task(x, y) for x, y in zip(x_cols, y_cols)]))


def probability_of_improvement(x: ScoreSet, y: ScoreSet, reps: int, random_state: int):
    """P(X > Y) averaged over the tasks both settings have, with its 95% CI.

    Equal run counts within each setting: rliable's ``metrics.probability_of_improvement``
    (as :func:`poi`) on the two matrices (resampled independently). Otherwise one array per
    task and setting, the same per-task Mann-Whitney statistic, averaged over tasks.

    Returns ``(point, low, high, tasks)``.
    """
    tasks = [t for t in x if t in y]
    if not tasks:
        return np.nan, np.nan, np.nan, []
    xs, ys = {t: x[t] for t in tasks}, {t: y[t] for t in tasks}
    if _equal_counts(xs) and _equal_counts(ys):
        data = [pack(xs), pack(ys)]
        func = poi
    else:
        data = [np.asarray(xs[t], float)[:, None] for t in tasks] + \
               [np.asarray(ys[t], float)[:, None] for t in tasks]
        n = len(tasks)

        def func(*arrays):
            return _poi_per_task([a[:, 0] for a in arrays[:n]], [a[:, 0] for a in arrays[n:]])
    with seeded(random_state) as rng:
        points, intervals = rly.get_interval_estimates(
            {"p": data}, func, method=METHOD, reps=reps, confidence_interval_size=CI_SIZE,
            random_state=rng)
    low, high = np.ravel(intervals["p"])
    return float(points["p"]), float(low), float(high), tasks


def poi_table(score_sets: Mapping[str, ScoreSet], pairs: Sequence[tuple[str, str]], reps: int,
              random_state: int) -> pd.DataFrame:
    rows = []
    for a, b in pairs:
        p, low, high, tasks = probability_of_improvement(score_sets[a], score_sets[b], reps,
                                                         random_state)
        rows.append({"x": a, "y": b, "value": p, "ci_low": low, "ci_high": high,
                     "tasks": len(tasks)})
    return pd.DataFrame(rows, columns=["x", "y", "value", "ci_low", "ci_high", "tasks"])


def profile_func(taus: np.ndarray) -> Callable:
    """Fraction of runs scoring above each tau (rliable's score distribution); with unequal
    counts, the per-task fractions averaged over tasks."""
    taus = np.asarray(taus, float)

    def func(*args):
        if len(args) == 1:  # rliable's score_distributions, vectorized over taus
            return np.mean(np.reshape(args[0], (-1, 1)) > taus, axis=0)
        return np.mean([np.mean(c[:, None] > taus, axis=0) for c in _task_columns(args)], axis=0)
    return func


def performance_profiles(score_sets: Mapping[str, ScoreSet], taus: np.ndarray, reps: int,
                         random_state: int) -> dict[str, tuple]:
    """``{setting: (profile, low, high)}`` over ``taus``.

    The same computation as ``rliable.library.create_performance_profile`` (score
    distributions, stratified bootstrap) through ``get_interval_estimates``, because
    ``create_performance_profile`` takes no ``random_state``.
    """
    func = profile_func(taus)
    return {s: interval_estimate(pack(t), func, reps, random_state)
            for s, t in score_sets.items()}


CURVE_STATISTICS = ("mean", "iqm", "run_median")


def curve_func(statistic: str) -> Callable:
    """Per-point statistic of ``(runs x tasks x points)`` data: ``mean`` (over runs and tasks),
    ``iqm`` (rliable's IQM at each point) or ``run_median`` (the median run: median over the
    runs of every task, tasks weighted equally; robust where a few seeds sit far off, unlike
    rliable's ``aggregate_median``, the median over tasks of the per-task mean)."""
    if statistic not in CURVE_STATISTICS:
        raise ValueError(f"statistic={statistic!r}; allowed: {', '.join(CURVE_STATISTICS)}")

    def func(*args):
        if len(args) == 1:  # vectorized forms of rliable's aggregate_mean / aggregate_iqm
            x = args[0]
            if statistic == "mean":
                return np.mean(np.mean(x, axis=0), axis=0)
            if statistic == "run_median":
                return np.median(x.reshape(-1, x.shape[-1]), axis=0)
            return scipy.stats.trim_mean(x.reshape(-1, x.shape[-1]), 0.25, axis=0)
        if statistic == "run_median":
            return np.array([weighted_median(_task_columns([a[..., k] for a in args]))
                             for k in range(args[0].shape[-1])])
        stat = mean if statistic == "mean" else iqm
        return np.array([stat(*(a[..., k] for a in args)) for k in range(args[0].shape[-1])])
    return func


def curve_estimates(tasks: ScoreSet, statistic: str, reps: int, random_state: int):
    """``(point, low, high)`` per point of curves shaped ``(runs, points)`` per task.

    rliable resamples runs independently at each point (pointwise intervals, as rliable's
    sample-efficiency curves)."""
    return interval_estimate(pack(tasks), curve_func(statistic), reps, random_state)


def intervals_overlap(a: tuple, b: tuple) -> bool:
    """Whether two ``(point, low, high)`` estimates' intervals share a point; a missing bound
    counts as overlapping (no evidence of a difference)."""
    (_, lo_a, hi_a), (_, lo_b, hi_b) = a, b
    if any(not np.isfinite(v) for v in (lo_a, hi_a, lo_b, hi_b)):
        return True
    return bool(lo_a <= hi_b and lo_b <= hi_a)


def tied_with(estimates: Mapping, key, same: Callable[[float, float], bool] | None = None
              ) -> list:
    """The keys of ``{key: (point, low, high)}`` other than ``key`` statistically tied with it:
    a finite point whose 95% CI overlaps ``key``'s, or ``same(point of key, point)``."""
    ref = estimates[key]
    return [k for k, e in estimates.items() if k != key and np.isfinite(e[0]) and (
        intervals_overlap(ref, e) or (same is not None and same(ref[0], e[0])))]


def best_and_tied(estimates: Mapping, rule: str = "max",
                  same: Callable[[float, float], bool] | None = None) -> tuple:
    """``(best, tied)``: the key with the best point (``rule``: ``max`` or ``min``) among
    ``{key: (point, low, high)}`` with a finite point, and the other keys statistically tied
    with it (:func:`tied_with`). ``tied`` empty: the best's CI is disjoint from the
    runner-up's and every other's. ``(None, [])`` without a finite point."""
    if rule not in ("max", "min"):
        raise ValueError(f"rule={rule!r}; allowed: max, min")
    finite = {k: e for k, e in estimates.items() if np.isfinite(e[0])}
    if not finite:
        return None, []
    sign = 1.0 if rule == "max" else -1.0
    best = max(finite, key=lambda k: sign * finite[k][0])  # the first of equal points
    return best, tied_with(finite, best, same)

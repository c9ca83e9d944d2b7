"""The Python API for results: tidy pandas frames of runs and curves, rliable score matrices,
and the report's figures, for a live experiment directory and the shipped reference results
alike (both are the same store layout; :mod:`klppo_bench.store`).

    import klppo_bench as kb
    runs = kb.load_runs("results/reference/dtarg_increment")      # one row per run
    curves = kb.load_curves("results/reference/dtarg_increment")  # long format
    matrices = kb.score_matrices(runs)                            # {setting: runs x tasks}
    fig = kb.plot_curves(curves)                                  # rliable IQM bands

``path`` may be an experiment directory (``<results>/<experiment>``, holding ``runs/``) or a
results root holding several (``results/reference``): every experiment under it is read and
the ``experiment`` column tells them apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from klppo_bench.errors import ConfigError

RUNS_COLUMNS = ["experiment", "run_id", "env", "variant", "setting", "params", "seed",
                "frames", "final_score", "final_eval_return", "engine", "commit", "versions",
                "state", "wall_seconds", "error", "path"]
"""Columns of :func:`load_runs`; ``params`` is a dict of the run's loss parameters."""


def experiment_dirs(path: Path | str) -> list[Path]:
    """The experiment directories at ``path``: itself if it holds ``runs/``, else each child
    that does (sorted). Raises ConfigError when there is none."""
    path = Path(path)
    if (path / "runs").is_dir():
        return [path]
    found = sorted(p for p in path.iterdir() if (p / "runs").is_dir()) if path.is_dir() else []
    if not found:
        raise ConfigError(f"{path}: no experiment directory (<experiment>/runs/<run_id>/) here "
                          f"or one level below; allowed: a directory written by "
                          f"`klppo-bench sweep`, e.g. results/smoke or results/reference")
    return found


def _runs_of(exp_dir: Path) -> pd.DataFrame:
    from klppo_bench.stats.scores import parse_params, read_runs

    records = read_runs(exp_dir)
    done = records.done.assign(state="done", error=None)
    rest = records.not_done.assign(
        experiment=exp_dir.name, path=[str(exp_dir / "runs" / r) for r in
                                       records.not_done.run_id])
    out = pd.concat([done, rest], ignore_index=True) if len(rest) else done
    out["params_text"] = out.params
    out["params"] = [{k: _value(v) for k, v in parse_params(p).items()} for p in out.params]
    out["frames"] = pd.array(out.frames, dtype="Int64")
    return out


def _value(text: str):
    """``"0.2"`` -> 0.2, ``"False"`` -> False, ``"l2"`` -> ``"l2"`` (a config value as YAML)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_runs(path: Path | str, states: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per run: experiment, run_id, env, variant, setting, params (dict of values;
    ``params_text`` is the same as one ``"k=v,..."`` string), seed,
    frames, final_score (mean return of the last 100 training episodes), final_eval_return,
    engine, commit, versions, state, wall_seconds, error and path.

    Args:
        path: an experiment directory or a results root (see the module docstring).
        states: keep only runs in these states (``("done",)``); default: every run, with
            ``final_score`` NaN where the run is not done.
    """
    frames = [_runs_of(d) for d in experiment_dirs(path)]
    runs = pd.concat(frames, ignore_index=True)
    for col in RUNS_COLUMNS:
        if col not in runs:
            runs[col] = np.nan
    runs = runs[RUNS_COLUMNS + [c for c in runs.columns if c not in RUNS_COLUMNS]]
    if states is not None:
        runs = runs[runs.state.isin(list(states))]
    return runs.sort_values(["experiment", "setting", "env", "seed"], kind="stable") \
        .reset_index(drop=True)


def load_curves(path: Path | str, metric: str | Iterable[str] | None = "episode_return",
                table: str = "metrics") -> pd.DataFrame:
    """Per-iteration curves of every done run, long format: experiment, run_id, env, variant,
    setting, params (the loss parameters as one ``"k=v,..."`` string), seed, frames, metric,
    value.

    Args:
        metric: a column of the run's table (``episode_return``, ``kl``, ``beta``,
            ``loss_objective``, ``extra/<key>``, ...), several, or None for all of them.
        table: ``metrics`` (one row per iteration; shipped) or ``evals`` (deterministic
            evaluation episodes; shipped) or ``episodes`` (training episodes; live runs only).
    """
    from klppo_bench.store import load_tables

    runs = load_runs(path, states=("done",))
    long, _ = load_tables(runs.assign(params=runs.params_text), table)
    long = long.merge(runs[["run_id", "experiment"]], on="run_id", how="left")
    if metric is not None:
        wanted = [metric] if isinstance(metric, str) else list(metric)
        missing = sorted(set(wanted) - set(long.metric.unique())) if len(long) else []
        if missing:
            raise ConfigError(f"load_curves: metric {', '.join(missing)} not in the runs' "
                              f"{table} tables; allowed: "
                              f"{', '.join(sorted(long.metric.unique()))}")
        long = long[long.metric.isin(wanted)]
    cols = ["experiment"] + [c for c in long.columns if c != "experiment"]
    return long[cols].reset_index(drop=True)


def normalized_scores(runs: pd.DataFrame, cache_dir: Path | str | None = None,
                      random_episodes: int = 100) -> pd.DataFrame:
    """``runs`` (done ones) with the report's normalized scores: ``score_minmax`` (random
    policy 0, best setting 1 per env, as the PPO paper's Table 1), ``score_reference``
    (random 0, published score 1) and their constants. The random-policy score is measured
    once per env and cached (``cache_dir``, default ``<results root>/.cache``)."""
    from klppo_bench.stats.random_policy import random_scores
    from klppo_bench.stats.scores import score_table

    done = runs[runs.state == "done"] if "state" in runs else runs
    if cache_dir is None:
        cache_dir = Path(done.path.iloc[0]).parents[2] / ".cache" if len(done) else ".cache"
    random = random_scores(sorted(done.env.unique()), Path(cache_dir), random_episodes, 0)
    return score_table(done, {e: r["mean"] for e, r in random.items()})[0]


def score_matrices(runs: pd.DataFrame, score: str = "final_score",
                   settings: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """``{setting: (runs x tasks) array}``: the score matrices rliable's functions take
    (``rliable.library.get_interval_estimates``, ``plot_utils``), tasks = envs in sorted order.

    Args:
        score: a column of ``runs`` (``final_score``, ``final_eval_return``, or
            ``score_minmax`` / ``score_reference`` from :func:`normalized_scores`).

    Raises:
        ConfigError: a setting has unequal runs per task (rliable's matrix form needs them
            equal; nothing is truncated -- the report handles unequal counts itself).
    """
    done = runs[runs.state == "done"] if "state" in runs else runs
    envs = sorted(done.env.unique())
    out = {}
    for setting in (settings or sorted(done.setting.unique())):
        g = done[done.setting == setting]
        per_task = [g[g.env == e].sort_values("seed")[score].to_numpy(float) for e in envs]
        counts = {e: len(a) for e, a in zip(envs, per_task)}
        if len(set(counts.values())) != 1 or 0 in counts.values():
            raise ConfigError(f"score_matrices: setting {setting!r} has unequal runs per task "
                              f"({', '.join(f'{e}: {n}' for e, n in counts.items())}); allowed: "
                              f"the same count on every task (select runs first)")
        out[setting] = np.stack(per_task, axis=1)
    return out


def plot_curves(curves: pd.DataFrame, metric: str | None = None, env: str | None = None,
                statistic: str = "iqm", reps: int = 2000, random_state: int = 0):
    """The report's learning-curve figure from :func:`load_curves` rows: per setting, the
    ``statistic`` over runs (``iqm``, ``mean`` or ``run_median``) with 95% stratified-bootstrap
    bands (rliable), on one env (default: the first), each run smoothed and resampled onto
    50 common frame points as in the report. Returns the matplotlib figure."""
    from klppo_bench.report import figures, style
    from klppo_bench.stats import aggregate as agg
    from klppo_bench.stats.curves import curve_sets, frame_grid, restrict

    metric = metric or (curves.metric.iloc[0] if len(curves) else "episode_return")
    env = env or (sorted(curves.env.unique())[0] if len(curves) else None)
    long = curves[(curves.env == env) & (curves.metric == metric)]
    if long.empty:
        raise ConfigError(f"plot_curves: no {metric!r} rows on {env!r}; allowed envs: "
                          f"{', '.join(sorted(curves.env.unique())) or 'none'}")
    style.apply()
    grid = frame_grid(long)
    sets = restrict(curve_sets(long, metric, grid), env)
    estimates = {s: agg.curve_estimates(tasks, statistic, reps, random_state)
                 for s, tasks in sets.items()}
    return figures.learning_curves(grid, estimates, style.setting_styles(list(estimates)),
                                   f"{env}: {statistic} over runs", ylabel=metric)


def make_report(path: Path | str, out: Path | str | None = None,
           compare_to: Path | str | None = None, reps: int = 2000, baseline: str = "clip",
           png_dpi: int = 300):
    """Build the full report of an experiment (``klppo-bench report``): scores, rliable
    aggregates, tables and figures under ``out`` (default ``<path>/report``). Returns the
    :class:`~klppo_bench.report.collect.Report`: ``.scores``, ``.aggregates``,
    ``.poi_baseline`` are DataFrames, ``.figures`` maps names to the PNGs written."""
    from klppo_bench.report.build import ReportOptions, build_report

    opts = ReportOptions(reps=reps, baseline=baseline, out=Path(out) if out else None,
                         compare_to=Path(compare_to) if compare_to else None, png_dpi=png_dpi)
    return build_report(Path(path), opts)

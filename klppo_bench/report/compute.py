"""Every statistic of a report (rliable through :mod:`klppo_bench.stats`) and its tables:
aggregates per normalization, probability of improvement, per-environment scores, the PPO
paper's Table 1, the dtarg x increment grid and the wall-clock cost per engine."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from klppo_bench.report.collect import Report, ReportOptions
from klppo_bench.report.paper import PAPER_COLUMN, paper_score
from klppo_bench.report.tables import same_when_printed, write_table
from klppo_bench.stats import aggregate as agg
from klppo_bench.stats.scores import as_float, parse_params

LABEL = {"minmax": "min-max normalized score (random 0, best setting 1)",
         "reference": "reference-normalized score (random 0, published 1)",
         "raw": "final score (return)"}
SCORE_COLUMN = {"minmax": "score_minmax", "reference": "score_reference", "raw": "final_score"}
UNEQUAL = "stratified-independent (unequal runs per task, task-weighted)"
AGGREGATE_COLUMNS = ["kind", "normalization", "setting", "versus", "env", "engine", "metric",
                     "value", "ci_low", "ci_high", "n_runs", "n_tasks", "tasks",
                     "runs_per_task", "equal_runs_per_task", "bootstrap", "dtarg", "increment",
                     "reps", "random_state", "ci", "method"]
WALL_CLOCK = "wall-clock per run (s)"
GRID_KEYS = ("dtarg", "increment", "decrement")


def score_sets(scores: pd.DataFrame, column: str, settings: list[str]) -> dict:
    """``{setting: {env: array of scores}}`` of one score column."""
    return {s: {env: g[column].to_numpy(float)
                for env, g in scores[scores.setting == s].groupby("env")} for s in settings}


def params_of(rep: Report, setting: str) -> dict[str, str]:
    return parse_params(rep.runs.loc[rep.runs.setting == setting, "params"].iloc[0])


def _rows(kind: str, normalization: str, df: pd.DataFrame, opts: ReportOptions) -> pd.DataFrame:
    """Rows of aggregates.csv: what, how normalized, and how the CI was computed."""
    df = df.copy()
    df.insert(0, "kind", kind)
    df.insert(1, "normalization", normalization)
    df["reps"], df["random_state"] = opts.reps, opts.random_state
    df["ci"], df["method"] = agg.CI_SIZE, agg.METHOD
    return df


def _estimate(setting: str, env: str, metric: str, tasks: dict, func, opts) -> dict:
    """One interval estimate of ``func`` (a single number) as an aggregates.csv row."""
    point, low, high = agg.interval_estimate(agg.pack(tasks), func, opts.reps, opts.random_state)
    equal = len({len(a) for a in tasks.values()}) == 1
    if min(len(a) for a in tasks.values()) < 2:  # one run: a bootstrap has nothing to resample
        return {"setting": setting, "env": env, "metric": metric, "value": float(point[0]),
                "ci_low": np.nan, "ci_high": np.nan,
                "n_runs": int(sum(len(a) for a in tasks.values())), "n_tasks": len(tasks),
                "runs_per_task": agg.describe_counts(tasks), "equal_runs_per_task": equal,
                "bootstrap": "none (one run on a task)"}
    return {"setting": setting, "env": env, "metric": metric, "value": float(point[0]),
            "ci_low": float(low[0]), "ci_high": float(high[0]),
            "n_runs": int(sum(len(a) for a in tasks.values())), "n_tasks": len(tasks),
            "runs_per_task": agg.describe_counts(tasks), "equal_runs_per_task": equal,
            "bootstrap": "stratified" if equal else UNEQUAL}


def _mean(*args):
    return np.array([agg.mean(*args)])


def _iqm(*args):
    return np.array([agg.iqm(*args)])


def _ci(row) -> tuple:
    return (row["value"], row["ci_low"], row["ci_high"])


def _sensitivity_grid(rep: Report) -> pd.DataFrame | None:
    """Settings forming a dtarg x increment grid, if any: adaptive KL settings of one variant
    whose other parameters are equal (the largest such group). Two settings with identical
    parameters share a cell; the first (in report order) is used and the other is noted."""
    rows = []
    for s in rep.settings:
        p = params_of(rep, s)
        if "dtarg" in p and "increment" in p and as_float(p["increment"]) != 1.0:
            rest = tuple(sorted((k, v) for k, v in p.items() if k not in GRID_KEYS))
            rows.append({"setting": s, "group": (rep.runs.loc[rep.runs.setting == s,
                                                             "variant"].iloc[0], rest),
                         "dtarg": as_float(p["dtarg"]), "increment": as_float(p["increment"])})
    grid = pd.DataFrame(rows, columns=["setting", "group", "dtarg", "increment"])
    best = None
    for _, g in grid.groupby("group", sort=False):
        cells = g.drop_duplicates(["dtarg", "increment"])
        if len(cells) >= 2 and (best is None or len(cells) > len(best[0])):
            best = (cells, g[~g.index.isin(cells.index)])
    if best is None:
        return None
    cells, shadowed = best
    for r in shadowed.itertuples():
        first = cells[(cells.dtarg == r.dtarg) & (cells.increment == r.increment)].setting.iloc[0]
        rep.notes.append(f"`{r.setting}` has the same parameters as `{first}`; the dtarg x "
                         f"increment grid shows `{first}`.")
    return cells.drop(columns="group").reset_index(drop=True)


def _aggregates(rep: Report, normalizations: list[str], parts: list) -> pd.DataFrame:
    """Aggregate metrics per normalization (tables ``aggregate*``); returns the minmax one."""
    opts, minmax_table = rep.options, None
    for n in normalizations:
        t = agg.aggregate_table(rep.score_sets[n], opts.reps, opts.random_state)
        # the optimality gap is the shortfall below a score of 1: a normalized score's best,
        # meaningless for raw returns (in the thousands, it is 0 for every setting)
        metrics = [m for m in agg.METRICS if n != "raw" or m != "Optimality Gap"]
        t = t[t.metric.isin(metrics)]
        parts.append(_rows("aggregate", n, t.assign(env="all"), opts))
        cells = [{"setting": s, "runs": int(t[t.setting == s].n_runs.iloc[0]),
                  **{m: _ci(t[(t.setting == s) & (t.metric == m)].iloc[0]) for m in metrics}}
                 for s in rep.settings]
        name = "aggregate" if n == "minmax" else f"aggregate_{n}"
        best = {"IQM": "max", "Mean": "max", "Median": "max", "Optimality Gap": "min"}
        rep.tables[name] = write_table(
            pd.DataFrame(cells), rep.out / "tables" / name,
            best={m: best[m] for m in metrics},
            caption=f"Aggregate {LABEL[n]} with 95% stratified-bootstrap CIs")
        if n == "minmax":
            minmax_table = t
    return minmax_table


def _per_env(rep: Report, parts: list) -> None:
    """Mean and IQM of the final score per environment x setting (table ``env_setting``), and
    which settings are statistically tied with each env's best (the 1 of min-max)."""
    rows, cells = [], []
    for env in rep.envs:
        means = {}
        for s in rep.settings:
            g = rep.scores[(rep.scores.env == env) & (rep.scores.setting == s)]
            if g.empty:
                continue
            tasks = {env: g.final_score.to_numpy(float)}
            mean, iqm = (_estimate(s, env, "Mean", tasks, _mean, rep.options),
                         _estimate(s, env, "IQM", tasks, _iqm, rep.options))
            rows += [mean, iqm]
            means[s] = _ci(mean)
            cells.append({"env": env, "setting": s, "seeds": len(g),
                          "mean final score": _ci(mean), "IQM final score": _ci(iqm),
                          "final eval return": float(g.final_eval_return.mean())})
        best = rep.constants.set_index("env").loc[env, "best_setting"]
        rep.best_tied[env] = agg.tied_with(means, best, same_when_printed)
    parts.append(_rows("env_setting", "raw", pd.DataFrame(rows), rep.options))
    rep.tables["env_setting"] = write_table(
        pd.DataFrame(cells), rep.out / "tables" / "env_setting", group="env",
        best={"mean final score": "max", "IQM final score": "max"},
        caption="Final score per environment and setting: mean and IQM over seeds with 95% "
                "stratified-bootstrap CIs")


def _table1(rep: Report, minmax_table: pd.DataFrame, parts: list) -> None:
    """The PPO paper's Table 1: mean min-max normalized score per env and on average."""
    # every env's column, tasks only some settings ran on included (the average is over
    # rep.aggregate_envs, from ``minmax_table``)
    minmax, rows, cells = score_sets(rep.scores, SCORE_COLUMN["minmax"], rep.settings), [], []
    for s in rep.settings:
        row = {"setting": s}
        for e in rep.envs:
            if e in minmax[s]:
                est = _estimate(s, e, "Mean", {e: minmax[s][e]}, _mean, rep.options)
                rows.append(est)
                row[e] = _ci(est)
            else:
                row[e] = (float("nan"),) * 3
        row["average"] = _ci(minmax_table[(minmax_table.setting == s)
                                          & (minmax_table.metric == "Mean")].iloc[0])
        variant = rep.runs.loc[rep.runs.setting == s, "variant"].iloc[0]
        row[PAPER_COLUMN] = paper_score(variant, params_of(rep, s))
        cells.append(row)
    parts.append(_rows("env_setting", "minmax", pd.DataFrame(rows), rep.options))
    cells = pd.DataFrame(cells)
    caption = ("Average min-max normalized score per setting (PPO paper, Table 1 style), "
               "95% CIs")
    if rep.aggregate_envs != rep.envs:
        caption += f"; average over {', '.join(rep.aggregate_envs)} (every setting ran there)"
    if cells[PAPER_COLUMN].notna().any():
        caption += (f"; {PAPER_COLUMN}: the paper's Table 1 average over its 7 tasks (-v1, "
                    "3 seeds, no CI) where the setting is the paper's row, to compare with "
                    "`average` only when this experiment has the same 7 tasks and settings")
    else:
        cells = cells.drop(columns=PAPER_COLUMN)
    rep.tables["table1"] = write_table(
        cells, rep.out / "tables" / "table1",
        best={"average": "max", **{e: "max" for e in rep.envs}}, caption=caption)


def _sensitivity(rep: Report, parts: list) -> None:
    """Mean final score per dtarg x increment cell (table ``dtarg_increment``), if a grid."""
    grid = _sensitivity_grid(rep)
    if grid is None:
        rep.notes.append("No dtarg x increment grid in this experiment (needs one adaptive KL "
                         "variant with two or more (dtarg, increment) settings): sensitivity "
                         "figures skipped.")
        return
    n = "minmax" if len(rep.envs) > 1 else "raw"
    sets = score_sets(rep.scores[rep.scores.env.isin(rep.aggregate_envs)], SCORE_COLUMN[n],
                      list(grid.setting))
    cells = pd.DataFrame([{**_estimate(r.setting, "all", "Mean", sets[r.setting], _mean,
                                       rep.options), "dtarg": r.dtarg, "increment": r.increment}
                          for r in grid.itertuples()])
    rep.sensitivity = cells
    parts.append(_rows("dtarg_increment", n, cells, rep.options))
    rep.tables["dtarg_increment"] = write_table(
        pd.DataFrame({"dtarg": [f"{d:g}" for d in cells.dtarg],
                      "increment": [f"{i:g}" for i in cells.increment],
                      "runs": cells.n_runs.astype(int),
                      "mean final score": [_ci(r) for _, r in cells.iterrows()]}),
        rep.out / "tables" / "dtarg_increment", best={"mean final score": "max"},
        caption=f"dtarg x increment grid: mean {LABEL[n]}, 95% CIs")


def _job_times(runs: pd.DataFrame) -> dict[str, np.ndarray]:
    """``{env: seconds per run of each job}``: a job (the lanes trained together in one
    process) is one measurement, its time shared evenly by its lanes (status.json ``seconds``
    of each lane is already job time / lanes)."""
    jobs = runs.groupby(["env", "job"], sort=True).wall_seconds.first()
    return {env: jobs.loc[env].to_numpy(float) for env in jobs.index.get_level_values(0).unique()}


def _wall_clock_row(setting: str, runs: pd.DataFrame, opts: ReportOptions) -> dict | None:
    tasks = _job_times(runs)
    if not tasks or not all(np.isfinite(a).all() for a in tasks.values()):
        return None
    jobs = int(sum(len(a) for a in tasks.values()))
    if min(len(a) for a in tasks.values()) >= 2:
        row = _estimate(setting, "all", "wall_seconds", tasks, _mean, opts)
    else:  # one job on some task: a single measurement has no interval and ranks nothing
        row = {"setting": setting, "env": "all", "metric": "wall_seconds",
               "value": float(np.mean([a.mean() for a in tasks.values()])),
               "ci_low": np.nan, "ci_high": np.nan, "n_tasks": len(tasks),
               "runs_per_task": agg.describe_counts(tasks), "bootstrap": "none (one job)"}
    return {**row, "n_runs": len(runs), "jobs": jobs,
            "lanes_per_job": float(runs.groupby("job").job_lanes.first().mean())}


def _wall_clock(rep: Report, parts: list) -> None:
    """Wall-clock seconds per run, per engine and setting, with a job as the unit of
    measurement (job time / lanes; tasks weighted equally). A CI is computed only where every
    task has at least two jobs; runs of different engines are never pooled nor ranked."""
    cost = []
    for engine, runs in rep.runs.groupby("engine", sort=True):
        for s in rep.settings:
            row = _wall_clock_row(s, runs[runs.setting == s], rep.options)
            if row is not None:
                cost.append({**row, "engine": engine})
    rep.cost = pd.DataFrame(cost)
    if not len(rep.cost):
        return
    parts.append(_rows("wall_clock", "raw", rep.cost, rep.options))
    rep.tables["wall_clock"] = write_table(
        pd.DataFrame({"engine": rep.cost.engine, "setting": rep.cost.setting,
                      "runs": rep.cost.n_runs.astype(int), "jobs": rep.cost.jobs.astype(int),
                      "lanes per job": rep.cost.lanes_per_job.round(1),
                      WALL_CLOCK: [_ci(r) for _, r in rep.cost.iterrows()]}),
        rep.out / "tables" / "wall_clock", group="engine", best={WALL_CLOCK: "min"},
        caption="Wall-clock time per run: job time / lanes, one measurement per job (lanes "
                "of a job share its time), mean over jobs with 95% CIs where every task has "
                "at least two jobs; ranked within each engine only")


def compute(rep: Report) -> None:
    """Every rliable estimate and every table; fills ``rep.aggregates`` and ``rep.tables``."""
    parts = []
    normalizations = ["minmax"]
    constants = rep.constants[rep.constants.env.isin(rep.aggregate_envs)]
    if constants.reference_score.notna().all():
        normalizations.append("reference")
    else:
        missing = constants.loc[constants.reference_score.isna(), "env"]
        rep.notes.append("No shipped reference score for " + ", ".join(missing)
                         + ": reference-normalized aggregates are skipped.")
    if len(rep.envs) == 1:
        normalizations.append("raw")
    scores = rep.scores[rep.scores.env.isin(rep.aggregate_envs)]  # same tasks for all
    rep.score_sets = {n: score_sets(scores, SCORE_COLUMN[n], rep.settings)
                      for n in normalizations}
    minmax_table = _aggregates(rep, normalizations, parts)

    # probability of improvement: vs the baseline, and every unordered pair
    minmax, reps, rs = rep.score_sets["minmax"], rep.options.reps, rep.options.random_state
    vs_base = [(s, rep.baseline) for s in rep.settings if rep.baseline and s != rep.baseline]
    rep.poi_baseline = agg.poi_table(minmax, vs_base, reps, rs)
    rep.poi_pairwise = agg.poi_table(minmax, list(itertools.combinations(rep.settings, 2)),
                                     reps, rs)
    for kind, df in (("poi_vs_baseline", rep.poi_baseline), ("poi_pairwise", rep.poi_pairwise)):
        if len(df):
            d = df.rename(columns={"x": "setting", "y": "versus"}).assign(metric="P(X > Y)",
                                                                           env="all")
            parts.append(_rows(kind, "minmax", d, rep.options))

    _per_env(rep, parts)
    if len(rep.envs) > 1:
        _table1(rep, minmax_table, parts)
    _sensitivity(rep, parts)
    _wall_clock(rep, parts)

    aggregates = pd.concat(parts, ignore_index=True)
    counts = [c for c in ("n_runs", "n_tasks", "tasks") if c in aggregates]
    aggregates = aggregates.astype({c: "Int64" for c in counts})  # counts stay integers
    order = [c for c in AGGREGATE_COLUMNS if c in aggregates]
    rep.aggregates = aggregates[order + [c for c in aggregates if c not in order]]

"""Build ``<experiment>/report/`` from the results store: scores, rliable aggregates, tables,
figures and ``report.md``.

Steps, in order: :func:`collect` (runs done and not done, random-policy scores, normalized
scores, notes) -> :func:`compute` (every rliable estimate, the tables) -> :func:`draw` (every
figure) -> files. Nothing is dropped silently: runs that are not done, runs without a final
score, unequal seed counts and skipped figures are written into ``notes``, which report.md
shows first.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from klppo_bench.errors import ConfigError
from klppo_bench.report import figures, style
from klppo_bench.report.tables import fmt, write_table
from klppo_bench.stats import aggregate as agg
from klppo_bench.stats.curves import curve_sets, frame_grid, restrict
from klppo_bench.stats.random_policy import random_scores
from klppo_bench.stats.scores import (as_float, collect_runs, normalize, parse_params,
                                      score_table,
                                      varied_params)
from klppo_bench.store import atomic_write_bytes, load_experiment

LABEL = {"minmax": "min-max normalized score (random 0, best setting 1)",
         "reference": "reference-normalized score (random 0, published 1)",
         "raw": "final score (return)"}
SCORE_COLUMN = {"minmax": "score_minmax", "reference": "score_reference", "raw": "final_score"}
UNEQUAL = "stratified-independent (unequal runs per task, task-weighted)"
AGGREGATE_COLUMNS = ["kind", "normalization", "setting", "versus", "env", "metric", "value",
                     "ci_low", "ci_high", "n_runs", "n_tasks", "tasks", "runs_per_task",
                     "equal_runs_per_task", "bootstrap", "dtarg", "increment", "reps",
                     "random_state", "ci", "method"]


@dataclass
class ReportOptions:
    reps: int = 2000
    """Bootstrap repetitions of every interval."""
    random_state: int = 0
    """Seed of every bootstrap (each interval is seeded afresh with it)."""
    baseline: str = "clip"
    """Setting (or variant with one setting) that probability of improvement compares to."""
    random_episodes: int = 100
    """Episodes of the uniform-random policy per env."""
    random_seed: int = 0
    """Seed of the random-policy measurement."""
    out: Path | None = None
    """Report directory (default ``<experiment>/report``)."""
    cache_dir: Path | None = None
    """Random-score cache directory (default ``<results root>/.cache``)."""


@dataclass
class Report:
    """What was computed and written; :mod:`klppo_bench.report.document` renders it."""
    exp_dir: Path
    out: Path
    options: ReportOptions
    runs: pd.DataFrame = None                       # done runs with a final score
    not_done: pd.DataFrame = None                   # pending / running / failed runs
    scores: pd.DataFrame = None                     # scores.csv
    constants: pd.DataFrame = None                  # per env: random, best, reference
    random: dict = field(default_factory=dict)      # env -> random-policy record
    settings: list = field(default_factory=list)    # baseline first
    envs: list = field(default_factory=list)
    baseline: str | None = None
    params: dict = field(default_factory=dict)      # setting -> varied parameters
    notes: list = field(default_factory=list)
    score_sets: dict = field(default_factory=dict)  # normalization -> setting -> env -> scores
    aggregates: pd.DataFrame = None                 # every estimate (aggregates.csv)
    poi_baseline: pd.DataFrame = None
    poi_pairwise: pd.DataFrame = None
    cost: pd.DataFrame = None                       # wall-clock per setting
    sensitivity: pd.DataFrame = None                # dtarg x increment cells, if any
    tables: dict = field(default_factory=dict)      # name -> markdown
    figures: dict = field(default_factory=dict)     # name -> png path relative to out


# ----------------------------------------------------------------------------- helpers

def _score_sets(scores: pd.DataFrame, column: str, settings: list[str]) -> dict:
    return {s: {env: g[column].to_numpy(float)
                for env, g in scores[scores.setting == s].groupby("env")} for s in settings}


def _params_of(rep: Report, setting: str) -> dict[str, str]:
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


# ----------------------------------------------------------------------------- collect

def _resolve_baseline(requested: str, runs: pd.DataFrame, settings: list[str], notes: list):
    if requested in settings:
        return requested
    candidates = sorted(runs.loc[runs.variant == requested, "setting"].unique())
    if len(candidates) > 1:
        notes.append(f"Baseline `{requested}` has several settings ({', '.join(candidates)}); "
                     f"using `{candidates[0]}`.")
    if candidates:
        return candidates[0]
    notes.append(f"Baseline `{requested}` is not a setting of this experiment (settings: "
                 f"{', '.join(settings)}); probability of improvement vs a baseline is skipped "
                 f"(choose one with `--baseline`).")
    return None


def _count_notes(rep: Report) -> None:
    for s in rep.settings:
        counts = rep.runs[rep.runs.setting == s].groupby("env").size()
        absent = sorted(set(rep.envs) - set(counts.index))
        if counts.nunique() > 1 or absent:
            rep.notes.append(
                f"Unequal seeds: `{s}` has " + ", ".join(f"{e}: {n}" for e, n in counts.items())
                + (f" and no run on {', '.join(absent)}" if absent else "")
                + ". Its aggregates use every run (per-task stratified bootstrap, tasks "
                  "weighted equally); nothing is truncated.")
    per_setting = rep.runs.groupby("setting").size()
    if per_setting.nunique() > 1:
        rep.notes.append("Settings have different numbers of runs: " + ", ".join(
            f"{s}: {per_setting[s]}" for s in rep.settings) + ".")


def collect(exp_dir: Path, opts: ReportOptions) -> Report:
    """Runs, random-policy scores and normalized scores; raises ConfigError before writing
    anything when there is nothing to report."""
    exp_dir = Path(exp_dir)
    if not (exp_dir / "runs").is_dir():
        raise ConfigError(f"report: {exp_dir}: no runs directory ({exp_dir}/runs/<run_id>/); "
                          f"allowed: an experiment directory written by `klppo-bench sweep`")
    if opts.reps < 1 or opts.random_episodes < 1:
        raise ConfigError(f"report: --reps={opts.reps}, --random-episodes="
                          f"{opts.random_episodes}; allowed: int >= 1")
    rep = Report(exp_dir=exp_dir, out=Path(opts.out or exp_dir / "report"), options=opts)
    runs, rep.not_done = collect_runs(exp_dir)
    no_score = runs[~np.isfinite(runs.final_score)]
    rep.runs = runs[np.isfinite(runs.final_score)].reset_index(drop=True)
    if rep.runs.empty:
        raise ConfigError(f"report: {exp_dir}: no finished run with a final score "
                          f"({len(rep.not_done)} not done); allowed: an experiment with at "
                          f"least one done run")
    if len(no_score):
        rep.notes.append(f"{len(no_score)} finished run(s) have no final score (no training "
                         f"episode ended) and are left out of the statistics: "
                         + ", ".join(no_score.run_id))
    if len(rep.not_done):
        counts = rep.not_done.state.value_counts()
        rep.notes.append("Runs not in the statistics (not done): "
                         + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
                         + " -- listed under *Runs not done*.")
    rep.envs = sorted(rep.runs.env.unique())
    settings = sorted(rep.runs.setting.unique())
    rep.baseline = _resolve_baseline(opts.baseline, rep.runs, settings, rep.notes)
    rep.settings = [s for s in settings if s == rep.baseline] + \
                   [s for s in settings if s != rep.baseline]
    rep.params = varied_params(rep.runs)
    _count_notes(rep)
    cache = opts.cache_dir or exp_dir.parent / ".cache"
    rep.random = random_scores(rep.envs, cache, opts.random_episodes, opts.random_seed)
    rep.scores, rep.constants = score_table(rep.runs,
                                            {e: r["mean"] for e, r in rep.random.items()})
    for r in rep.constants.itertuples():
        if r.best_score <= r.random_score:
            rep.notes.append(f"On {r.env} even the best setting ({fmt(r.best_score)}) does not "
                             f"beat the random policy ({fmt(r.random_score)}): its min-max "
                             f"normalized scores are not meaningful (training too short?).")
    return rep


# ----------------------------------------------------------------------------- compute

GRID_KEYS = ("dtarg", "increment", "decrement")


def _sensitivity_grid(rep: Report) -> pd.DataFrame | None:
    """Settings forming a dtarg x increment grid, if any: adaptive KL settings of one variant
    whose other parameters are equal (the largest such group). Two settings with identical
    parameters share a cell; the first (in report order) is used and the other is noted."""
    rows = []
    for s in rep.settings:
        p = _params_of(rep, s)
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


def compute(rep: Report) -> None:
    """Every rliable estimate and every table; fills ``rep.aggregates`` and ``rep.tables``."""
    opts, tables = rep.options, rep.out / "tables"
    reps, rs = opts.reps, opts.random_state
    parts = []

    normalizations = ["minmax"]
    if rep.constants.reference_score.notna().all():
        normalizations.append("reference")
    else:
        missing = rep.constants.loc[rep.constants.reference_score.isna(), "env"]
        rep.notes.append("No shipped reference score for " + ", ".join(missing)
                         + ": reference-normalized aggregates are skipped.")
    if len(rep.envs) == 1:
        normalizations.append("raw")
    rep.score_sets = {n: _score_sets(rep.scores, SCORE_COLUMN[n], rep.settings)
                      for n in normalizations}

    # aggregate metrics per normalization
    for n in normalizations:
        t = agg.aggregate_table(rep.score_sets[n], reps, rs)
        parts.append(_rows("aggregate", n, t.assign(env="all"), opts))
        cells = [{"setting": s, "runs": int(t[t.setting == s].n_runs.iloc[0]),
                  **{m: _ci(t[(t.setting == s) & (t.metric == m)].iloc[0]) for m in agg.METRICS}}
                 for s in rep.settings]
        name = "aggregate" if n == "minmax" else f"aggregate_{n}"
        rep.tables[name] = write_table(
            pd.DataFrame(cells), tables / name,
            best={"IQM": "max", "Mean": "max", "Median": "max", "Optimality Gap": "min"},
            caption=f"Aggregate {LABEL[n]} with 95% stratified-bootstrap CIs")
        if n == "minmax":
            minmax_table = t

    # probability of improvement: vs the baseline, and every unordered pair
    minmax = rep.score_sets["minmax"]
    vs_base = [(s, rep.baseline) for s in rep.settings if rep.baseline and s != rep.baseline]
    rep.poi_baseline = agg.poi_table(minmax, vs_base, reps, rs)
    rep.poi_pairwise = agg.poi_table(minmax, list(itertools.combinations(rep.settings, 2)),
                                     reps, rs)
    for kind, df in (("poi_vs_baseline", rep.poi_baseline), ("poi_pairwise", rep.poi_pairwise)):
        if len(df):
            d = df.rename(columns={"x": "setting", "y": "versus"}).assign(metric="P(X > Y)",
                                                                           env="all")
            parts.append(_rows(kind, "minmax", d, opts))

    # per environment x setting: mean and IQM of the final score, with CIs
    rows, cells = [], []
    for env in rep.envs:
        for s in rep.settings:
            g = rep.scores[(rep.scores.env == env) & (rep.scores.setting == s)]
            if g.empty:
                continue
            tasks = {env: g.final_score.to_numpy(float)}
            mean, iqm = (_estimate(s, env, "Mean", tasks, _mean, opts),
                         _estimate(s, env, "IQM", tasks, _iqm, opts))
            rows += [mean, iqm]
            cells.append({"env": env, "setting": s, "seeds": len(g),
                          "mean final score": _ci(mean), "IQM final score": _ci(iqm),
                          "final eval return": float(g.final_eval_return.mean())})
    parts.append(_rows("env_setting", "raw", pd.DataFrame(rows), opts))
    rep.tables["env_setting"] = write_table(
        pd.DataFrame(cells), tables / "env_setting", group="env",
        best={"mean final score": "max", "IQM final score": "max"},
        caption="Final score per environment and setting: mean and IQM over seeds with 95% "
                "stratified-bootstrap CIs")

    if len(rep.envs) > 1:  # the PPO paper's Table 1: average normalized score per setting
        cells = []
        for s in rep.settings:
            row = {"setting": s, **{e: float(np.mean(minmax[s][e])) if e in minmax[s]
                                    else float("nan") for e in rep.envs}}
            row["average"] = _ci(minmax_table[(minmax_table.setting == s)
                                              & (minmax_table.metric == "Mean")].iloc[0])
            cells.append(row)
        rep.tables["table1"] = write_table(
            pd.DataFrame(cells), tables / "table1",
            best={"average": "max", **{e: "max" for e in rep.envs}},
            caption="Average min-max normalized score per setting (PPO paper, Table 1 style)")

    # dtarg x increment sensitivity: mean final score per grid cell
    grid = _sensitivity_grid(rep)
    if grid is None:
        rep.notes.append("No dtarg x increment grid in this experiment (needs one adaptive KL "
                         "variant with two or more (dtarg, increment) settings): sensitivity "
                         "figures skipped.")
    else:
        n = "minmax" if len(rep.envs) > 1 else "raw"
        sets = _score_sets(rep.scores, SCORE_COLUMN[n], list(grid.setting))
        cells = pd.DataFrame([{**_estimate(r.setting, "all", "Mean", sets[r.setting], _mean,
                                           opts), "dtarg": r.dtarg, "increment": r.increment}
                              for r in grid.itertuples()])
        rep.sensitivity = cells
        parts.append(_rows("dtarg_increment", n, cells, opts))
        rep.tables["dtarg_increment"] = write_table(
            pd.DataFrame({"dtarg": [f"{d:g}" for d in cells.dtarg],
                          "increment": [f"{i:g}" for i in cells.increment],
                          "runs": cells.n_runs.astype(int),
                          "mean final score": [_ci(r) for _, r in cells.iterrows()]}),
            tables / "dtarg_increment", best={"mean final score": "max"},
            caption=f"dtarg x increment grid: mean {LABEL[n]}, 95% CIs")

    # wall-clock cost per run (status.json seconds), tasks weighted equally
    cost = []
    for s in rep.settings:
        g = rep.runs[rep.runs.setting == s]
        tasks = {env: e.wall_seconds.to_numpy(float) for env, e in g.groupby("env")}
        if all(np.isfinite(a).all() for a in tasks.values()):
            cost.append(_estimate(s, "all", "wall_seconds", tasks, _mean, opts))
    rep.cost = pd.DataFrame(cost)
    if len(rep.cost):
        parts.append(_rows("wall_clock", "raw", rep.cost, opts))
    aggregates = pd.concat(parts, ignore_index=True)
    counts = [c for c in ("n_runs", "n_tasks", "tasks") if c in aggregates]
    aggregates = aggregates.astype({c: "Int64" for c in counts})  # counts stay integers
    order = [c for c in AGGREGATE_COLUMNS if c in aggregates]
    rep.aggregates = aggregates[order + [c for c in aggregates if c not in order]]


# ----------------------------------------------------------------------------- draw

def draw(rep: Report) -> None:
    """Every figure (PDF + PNG); a skipped figure is explained in ``rep.notes``."""
    style.apply()
    reps, rs = rep.options.reps, rep.options.random_state
    styles = style.setting_styles(rep.settings)

    def save(fig, name):
        style.save_figure(fig, rep.out / "figures" / name)
        rep.figures[name] = f"figures/{name}.png"

    def mean_curves(long_env, env, metric, settings, transform=None, points=60):
        grid = frame_grid(long_env, points)
        sets = restrict(curve_sets(long_env, metric, grid, transform), env)
        return grid, {s: agg.curve_estimates(sets[s], "mean", reps, rs)
                      for s in settings if s in sets}

    long = load_experiment(rep.exp_dir, "metrics")
    long = long[long.run_id.isin(rep.runs.run_id)]

    for env in rep.envs:
        grid, est = mean_curves(long[long.env == env], env, "episode_return", rep.settings)
        save(figures.learning_curves(grid, est, styles, env), f"learning_curves_{env}")

    t = rep.aggregates
    t = t[(t.kind == "aggregate") & (t.normalization == "minmax")]
    save(figures.aggregate_intervals(t, rep.settings, styles, list(agg.METRICS),
                                     LABEL["minmax"]), "aggregate_intervals")

    minmax = rep.score_sets["minmax"]
    values = np.concatenate([a for tasks in minmax.values() for a in tasks.values()])
    taus = np.linspace(min(0.0, values.min()), max(1.0, values.max()) * 1.02, 101)
    profiles = agg.performance_profiles(minmax, taus, reps, rs)
    save(figures.performance_profiles(taus, profiles, styles, r"min-max normalized score $\tau$"),
         "performance_profiles")

    if len(rep.poi_baseline):
        save(figures.probability_of_improvement(rep.poi_baseline, styles), "poi_vs_baseline")
    if len(rep.poi_pairwise):
        # P(Y > X) = 1 - P(X > Y) exactly: the statistic counts ties as one half
        flipped = rep.poi_pairwise.rename(columns={"x": "y", "y": "x"})
        full = pd.concat([rep.poi_pairwise, flipped.assign(value=1 - flipped.value)])
        save(figures.poi_matrix(full, rep.settings), "poi_pairwise")

    const = rep.constants.set_index("env")

    def normalized(run, v):
        return normalize(v, const.loc[run["env"], "random_score"], const.loc[run["env"], "best_score"])
    grid = frame_grid(long, 20)
    sets = curve_sets(long, "episode_return", grid, transform=normalized)
    est = {s: agg.curve_estimates(sets[s], "iqm", reps, rs) for s in rep.settings if s in sets}
    save(figures.sample_efficiency(grid, est, styles, "IQM normalized return"),
         "sample_efficiency")

    kl_settings = [s for s in rep.settings if "dtarg" in _params_of(rep, s)]
    mc_settings = [s for s in kl_settings if "samples_mc_kl" in _params_of(rep, s)]
    if not kl_settings:
        rep.notes.append("No setting with a KL penalty: KL diagnostics skipped.")
    if not mc_settings:
        rep.notes.append("No Monte-Carlo KL setting: analytic vs Monte-Carlo KL figure skipped.")

    def per_dtarg(run, v):
        return v / as_float(parse_params(run["params"]).get("dtarg"))
    for env in rep.envs:
        long_env = long[(long.env == env) & long.setting.isin(kl_settings)]
        if long_env.empty:
            continue
        grid, ratio = mean_curves(long_env, env, "kl_batch", kl_settings, per_dtarg)
        _, log_beta = mean_curves(long_env, env, "beta", kl_settings, lambda r, v: np.log(np.maximum(v, 1e-30)))
        beta = {s: tuple(np.exp(x) for x in e) for s, e in log_beta.items()}  # geometric
        save(figures.kl_diagnostics(grid, ratio, beta, styles, env), f"kl_diagnostics_{env}")
        long_mc = long_env[long_env.setting.isin(mc_settings)]
        if not long_mc.empty:
            grid, analytic = mean_curves(long_mc, env, "kl_batch", mc_settings)
            _, estimate = mean_curves(long_mc, env, "kl_estimate", mc_settings)
            _, spread = mean_curves(long_mc, env, "kl_estimate_err_std", mc_settings)
            save(figures.mc_kl(grid, analytic, estimate, spread, styles, env),
                 f"mc_vs_analytic_kl_{env}")

    if rep.sensitivity is not None:
        label = "mean final score" if len(rep.envs) == 1 else "mean min-max normalized score"
        save(figures.sensitivity_lines(rep.sensitivity, label), "dtarg_increment_lines")
        save(figures.sensitivity_heatmap(rep.sensitivity, label), "dtarg_increment_heatmap")
    if len(rep.cost):
        save(figures.wall_clock(rep.cost, styles), "wall_clock")


# ----------------------------------------------------------------------------- write

def _clear_generated(out: Path) -> None:
    """Remove figures and tables of an earlier report, so none outlives its data."""
    for sub, exts in (("figures", (".pdf", ".png")), ("tables", (".md", ".tex", ".csv"))):
        if (out / sub).is_dir():
            for f in (out / sub).iterdir():
                if f.suffix in exts:
                    f.unlink()


def build_report(exp_dir: Path | str, options: ReportOptions | None = None) -> Report:
    """Compute and write the whole report; returns what was written."""
    from klppo_bench.report.document import render

    rep = collect(Path(exp_dir), options or ReportOptions())
    final = rep.out
    # Build beside the report, then move the files in: a rebuild that fails half-way leaves
    # the previous report whole instead of a mix of old and new files.
    final.parent.mkdir(parents=True, exist_ok=True)
    rep.out = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
    try:
        compute(rep)
        draw(rep)
        atomic_write_bytes(rep.out / "scores.csv", rep.scores.to_csv(index=False).encode())
        atomic_write_bytes(rep.out / "aggregates.csv",
                           rep.aggregates.to_csv(index=False).encode())
        atomic_write_bytes(rep.out / "report.md", render(rep).encode())
        final.mkdir(exist_ok=True)
        _clear_generated(final)
        built = sorted(p for p in rep.out.rglob("*") if p.is_file())
        for src in sorted(built, key=lambda p: p.name == "report.md"):  # report.md last
            dst = final / src.relative_to(rep.out)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    finally:
        shutil.rmtree(rep.out, ignore_errors=True)
        rep.out = final
    return rep

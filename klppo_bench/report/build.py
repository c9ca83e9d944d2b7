"""Build ``<experiment>/report/`` from the results store: scores, rliable aggregates, tables,
figures and ``report.md``.

Order: collect runs (done and not done) -> random-policy scores (cached) -> normalized scores
(``scores.csv``) -> rliable estimates (``aggregates.csv``) -> tables -> figures -> report.md.
Nothing is dropped silently: runs that are not done, runs without a final score and unequal
seed counts are written into ``notes`` and shown at the top of report.md.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from klppo_bench.errors import ConfigError
from klppo_bench.report import figures, style
from klppo_bench.report.tables import write_table
from klppo_bench.stats import aggregate as agg
from klppo_bench.stats.curves import curve_sets, frame_grid, restrict
from klppo_bench.stats.random_policy import random_scores
from klppo_bench.stats.scores import as_float, collect_runs, parse_params, score_table, varied_params
from klppo_bench.store import atomic_write_bytes, load_experiment

NORMALIZED_LABEL = {"minmax": "min-max normalized score (random 0, best setting 1)",
                    "reference": "reference-normalized score (random 0, published 1)",
                    "raw": "final score (return)"}


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
    runs: pd.DataFrame = None
    not_done: pd.DataFrame = None
    scores: pd.DataFrame = None
    constants: pd.DataFrame = None
    random: dict = field(default_factory=dict)
    settings: list = field(default_factory=list)
    envs: list = field(default_factory=list)
    baseline: str | None = None
    params: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)      # name -> markdown
    figures: dict = field(default_factory=dict)     # name -> png path (relative to out)
    notes: list = field(default_factory=list)
    aggregates: pd.DataFrame = None


def _score_sets(scores: pd.DataFrame, column: str, settings: list[str]) -> dict:
    return {s: {env: g[column].to_numpy(float) for env, g in scores[scores.setting == s].groupby("env")}
            for s in settings}


def _resolve_baseline(requested: str, runs: pd.DataFrame, settings: list[str], notes: list):
    if requested in settings:
        return requested
    candidates = sorted(runs.loc[runs.variant == requested, "setting"].unique())
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        notes.append(f"Baseline `{requested}` has several settings ({', '.join(candidates)}); "
                     f"using `{candidates[0]}`.")
        return candidates[0]
    notes.append(f"Baseline `{requested}` is not a setting of this experiment (settings: "
                 f"{', '.join(settings)}); probability of improvement vs a baseline is skipped "
                 f"(choose one with `--baseline`).")
    return None


def _rows(kind: str, normalization: str, df: pd.DataFrame, opts: ReportOptions) -> pd.DataFrame:
    df = df.copy()
    df.insert(0, "kind", kind)
    df.insert(1, "normalization", normalization)
    df["reps"] = opts.reps
    df["random_state"] = opts.random_state
    df["ci"] = agg.CI_SIZE
    df["method"] = agg.METHOD
    return df


def _estimate_row(setting, env, metric, est, tasks) -> dict:
    point, low, high = est
    equal = len({len(a) for a in tasks.values()}) == 1
    return {"setting": setting, "env": env, "metric": metric, "value": float(np.ravel(point)[0]),
            "ci_low": float(np.ravel(low)[0]), "ci_high": float(np.ravel(high)[0]),
            "n_runs": int(sum(len(a) for a in tasks.values())), "n_tasks": len(tasks),
            "runs_per_task": agg.describe_counts(tasks), "equal_runs_per_task": equal,
            "bootstrap": "stratified" if equal else
            "stratified-independent (unequal runs per task, task-weighted)"}


def _mean_func(*args):
    return np.array([agg.mean(*args)])


def _mean_iqm_func(*args):
    return np.array([agg.mean(*args), agg.iqm(*args)])


def collect(exp_dir: Path, opts: ReportOptions) -> Report:
    exp_dir = Path(exp_dir)
    if not (exp_dir / "runs").is_dir():
        raise ConfigError(f"report: {exp_dir}: no runs directory ({exp_dir}/runs/<run_id>/); "
                          f"allowed: an experiment directory written by `klppo-bench sweep`")
    if opts.reps < 1:
        raise ConfigError(f"report: --reps={opts.reps}; allowed: int >= 1")
    rep = Report(exp_dir=exp_dir, out=Path(opts.out or exp_dir / "report"), options=opts)
    runs, rep.not_done = collect_runs(exp_dir)
    missing = runs[~np.isfinite(runs.final_score)]
    if len(missing):
        rep.notes.append(f"{len(missing)} finished run(s) have no final score (no training "
                         f"episode ended) and are left out of the statistics: "
                         + ", ".join(missing.run_id))
    rep.runs = runs[np.isfinite(runs.final_score)].reset_index(drop=True)
    if rep.runs.empty:
        raise ConfigError(f"report: {exp_dir}: no finished run with a final score "
                          f"({len(rep.not_done)} not done); allowed: an experiment with at "
                          f"least one done run")
    if len(rep.not_done):
        counts = rep.not_done.state.value_counts().to_dict()
        rep.notes.append("Runs not in the statistics (not done): "
                         + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
                         + " -- listed under *Runs not done*.")
    rep.envs = sorted(rep.runs.env.unique())
    settings = sorted(rep.runs.setting.unique())
    rep.baseline = _resolve_baseline(opts.baseline, rep.runs, settings, rep.notes)
    rep.settings = ([rep.baseline] if rep.baseline else []) + [s for s in settings if s != rep.baseline]
    rep.params = varied_params(rep.runs)
    cache = opts.cache_dir or exp_dir.parent / ".cache"
    rep.random = random_scores(rep.envs, cache, opts.random_episodes, opts.random_seed)
    rep.scores, rep.constants = score_table(rep.runs, {e: r["mean"] for e, r in rep.random.items()})
    for s in rep.settings:
        counts = rep.runs[rep.runs.setting == s].groupby("env").size()
        if counts.nunique() > 1 or len(counts) < len(rep.envs):
            rep.notes.append(
                f"Unequal seeds: `{s}` has " + ", ".join(f"{e}: {n}" for e, n in counts.items())
                + (f" and no run on {', '.join(sorted(set(rep.envs) - set(counts.index)))}"
                   if len(counts) < len(rep.envs) else "")
                + ". Its aggregates use every run (per-task stratified bootstrap, tasks weighted "
                  "equally); nothing is truncated.")
    if rep.runs.groupby("setting").size().nunique() > 1:
        rep.notes.append("Settings have different numbers of runs: "
                         + ", ".join(f"{s}: {n}" for s, n in
                                     rep.runs.groupby("setting").size().items()) + ".")
    return rep


def compute(rep: Report) -> None:
    """Every rliable estimate, tables included; fills ``rep.aggregates`` and ``rep.tables``."""
    opts, out = rep.options, rep.out
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
    column = {"minmax": "score_minmax", "reference": "score_reference", "raw": "final_score"}
    rep.score_sets = {n: _score_sets(rep.scores, column[n], rep.settings) for n in normalizations}
    aggregates = {}
    for n in normalizations:
        table = agg.aggregate_table(rep.score_sets[n], reps, rs)
        aggregates[n] = table
        parts.append(_rows("aggregate", n, table, opts))

    minmax = rep.score_sets["minmax"]
    pairs_base = [(s, rep.baseline) for s in rep.settings if rep.baseline and s != rep.baseline]
    pairs_all = list(itertools.combinations(rep.settings, 2))
    rep.poi_baseline = agg.poi_table(minmax, pairs_base, reps, rs)
    rep.poi_pairwise = agg.poi_table(minmax, pairs_all, reps, rs)
    for kind, df in (("poi_vs_baseline", rep.poi_baseline), ("poi_pairwise", rep.poi_pairwise)):
        if len(df):
            d = df.rename(columns={"x": "setting", "y": "versus"})
            d["metric"] = "P(X > Y)"
            parts.append(_rows(kind, "minmax", d, opts))

    # per env x setting: mean and IQM of the raw final score
    env_rows, cells = [], []
    for env in rep.envs:
        for s in rep.settings:
            g = rep.scores[(rep.scores.env == env) & (rep.scores.setting == s)]
            if g.empty:
                continue
            tasks = {env: g.final_score.to_numpy(float)}
            point, low, high = agg.interval_estimate(agg.pack(tasks), _mean_iqm_func, reps, rs)
            for k, metric in enumerate(("Mean", "IQM")):
                env_rows.append(_estimate_row(s, env, metric, (point[k], low[k], high[k]), tasks))
            cells.append({"env": env, "setting": s, "seeds": len(g),
                          "mean final score": (point[0], low[0], high[0]),
                          "IQM final score": (point[1], low[1], high[1]),
                          "final eval return": float(g.final_eval_return.mean())})
    parts.append(_rows("env_setting", "raw", pd.DataFrame(env_rows), opts))
    tables = rep.out / "tables"
    rep.tables["env_setting"] = write_table(
        pd.DataFrame(cells), tables / "env_setting", best={"mean final score": "max",
                                                           "IQM final score": "max"},
        group="env", caption="Final score per environment and setting: mean and IQM over "
                             "seeds with 95% stratified-bootstrap CIs")

    for n in normalizations:
        t = aggregates[n]
        cells = [{"setting": s, "runs": int(t[t.setting == s].n_runs.iloc[0]),
                  **{m: tuple(t[(t.setting == s) & (t.metric == m)][["value", "ci_low", "ci_high"]]
                              .iloc[0]) for m in agg.METRICS}} for s in rep.settings]
        name = "aggregate" if n == "minmax" else f"aggregate_{n}"
        rep.tables[name] = write_table(
            pd.DataFrame(cells), tables / name,
            best={"IQM": "max", "Mean": "max", "Median": "max", "Optimality Gap": "min"},
            caption=f"Aggregate {NORMALIZED_LABEL[n]} with 95% stratified-bootstrap CIs")

    if len(rep.envs) > 1:  # the PPO paper's Table 1: average normalized score per setting
        t = aggregates["minmax"]
        cells = []
        for s in rep.settings:
            row = {"setting": s}
            for env in rep.envs:
                v = minmax[s].get(env)
                row[env] = float(np.mean(v)) if v is not None else float("nan")
            r = t[(t.setting == s) & (t.metric == "Mean")].iloc[0]
            row["average"] = (r.value, r.ci_low, r.ci_high)
            cells.append(row)
        rep.tables["table1"] = write_table(
            pd.DataFrame(cells), tables / "table1", best={"average": "max", **{e: "max" for e in rep.envs}},
            caption="Average min-max normalized score per setting (PPO paper, Table 1 style)")

    # wall-clock cost per run and setting (tasks weighted equally)
    cost_rows = []
    for s in rep.settings:
        g = rep.runs[rep.runs.setting == s]
        tasks = {env: e.wall_seconds.to_numpy(float) for env, e in g.groupby("env")}
        if not all(np.isfinite(a).all() for a in tasks.values()):
            continue
        est = agg.interval_estimate(agg.pack(tasks), _mean_func, reps, rs)
        cost_rows.append(_estimate_row(s, "all", "wall_seconds", est, tasks))
    rep.cost = pd.DataFrame(cost_rows)
    if len(rep.cost):
        parts.append(_rows("wall_clock", "raw", rep.cost, opts))
    rep.aggregates = pd.concat(parts, ignore_index=True)


def _sensitivity_cells(rep: Report) -> tuple[pd.DataFrame | None, str]:
    """The dtarg x increment grid of one adaptive KL variant, if the experiment has one."""
    rows = []
    for s in rep.settings:
        g = rep.runs[rep.runs.setting == s]
        p = parse_params(g.params.iloc[0])
        if "dtarg" in p and "increment" in p and as_float(p["increment"]) != 1.0:
            rows.append({"setting": s, "variant": g.variant.iloc[0], "dtarg": as_float(p["dtarg"]),
                         "increment": as_float(p["increment"])})
    grid = pd.DataFrame(rows, columns=["setting", "variant", "dtarg", "increment"])
    best = None
    for variant, g in grid.groupby("variant"):
        cells = g.drop_duplicates(["dtarg", "increment"])
        if len(cells) == len(g) and len(g) >= 2 and (best is None or len(g) > len(best)):
            best = g
    if best is None:
        return None, ("No dtarg x increment grid in this experiment (needs one adaptive KL "
                      "variant with two or more (dtarg, increment) settings): sensitivity "
                      "figures skipped.")
    return best.reset_index(drop=True), ""


def draw(rep: Report) -> None:
    """Every figure (PDF + PNG); skipped figures are explained in ``rep.notes``."""
    style.apply()
    opts, figs = rep.options, rep.out / "figures"
    reps, rs = opts.reps, opts.random_state
    styles = style.setting_styles(rep.settings)
    rep.styles = styles

    def save(fig, name):
        style.save_figure(fig, figs / name)
        rep.figures[name] = f"figures/{name}.png"

    long = load_experiment(rep.exp_dir, "metrics")
    long = long[long.run_id.isin(rep.runs.run_id)]
    random = {e: r["mean"] for e, r in rep.random.items()}
    const = rep.constants.set_index("env")

    for env in rep.envs:
        long_env = long[long.env == env]
        grid = frame_grid(long_env, 60)
        sets = restrict(curve_sets(long_env, "episode_return", grid), env)
        est = {s: agg.curve_estimates(sets[s], "mean", reps, rs) for s in rep.settings if s in sets}
        save(figures.learning_curves(grid, est, styles, env), f"learning_curves_{env}")

    t = rep.aggregates
    t = t[(t.kind == "aggregate") & (t.normalization == "minmax")]
    save(figures.aggregate_intervals(t, rep.settings, styles, list(agg.METRICS),
                                     NORMALIZED_LABEL["minmax"]), "aggregate_intervals")

    values = np.concatenate([np.concatenate(list(v.values())) for v in rep.score_sets["minmax"].values()])
    taus = np.linspace(min(0.0, values.min()), max(1.0, values.max()) * 1.02, 101)
    profiles = agg.performance_profiles(rep.score_sets["minmax"], taus, reps, rs)
    save(figures.performance_profiles(taus, profiles, styles, r"min-max normalized score $\tau$"),
         "performance_profiles")

    if len(rep.poi_baseline):
        save(figures.probability_of_improvement(rep.poi_baseline, styles), "poi_vs_baseline")
    if len(rep.poi_pairwise):
        full = pd.concat([rep.poi_pairwise, rep.poi_pairwise.rename(columns={"x": "y", "y": "x"})
                          .assign(value=lambda d: 1 - d.value)], ignore_index=True)
        save(figures.poi_matrix(full, rep.settings), "poi_pairwise")

    grid = frame_grid(long, 20)

    def normalized(run, values):
        return (values - random[run["env"]]) / (const.loc[run["env"], "best_score"] - random[run["env"]])
    sets = curve_sets(long, "episode_return", grid, transform=normalized)
    est = {s: agg.curve_estimates(sets[s], "iqm", reps, rs) for s in rep.settings if s in sets}
    save(figures.sample_efficiency(grid, est, styles, "IQM min-max normalized return"),
         "sample_efficiency")

    def per_dtarg(run, values):
        return values / as_float(parse_params(run["params"]).get("dtarg"))
    kl_settings = [s for s in rep.settings
                   if "dtarg" in parse_params(rep.runs[rep.runs.setting == s].params.iloc[0])]
    mc_settings = [s for s in kl_settings
                   if "samples_mc_kl" in parse_params(rep.runs[rep.runs.setting == s].params.iloc[0])]
    if not kl_settings:
        rep.notes.append("No setting with a KL penalty: KL diagnostics skipped.")
    if not mc_settings:
        rep.notes.append("No Monte-Carlo KL setting: analytic vs Monte-Carlo KL figure skipped.")
    for env in rep.envs:
        long_env = long[(long.env == env) & long.setting.isin(kl_settings)]
        if long_env.empty:
            continue
        grid = frame_grid(long_env, 60)

        def est(metric, transform=None, only=kl_settings):
            sets = restrict(curve_sets(long_env, metric, grid, transform), env)
            return {s: agg.curve_estimates(sets[s], "mean", reps, rs) for s in only if s in sets}
        log_beta = est("beta", lambda run, v: np.log(v))
        beta = {s: tuple(np.exp(x) for x in e) for s, e in log_beta.items()}
        save(figures.kl_diagnostics(grid, est("kl_batch", per_dtarg), beta, styles, env),
             f"kl_diagnostics_{env}")
        if mc_settings and not long_env[long_env.setting.isin(mc_settings)].empty:
            save(figures.mc_kl(grid, est("kl_batch", only=mc_settings),
                               est("kl_estimate", only=mc_settings),
                               est("kl_estimate_err_std", only=mc_settings), styles, env),
                 f"mc_vs_analytic_kl_{env}")

    grid_cells, why = _sensitivity_cells(rep)
    if grid_cells is None:
        rep.notes.append(why)
        rep.sensitivity = None
    else:
        n = "minmax" if len(rep.envs) > 1 else "raw"
        sets = _score_sets(rep.scores, "score_minmax" if n == "minmax" else "final_score",
                           list(grid_cells.setting))
        rows = []
        for r in grid_cells.itertuples():
            p, lo, hi = agg.interval_estimate(agg.pack(sets[r.setting]), _mean_func, reps, rs)
            rows.append({"setting": r.setting, "dtarg": r.dtarg, "increment": r.increment,
                         "value": p[0], "ci_low": lo[0], "ci_high": hi[0]})
        cells = pd.DataFrame(rows)
        rep.sensitivity = cells
        rep.aggregates = pd.concat([rep.aggregates, _rows(
            "dtarg_increment", n, cells.assign(metric="Mean", env="all"), opts)],
            ignore_index=True)
        label = "mean final score" if n == "raw" else "mean min-max normalized score"
        save(figures.sensitivity_lines(cells, label), "dtarg_increment_lines")
        save(figures.sensitivity_heatmap(cells, label), "dtarg_increment_heatmap")

    if len(rep.cost):
        save(figures.wall_clock(rep.cost, styles), "wall_clock")


def build_report(exp_dir: Path | str, options: ReportOptions | None = None) -> Report:
    """Compute and write the whole report; returns what was written."""
    from klppo_bench.report.document import render

    rep = collect(Path(exp_dir), options or ReportOptions())
    rep.out.mkdir(parents=True, exist_ok=True)
    compute(rep)
    draw(rep)
    atomic_write_bytes(rep.out / "scores.csv", rep.scores.to_csv(index=False).encode())
    atomic_write_bytes(rep.out / "aggregates.csv", rep.aggregates.to_csv(index=False).encode())
    atomic_write_bytes(rep.out / "report.md", render(rep).encode())
    return rep


def finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)

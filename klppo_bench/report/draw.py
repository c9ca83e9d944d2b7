"""Every figure of a report (PDF + PNG) from what :mod:`klppo_bench.report.compute` estimated
and the metrics :mod:`klppo_bench.report.collect` read; a skipped figure is explained in
``rep.notes``."""

from __future__ import annotations

import numpy as np
import pandas as pd

from klppo_bench.report import figures, style
from klppo_bench.report.collect import Report
from klppo_bench.report.compute import LABEL, params_of
from klppo_bench.stats import aggregate as agg
from klppo_bench.stats.curves import curve_sets, frame_grid, restrict
from klppo_bench.stats.scores import as_float, normalize, parse_params

KL_RATIO_STATISTIC = "run_median"
"""KL / dtarg over seeds: the median run (one seed whose KL runs away would drag a mean)."""


def _per_dtarg(run, values):
    return values / as_float(parse_params(run["params"]).get("dtarg"))


def _log(run, values):
    return np.log(np.maximum(values, 1e-30))


def kl_ratio_and_beta(long_env: pd.DataFrame, env: str, settings: list[str], reps: int,
                      random_state: int, points: int = 60):
    """``(grid, ratio, beta)`` of the KL diagnostics figure on one env: KL / dtarg as the
    median over seeds and beta as the geometric mean over seeds (the mean of log beta,
    exponentiated; beta moves by factors), each ``{setting: (point, low, high)}`` with 95%
    bootstrap CIs."""
    grid = frame_grid(long_env, points)

    def estimates(metric, statistic, transform):
        sets = restrict(curve_sets(long_env, metric, grid, transform), env)
        return {s: agg.curve_estimates(sets[s], statistic, reps, random_state)
                for s in settings if s in sets}
    ratio = estimates("kl_batch", KL_RATIO_STATISTIC, _per_dtarg)
    beta = {s: tuple(np.exp(x) for x in e)
            for s, e in estimates("beta", "mean", _log).items()}
    return grid, ratio, beta


def draw(rep: Report) -> None:
    """Every figure (PDF + PNG); a skipped figure is explained in ``rep.notes``."""
    style.apply()
    reps, rs = rep.options.reps, rep.options.random_state
    styles = style.setting_styles(rep.settings)

    def save(fig, name):
        style.save_figure(fig, rep.out / "figures" / name, png_dpi=rep.options.png_dpi)
        rep.figures[name] = f"figures/{name}.png"

    def mean_curves(long_env, env, metric, settings, points=60):
        grid = frame_grid(long_env, points)
        sets = restrict(curve_sets(long_env, metric, grid), env)
        return grid, {s: agg.curve_estimates(sets[s], "mean", reps, rs)
                      for s in settings if s in sets}

    long = rep.metrics
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
        return normalize(v, const.loc[run["env"], "random_score"],
                         const.loc[run["env"], "best_score"])
    common = long[long.env.isin(rep.aggregate_envs)]  # the tasks every setting ran on
    grid = frame_grid(common, 20)
    sets = curve_sets(common, "episode_return", grid, transform=normalized)
    est = {s: agg.curve_estimates(sets[s], "iqm", reps, rs) for s in rep.settings if s in sets}
    save(figures.sample_efficiency(grid, est, styles, "IQM normalized return"),
         "sample_efficiency")

    kl_settings = [s for s in rep.settings if "dtarg" in params_of(rep, s)]
    mc_settings = [s for s in kl_settings if "samples_mc_kl" in params_of(rep, s)]
    if not kl_settings:
        rep.notes.append("No setting with a KL penalty: KL diagnostics skipped.")
    if not mc_settings:
        rep.notes.append("No Monte-Carlo KL setting: analytic vs Monte-Carlo KL figure skipped.")
    for env in rep.envs:
        long_env = long[(long.env == env) & long.setting.isin(kl_settings)]
        if long_env.empty:
            continue
        grid, ratio, beta = kl_ratio_and_beta(long_env, env, kl_settings, reps, rs)
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

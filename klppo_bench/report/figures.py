"""Figures. Each function takes prepared numbers (``(point, low, high)`` per setting, from
:mod:`klppo_bench.stats`) and the setting styles, and returns a matplotlib Figure; none calls
``show()``. Sizes are for one paper column (3.3 in) unless stated; the aggregate intervals
are a double-column figure."""

from __future__ import annotations

import warnings
from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter
from rliable import plot_utils

from klppo_bench.report.style import COLUMN_WIDTH, DOUBLE_WIDTH, Style

Estimate = tuple  # (point, low, high) arrays

PAIR_SEP = "\x1f"  # setting names may contain commas; rliable splits pairs on this


def _plain_log_axis(ax) -> None:
    """Log-scaled y with plain numbers (0.5, 1, 2, 5) instead of powers of ten; linear when
    the data span less than a factor of 3 (a log axis would show no labelled tick)."""
    low, high = ax.dataLim.y0, ax.dataLim.y1
    if not (low > 0 and high / low >= 3):
        return
    decades = np.log10(high / low)
    subs = (1.0, 2.0, 5.0) if decades <= 1.5 else (1.0, 3.0) if decades <= 3 else (1.0,)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _frames_axis(ax, label: str = "environment frames") -> None:
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel(label)


def _legend_below(fig, settings: list[str], styles: Mapping[str, Style]) -> None:
    """One legend under the whole figure (after laying it out, so it never covers a label)."""
    handles = [plt.Line2D([], [], color=styles[s].color, linestyle=styles[s].linestyle,
                          label=s) for s in settings]
    longest = max(len(s) for s in settings)
    ncol = 1 if longest > 30 else 2 if longest > 18 else 3  # stay within the column width
    fig.tight_layout(pad=0.3)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol,
               handlelength=2.2, columnspacing=1.0)


def _tidy_rliable_axes(ax) -> None:
    """rliable draws 2-pt spines and x-large labels; bring them to the paper style."""
    for spine in ax.spines.values():
        spine.set_linewidth(0.8)
    ax.tick_params(labelsize=7, length=2, width=0.6)
    ax.xaxis.label.set_size(8)
    ax.yaxis.label.set_size(8)


def band_plot(ax, grid, estimates: Mapping[str, Estimate], styles: Mapping[str, Style],
              alpha: float = 0.2) -> None:
    """Point estimate as a line and its 95% CI as a band, one colour per setting."""
    for setting, (point, low, high) in estimates.items():
        st = styles[setting]
        ax.plot(grid, point, color=st.color, linestyle=st.linestyle, label=setting)
        ax.fill_between(grid, low, high, color=st.color, alpha=alpha, linewidth=0)


def learning_curves(grid, estimates: Mapping[str, Estimate], styles: Mapping[str, Style],
                    title: str, ylabel: str = "episode return") -> plt.Figure:
    """Training return vs frames: mean over seeds with a 95% bootstrap CI band."""
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.2))
    band_plot(ax, grid, estimates, styles)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    _frames_axis(ax)
    _legend_below(fig, list(estimates), styles)
    return fig


def aggregate_intervals(table: pd.DataFrame, settings: list[str],
                        styles: Mapping[str, Style], metric_names: list[str],
                        xlabel: str) -> plt.Figure:
    """rliable's interval-estimate plot (double column), with the x-label moved below the
    tick labels (rliable's default position overlaps them)."""
    points, intervals = {}, {}
    for s in settings:
        rows = table[table.setting == s].set_index("metric").loc[metric_names]
        points[s] = rows["value"].to_numpy()
        intervals[s] = np.vstack([rows["ci_low"].to_numpy(), rows["ci_high"].to_numpy()])
    order = list(reversed(settings))  # rliable draws the first algorithm at the bottom
    fig, axes = plot_utils.plot_interval_estimates(
        points, intervals, metric_names=metric_names, algorithms=order,
        colors={s: styles[s].color for s in settings}, xlabel=xlabel,
        subfigure_width=DOUBLE_WIDTH / len(metric_names), row_height=0.3, max_ticks=4)
    for text in list(fig.texts):  # rliable's x-label at a fixed y = -0.1 of the figure
        text.remove()
    for ax in np.atleast_1d(axes):
        _tidy_rliable_axes(ax)
        ax.title.set_size(8)
        for label in ax.get_yticklabels():
            label.set_fontsize(7)
    # room below the axes for the tick labels, then the x-label under them
    height = 0.3 * len(settings) + 0.75
    fig.set_size_inches(DOUBLE_WIDTH, height)
    fig.subplots_adjust(bottom=0.42 / height, top=1 - 0.25 / height, wspace=0.25)
    fig.supxlabel(xlabel, fontsize=8, y=0.02 / height, va="bottom")
    return fig


def performance_profiles(taus, profiles: Mapping[str, Estimate], styles: Mapping[str, Style],
                         xlabel: str) -> plt.Figure:
    """rliable's performance profiles (fraction of runs above tau) with 95% CI bands."""
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.3))
    plot_utils.plot_performance_profiles(
        {s: p[0] for s, p in profiles.items()}, taus,
        performance_profile_cis={s: (p[1], p[2]) for s, p in profiles.items()},
        colors={s: styles[s].color for s in profiles},
        linestyles={s: styles[s].linestyle for s in profiles}, ax=ax, xlabel=xlabel,
        ylabel=r"fraction of runs with score $> \tau$", labelsize=8, ticklabelsize=7,
        wrect=4, hrect=4)
    for line in ax.get_lines():  # rliable pops its linewidth kwarg once, inside its loop
        line.set_linewidth(plt.rcParams["lines.linewidth"])
    _tidy_rliable_axes(ax)
    _legend_below(fig, list(profiles), styles)
    return fig


def probability_of_improvement(poi: pd.DataFrame, styles: Mapping[str, Style]) -> plt.Figure:
    """rliable's P(X > Y) bars with 95% CIs, one row per pair, coloured by X."""
    poi = poi.iloc[::-1]  # rliable draws the first pair at the bottom
    keys = [f"{x}{PAIR_SEP}{y}" for x, y in zip(poi.x, poi.y)]
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH * 0.6, 0.3 * len(poi) + 0.6))
    plot_utils.plot_probability_of_improvement(
        dict(zip(keys, poi.value)),
        {k: np.array([lo, hi]) for k, lo, hi in zip(keys, poi.ci_low, poi.ci_high)},
        pair_separator=PAIR_SEP, ax=ax, colors=[styles[x].color for x in poi.x],
        xticks=[0.0, 0.25, 0.5, 0.75, 1.0], xlabel="P(X > Y)", left_ylabel="X",
        right_ylabel="Y", labelsize=8, ticklabelsize=7, ylabel_x_coordinate=0.08)
    for axis in fig.axes:
        _tidy_rliable_axes(axis)
        axis.set_xlim(0, 1)
    ax.axvline(0.5, color="0.3", linewidth=0.8, linestyle="--", zorder=0)
    return fig


def _heatmap(data: pd.DataFrame, **kw) -> None:
    """``sns.heatmap``, without the PendingDeprecationWarning seaborn triggers itself (its
    own ``cmap.set_bad`` call, seen with seaborn 0.13.2 and matplotlib 3.11.2): nothing a
    caller can change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The set_bad function",
                                category=PendingDeprecationWarning)
        sns.heatmap(data, **kw)


def poi_matrix(poi: pd.DataFrame, settings: list[str]) -> plt.Figure:
    """Pairwise P(row > column) as an annotated heatmap (CIs in aggregates.csv)."""
    m = pd.DataFrame(np.nan, index=settings, columns=settings)
    for x, y, v in zip(poi.x, poi.y, poi.value):
        m.loc[x, y] = v
    size = min(DOUBLE_WIDTH, max(COLUMN_WIDTH, 0.42 * len(settings) + 1.6))
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    _heatmap(m, ax=ax, vmin=0, vmax=1, center=0.5, cmap="vlag", annot=True, fmt=".2f",
                annot_kws={"size": 6.5 if len(settings) < 8 else 5},
                cbar_kws={"label": "P(row > column)", "shrink": 0.8}, square=True,
                linewidths=0.5, linecolor="white")
    ax.set_xlabel("Y")
    ax.set_ylabel("X")
    ax.tick_params(labelsize=7, length=0)
    plt.setp(ax.get_xticklabels(), rotation=40, ha="right")
    ax.grid(False)
    return fig


def sample_efficiency(grid, estimates: Mapping[str, Estimate], styles: Mapping[str, Style],
                      ylabel: str) -> plt.Figure:
    """rliable's sample-efficiency curve: IQM of normalized return vs frames, 95% CIs."""
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.2))
    settings = list(estimates)
    plot_utils.plot_sample_efficiency_curve(
        grid, {s: e[0] for s, e in estimates.items()},
        {s: np.vstack([e[1], e[2]]) for s, e in estimates.items()}, algorithms=settings,
        colors={s: styles[s].color for s in settings}, ax=ax, xlabel="environment frames",
        ylabel=ylabel, labelsize=8, ticklabelsize=7, marker="", linewidth=1.3,
        wrect=4, hrect=4)
    for line, s in zip(ax.get_lines(), settings):
        line.set_linestyle(styles[s].linestyle)
    _tidy_rliable_axes(ax)
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    _legend_below(fig, settings, styles)
    return fig


def kl_diagnostics(grid, ratio: Mapping[str, Estimate], beta: Mapping[str, Estimate],
                   styles: Mapping[str, Style], title: str) -> plt.Figure:
    """Measured KL / dtarg (top; median over seeds; the adaptive rule's band 1/1.5..1.5
    dotted) and beta (bottom, log scale; geometric mean over seeds, since beta moves by
    factors) over training, with 95% CI bands."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(COLUMN_WIDTH, 3.4), sharex=True)
    band_plot(top, grid, ratio, styles)
    for y, ls in ((1.0, "-"), (1.5, ":"), (1 / 1.5, ":")):
        top.axhline(y, color="0.3", linewidth=0.8, linestyle=ls, zorder=0)
    top.update_datalim([(grid[0], 1.5), (grid[0], 1 / 1.5)])
    _plain_log_axis(top)
    top.set_ylabel("KL / dtarg (median)")
    top.set_title(title)
    band_plot(bottom, grid, beta, styles)
    _plain_log_axis(bottom)
    bottom.set_ylabel(r"$\beta$ (geometric mean)")
    _frames_axis(bottom)
    settings = list(dict.fromkeys(list(ratio) + list(beta)))
    _legend_below(fig, settings, styles)
    return fig


def mc_kl(grid, analytic: Mapping[str, Estimate], monte_carlo: Mapping[str, Estimate],
          spread: Mapping[str, Estimate], styles: Mapping[str, Style], title: str) -> plt.Figure:
    """Top: the loss's Monte-Carlo KL estimate (dashed) next to the closed-form KL of the same
    batch (solid). Bottom: the standard deviation of the per-sample MC estimate minus the
    closed form (the estimator's noise)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(COLUMN_WIDTH, 3.4), sharex=True)
    for setting in monte_carlo:
        st = styles[setting]
        for est, ls in ((analytic.get(setting), "-"), (monte_carlo[setting], "--")):
            if est is None:
                continue
            top.plot(grid, est[0], color=st.color, linestyle=ls)
            top.fill_between(grid, est[1], est[2], color=st.color, alpha=0.15, linewidth=0)
    top.set_ylabel("KL(old || new)")
    top.set_title(title)
    handles = [plt.Line2D([], [], color="0.2", linestyle="-", label="closed form (kl_batch)"),
               plt.Line2D([], [], color="0.2", linestyle="--", label="MC estimate (kl_estimate)")]
    top.legend(handles=handles, loc="best")
    band_plot(bottom, grid, spread, styles)
    bottom.set_ylabel("MC estimate noise (std)")
    _frames_axis(bottom)
    _legend_below(fig, list(monte_carlo), styles)
    return fig


def sensitivity_lines(cells: pd.DataFrame, ylabel: str) -> plt.Figure:
    """Final score vs dtarg (log axis), one line per increment, 95% CI error bars."""
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.2))
    increments = sorted(cells.increment.unique())
    palette = sns.color_palette("colorblind", max(3, len(increments)))
    for k, inc in enumerate(increments):
        c = cells[cells.increment == inc].sort_values("dtarg")
        dodge = 1 + 0.04 * (k - (len(increments) - 1) / 2)  # keep error bars apart
        ax.errorbar(c.dtarg * dodge, c.value, yerr=[c.value - c.ci_low, c.ci_high - c.value],
                    color=palette[k], marker="o", markersize=3, capsize=2, linewidth=1.2,
                    label=f"increment {inc:g}")
    ax.set_xscale("log")
    ax.set_xticks(sorted(cells.dtarg.unique()))
    ax.set_xticklabels([f"{d:g}" for d in sorted(cells.dtarg.unique())])
    ax.minorticks_off()
    ax.set_xlabel("dtarg")
    ax.set_ylabel(ylabel)
    ax.legend(loc="best")
    return fig


def _mark_best_cells(ax, m: pd.DataFrame, cells: pd.DataFrame) -> None:
    """Outline the best cell (solid, when its CI is disjoint from every other) or every cell
    statistically tied for best (dashed: overlapping 95% CIs), as the tables mark them."""
    from matplotlib.patches import Rectangle

    from klppo_bench.report.tables import same_when_printed
    from klppo_bench.stats.aggregate import best_and_tied

    if not {"ci_low", "ci_high"} <= set(cells):
        return
    estimates = {(r.increment, r.dtarg): (r.value, r.ci_low, r.ci_high)
                 for r in cells.itertuples() if np.isfinite([r.ci_low, r.ci_high]).all()}
    if len(estimates) < 2:  # a cell without a CI (one run) is never marked
        return
    winner, tied = best_and_tied(estimates, "max", same_when_printed)
    rows, cols = list(m.index), list(m.columns)
    for inc, dtarg in [winner, *tied]:
        ax.add_patch(Rectangle((cols.index(dtarg), rows.index(inc)), 1, 1, fill=False,
                               edgecolor="black", linewidth=2.0,
                               linestyle="-" if not tied else "--"))


def sensitivity_heatmap(cells: pd.DataFrame, label: str) -> plt.Figure:
    """The dtarg x increment grid as a heatmap of the mean final score; the best cell is
    outlined solid, or every cell tied for best dashed (overlapping 95% CIs)."""
    m = cells.pivot(index="increment", columns="dtarg", values="value").sort_index(ascending=False)
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 0.45 * len(m) + 1.0))
    fmt = ".0f" if np.nanmax(np.abs(m.to_numpy())) >= 100 else ".2f"
    _heatmap(m, ax=ax, annot=True, fmt=fmt, cmap="viridis", annot_kws={"size": 7},
                cbar_kws={"label": label}, linewidths=0.5, linecolor="white")
    ax.set_xticklabels([f"{float(t.get_text()):g}" for t in ax.get_xticklabels()])
    ax.set_yticklabels([f"{float(t.get_text()):g}" for t in ax.get_yticklabels()], rotation=0)
    ax.set_xlabel("dtarg")
    ax.set_ylabel("increment")
    ax.grid(False)
    _mark_best_cells(ax, m, cells)
    return fig


def wall_clock(cost: pd.DataFrame, styles: Mapping[str, Style]) -> plt.Figure:
    """Wall-clock time per run (job time / lanes, a job as one measurement), mean over jobs
    with 95% bootstrap CIs where every task has two jobs or more (else no interval and the bar
    says so), one bar per (engine, setting),
    labelled ``setting [engine]`` and grouped by engine (a line between engines): per-run
    wall-clock is compared within one engine only."""
    minutes = cost.value.max() > 120
    scale, unit = (60.0, "minutes") if minutes else (1.0, "seconds")
    engines = cost.engine if "engine" in cost else pd.Series([None] * len(cost))
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 0.25 * len(cost) + 0.7))
    y = np.arange(len(cost))[::-1]
    ax.barh(y, cost.value / scale, color=[styles[s].color for s in cost.setting], height=0.6)
    has_ci = np.isfinite(cost.ci_low.to_numpy(float)) & np.isfinite(cost.ci_high.to_numpy(float))
    if has_ci.any():
        v = cost.value.to_numpy(float)[has_ci]
        ax.errorbar(v / scale, y[has_ci], fmt="none", ecolor="black", elinewidth=0.8, capsize=2,
                    xerr=[(v - cost.ci_low.to_numpy(float)[has_ci]) / scale,
                          (cost.ci_high.to_numpy(float)[has_ci] - v) / scale])
    for yy, v in zip(y[~has_ci], cost.value.to_numpy(float)[~has_ci]):
        # one job on some task: a single measurement, drawn without an interval and labelled
        ax.annotate("1 job, no CI", (v / scale, yy), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize="x-small", color="0.3")
    ax.set_yticks(y)
    ax.set_yticklabels([s if e is None else f"{s} [{e}]"
                        for s, e in zip(cost.setting, engines)])
    for k in range(1, len(cost)):
        if engines.iloc[k] != engines.iloc[k - 1]:  # between engine groups
            ax.axhline(y[k] + 0.5, color="0.3", linewidth=0.8)
    ax.set_xlabel(f"wall-clock per run ({unit})")
    ax.grid(True, axis="x")
    ax.grid(False, axis="y")
    return fig

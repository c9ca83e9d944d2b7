"""``report.md``: one page that states what was run and how it was measured, then shows the
tables and figures."""

from __future__ import annotations

import pandas as pd

import sys
from importlib import metadata

from klppo_bench.report.definitions import frames_line
from klppo_bench.report.tables import fmt
from klppo_bench.stats import aggregate as agg

PACKAGES = ("klppo-bench", "rliable", "arch", "numpy", "scipy", "pandas", "matplotlib",
            "seaborn", "gymnasium", "mujoco", "torch", "torchrl")

CAPTIONS = {
    "aggregate_intervals": "Aggregate min-max normalized final score: IQM, mean, median and "
                           "optimality gap (lower is better) with 95% stratified-bootstrap CIs.",
    "performance_profiles": "Performance profiles: fraction of runs whose normalized score "
                            "exceeds tau, 95% CI bands.",
    "poi_vs_baseline": "Probability of improvement P(X > Y) of each setting over the baseline, "
                       "95% CIs (0.5: no difference).",
    "poi_pairwise": "Pairwise probability of improvement P(row > column); CIs in "
                    "aggregates.csv (kind = poi_pairwise).",
    "sample_efficiency": "Sample efficiency: IQM of the min-max normalized training return "
                         "vs frames, 95% CIs.",
    "dtarg_increment_lines": "Sensitivity to dtarg for each increment: mean final score, 95% CIs.",
    "dtarg_increment_heatmap": "Sensitivity grid: mean final score per (dtarg, increment).",
    "wall_clock": ("Wall-clock time per run: job time / lanes, one measurement per job, mean "
                   "over jobs with 95% CIs where every task has at least two jobs (one job: no "
                   "interval, labelled), one bar per setting and engine, labelled "
                   "`setting [engine]`: compare bars within one engine only. Machine load "
                   "affects it."),
}


def versions() -> str:
    out = [f"python {sys.version.split()[0]}"]
    for name in PACKAGES:
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def _caption(name: str) -> str:
    for prefix, text in (("learning_curves_", "Training return (mean of episodes finished in "
                          "each iteration, smoothed) vs frames on {}: mean over seeds, 95% "
                          "bootstrap CI band (rliable, percentile)."),
                         ("kl_diagnostics_", "KL diagnostics on {}: closed-form KL of each "
                          "batch after the update divided by dtarg, median over seeds (dotted: "
                          "the adaptive rule's band 1/1.5 .. 1.5), and beta, geometric mean "
                          "over seeds; 95% bootstrap CI bands."),
                         ("mc_vs_analytic_kl_", "Analytic vs Monte-Carlo KL on {}: the loss's "
                          "MC estimate (dashed) beside the closed form of the same batch "
                          "(solid), and the spread of the per-sample MC estimate.")):
        if name.startswith(prefix):
            return text.format(name[len(prefix):])
    return CAPTIONS.get(name, name)


def _settings_table(rep) -> str:
    runs = rep.runs
    lines = ["| setting | variant | engine | varied parameters | seeds per env | not done |",
             "|:---|:---|:---|:---|:---|---:|"]
    for s in rep.settings:
        g = runs[runs.setting == s]
        stored = g.source != str(rep.exp_dir) if "source" in g else pd.Series(False, g.index)
        per_env = ", ".join(
            f"{e}: {len(x)}" + (f" ({int(stored[x.index].sum())} stored)"
                                if stored[x.index].any() else "")
            for e, x in g.groupby("env"))
        failed = int((rep.not_done.setting == s).sum()) if len(rep.not_done) else 0
        base = " (baseline)" if s == rep.baseline else ""
        lines.append(f"| `{s}`{base} | {g.variant.iloc[0]} | {rep.engines.get(s, '--')} | "
                     f"{rep.params.get(s) or '--'} | {per_env} | {failed} |")
    return "\n".join(lines) + "\n"


def _sources_table(rep) -> str:
    lines = ["| variant | source | package / version or path | code hash | runs |",
             "|:---|:---|:---|:---|---:|"]
    for r in rep.sources.itertuples():
        code = f"`{r.code}`" + (f" (ran with {', '.join(f'`{c}`' for c in sorted(r.ran_with))})"
                                if r.ran_with else "")
        lines.append(f"| {r.variant} | {r.kind} | {r.source} | {code} | {r.runs} |")
    lines += ["", "The code hash covers the variant's definition and the source of its loss and "
              "distribution classes up to the installed libraries (their versions instead); "
              "a run id includes it, so changed loss code gives new runs."]
    return "\n".join(lines) + "\n"


def _other_definitions(rep) -> str:
    if not rep.left_out:
        return "None: every run on disk is part of the current definition (`manifest.json`).\n"
    lines = ["Left out of every table and figure (they stay on disk; `klppo-bench report "
             "--all-definitions` reports them beside the current definition):", ""]
    lines += [f"- {g.line()}" for g in rep.left_out]
    return "\n".join(lines) + "\n"


def _normalization_table(rep) -> str:
    opts = rep.options
    lines = ["| env | random policy | best setting (= 1) | best mean score | reference (= 1) "
             "| reference source |", "|:---|---:|:---|---:|---:|:---|"]
    for r in rep.constants.itertuples():
        rnd = rep.random[r.env]
        ref = "--" if r.reference_score != r.reference_score else \
            f"{fmt(r.reference_score)} ({r.reference_env})"
        lines.append(f"| {r.env} | {fmt(rnd['mean'])} +/- {fmt(rnd['std'])} | "
                     f"{best_setting_text(r.best_setting, rep.best_tied.get(r.env, []))} "
                     f"| {fmt(r.best_score)} | {ref} | {r.reference_source or '--'} |")
    lines.append("")
    lines.append(f"Random policy: uniform actions, {opts.random_episodes} episodes, seed "
                 f"{opts.random_seed} (mean +/- std of returns), measured with gymnasium and "
                 f"cached.")
    return "\n".join(lines) + "\n"


def best_setting_text(best: str, tied: list[str]) -> str:
    """``clip``, or ``clip (tied with dual-clip: overlapping 95% CIs)``."""
    if not tied:
        return f"`{best}`"
    return f"`{best}` (tied with {', '.join(f'`{t}`' for t in tied)}: overlapping 95% CIs)"


def engines_sentence(rep) -> str:
    """One sentence naming which settings ran on which engine (empty: one engine)."""
    if not rep.mixed_engines:
        return ""
    by_engine: dict[str, list[str]] = {}
    for s in rep.settings:
        by_engine.setdefault(rep.engines[s], []).append(f"`{s}`")
    parts = "; ".join(f"{e}: {', '.join(ss)}" for e, ss in sorted(by_engine.items()))
    return (f"**Engines differ.** This report mixes training engines ({parts}); per-run "
            f"wall-clock is not comparable across engines, so the wall-clock table and figure "
            f"compare settings within one engine only.")


def _unreadable(rep) -> str:
    if not rep.unreadable:
        return "None: every run record could be read.\n"
    lines = [f"{len(rep.unreadable)} run(s) left out of every table and figure (file: error):",
             ""]
    lines += [f"- `{u.path}`: {u.error}" for u in rep.unreadable]
    return "\n".join(lines) + "\n"


def _not_done(rep) -> str:
    from klppo_bench.store import RunDir, progress_text

    if not len(rep.not_done):
        return "None: every run of the experiment is done.\n"
    lines = ["| run_id | state | setting | env | seed | progress or error |",
             "|:---|:---|:---|:---|---:|:---|"]
    for r in rep.not_done.itertuples():
        error = (r.error or "").splitlines()[0][:120] if r.error else ""
        if r.state == "running":
            error = progress_text(RunDir(rep.exp_dir / "runs" / r.run_id).status()) or error
        lines.append(f"| {r.run_id} | {r.state} | `{r.setting}` | {r.env} | {r.seed} | {error} |")
    return "\n".join(lines) + "\n"


def _stored_left_out(rep) -> str:
    """Every stored run ``--compare-to`` left out, grouped by why."""
    if not rep.pooled.left_out:
        return "None: every stored run of a matching definition joined.\n"
    by_why: dict[str, list] = {}
    for run_id, env, setting, why in rep.pooled.left_out:
        by_why.setdefault(why, []).append(f"{run_id} (`{setting}`, {env})")
    lines = [f"{len(rep.pooled.left_out)} run(s) of `{rep.pooled.source}`:", ""]
    for why, runs in by_why.items():
        lines.append(f"- {why}: {len(runs)} run(s): " + ", ".join(runs))
    return "\n".join(lines) + "\n"


def _stored_versions(rep) -> str:
    rows = ["| commit | versions | runs |", "|:---|:---|---:|"]
    rows += [f"| {v.commit} | {v.versions} | {v.runs} |"
             for v in rep.pooled.versions().itertuples()]
    return "\n".join(rows) + "\n"


def render(rep) -> str:
    opts = rep.options
    frames = sorted(rep.runs.frames.dropna().unique())
    out = [f"# Report: {rep.exp_dir.name}", ""]
    frames = ", ".join(f"{int(f):,}" for f in frames)
    out.append(f"Experiment `{rep.exp_dir}`: {len(rep.runs)} finished runs, "
               f"{len(rep.settings)} settings x {len(rep.envs)} environment(s) "
               f"({', '.join(rep.envs)}), {frames} frames per run.")
    out.append("")
    if rep.mixed_engines:
        out += [engines_sentence(rep), ""]
    out.append(
        "**Score.** A run's final score is the mean return of its last 100 training episodes "
        "(the PPO paper's rule; `final_score` in scores.csv, with the final deterministic "
        "evaluation as `final_eval_return`). *minmax* normalization per environment: random "
        "policy = 0, best setting's mean final score in this experiment = 1 (PPO paper, "
        "Table 1). *reference*: random = 0, published score = 1.")
    out.append("")
    out.append(
        f"**Statistics.** rliable {metadata.version('rliable')}: stratified bootstrap over runs "
        f"within each environment, percentile {int(agg.CI_SIZE * 100)}% CIs, "
        f"**{opts.reps} repetitions, random state {opts.random_state}** (numpy's global "
        f"generator is seeded with it for every estimate, because rliable 1.2.0 draws its "
        f"resamples from it). Settings with unequal seeds per environment keep every run "
        f"(independent per-task resampling, tasks weighted equally). Probability of "
        f"improvement baseline: `{rep.baseline or 'none'}`.")
    out.append("")
    if rep.notes:
        out.append("**Notes.**")
        out.append("")
        out += [f"- {n}" for n in rep.notes]
        out.append("")
    out += ["## Settings", "", _settings_table(rep)]
    if frames_line(rep.runs):
        out += [frames_line(rep.runs), ""]
    out += ["## Variant sources", "", _sources_table(rep), "## Normalization constants", "",
            _normalization_table(rep), "## Runs not done", "", _not_done(rep),
            "## Runs not readable", "", _unreadable(rep)]
    if rep.definition == "manifest":
        out += ["## Runs of other definitions", "", _other_definitions(rep)]
    if rep.pooled is not None:
        out += [f"## Stored runs pooled from `{rep.pooled.source}`", "",
                f"{len(rep.pooled.runs)} stored run(s) joined, by code version:", "",
                _stored_versions(rep), "## Stored runs left out", "", _stored_left_out(rep)]
    out += ["## Aggregate (min-max normalized)", "", rep.tables["aggregate"]]
    if "table1" in rep.tables:
        out += ["## Average normalized score per setting (Table 1 style)", "", rep.tables["table1"]]
    out += ["## Final score per environment", "", rep.tables["env_setting"]]
    if "dtarg_increment" in rep.tables:
        out += ["## dtarg x increment grid", "", rep.tables["dtarg_increment"]]
    if "aggregate_reference" in rep.tables:
        out += ["## Aggregate (reference normalized)", "", rep.tables["aggregate_reference"]]
    if "wall_clock" in rep.tables:
        out += ["## Wall-clock per run (within each engine)", "", rep.tables["wall_clock"]]
    out += ["## Figures", ""]
    for name, path in rep.figures.items():
        out += [f"![{name}]({path})", "", f"*{_caption(name)}* (`{path[:-4]}.pdf`)", ""]
    out += ["## Files", "",
            "`scores.csv` (one row per finished run), `aggregates.csv` (every estimate with "
            "its CI, reps and random state), `tables/` (.md, .tex, .csv), `figures/` (.pdf "
            f"with TrueType fonts, {rep.options.png_dpi}-dpi .png).", "",
            f"Versions: {versions()}.", ""]
    return "\n".join(out)

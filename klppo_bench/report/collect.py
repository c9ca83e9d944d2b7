"""Read the results store into a :class:`Report`: runs done and not done, runs that cannot be
read, each run's metrics, the random-policy scores, normalized scores and notes.

Nothing is dropped silently: runs that are not done, runs whose record cannot be read (a
damaged ``metrics.parquet``, a ``status.json`` that is not JSON, a table missing columns),
runs without a final score and unequal seed counts are written into ``notes`` (and the
unreadable ones into ``Report.unreadable``), which report.md shows first. Where the experiment
has a manifest, only its current definition's runs are read; the other runs on disk are listed
with what differs (``Report.left_out``; :mod:`klppo_bench.report.definitions`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from klppo_bench.errors import ConfigError
from klppo_bench.report.definitions import select_definition, variant_sources
from klppo_bench.report.tables import fmt
from klppo_bench.stats.random_policy import random_scores
from klppo_bench.stats.scores import (as_float, parse_params, read_runs, score_table,
                                      varied_params)
from klppo_bench.store import Unreadable, load_tables

METRICS_REQUIRED = ("frames", "episode_return")
"""Columns every run's ``metrics.parquet`` must have to be reported (its learning curve)."""


_NUMBER = re.compile(r"(\d+(?:\.\d*)?(?:e[-+]?\d+)?)")


def natural_key(label: str) -> tuple:
    """Sort key that orders the numbers inside setting labels by value:
    ``klpen-fixed(beta=0.3)`` < ``(beta=1)`` < ``(beta=3)`` < ``(beta=10)``."""
    return tuple((0, float(part), "") if k % 2 else (1, 0.0, part)
                 for k, part in enumerate(_NUMBER.split(label)))


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
    compare_to: Path | None = None
    """A stored experiment directory (``results/reference/ppo_table1``) whose runs of the same
    definition are pooled with this experiment's (:mod:`klppo_bench.report.compare`)."""
    png_dpi: int = 300
    """Resolution of the PNG copy of every figure (the PDF is vector either way); the shipped
    reports under results/reference use 150 to stay within their size budget."""
    all_definitions: bool = False
    """Report the runs of every definition on disk, each other definition's settings labelled
    with what differs (``clip [frames=1024]``); default: the current definition only."""


@dataclass
class Report:
    """What was read, computed and written; :mod:`klppo_bench.report.document` renders it."""
    exp_dir: Path
    out: Path
    options: ReportOptions
    runs: pd.DataFrame = None                       # done runs with a final score
    not_done: pd.DataFrame = None                   # pending / running / failed runs
    unreadable: list[Unreadable] = field(default_factory=list)  # skipped: record not readable
    metrics: pd.DataFrame = None                    # long metrics of ``runs``
    scores: pd.DataFrame = None                     # scores.csv
    constants: pd.DataFrame = None                  # per env: random, best, reference
    random: dict = field(default_factory=dict)      # env -> random-policy record
    settings: list = field(default_factory=list)    # baseline first
    envs: list = field(default_factory=list)
    aggregate_envs: list = field(default_factory=list)  # envs every setting ran on
    baseline: str | None = None
    params: dict = field(default_factory=dict)      # setting -> varied parameters
    engines: dict = field(default_factory=dict)     # setting -> "batched", "batched+reference"
    notes: list = field(default_factory=list)
    definition: str = "no manifest"                 # manifest | all-definitions | no manifest
    left_out: list = field(default_factory=list)    # LeftOut groups: runs of other definitions
    pooled: object = None                           # compare.Pooled of --compare-to, if any
    sources: pd.DataFrame = None                    # variant, kind, source, code, runs
    score_sets: dict = field(default_factory=dict)  # normalization -> setting -> env -> scores
    aggregates: pd.DataFrame = None                 # every estimate (aggregates.csv)
    poi_baseline: pd.DataFrame = None
    poi_pairwise: pd.DataFrame = None
    best_tied: dict = field(default_factory=dict)   # env -> settings tied with the best
    cost: pd.DataFrame = None                       # wall-clock per setting and engine
    sensitivity: pd.DataFrame = None                # dtarg x increment cells, if any
    tables: dict = field(default_factory=dict)      # name -> markdown
    figures: dict = field(default_factory=dict)     # name -> png path relative to out

    @property
    def mixed_engines(self) -> bool:
        """Whether the reported runs ran on more than one engine."""
        return self.runs is not None and self.runs.engine.nunique() > 1


def _at_defaults(variant: str, runs: pd.DataFrame, candidates: list[str]) -> list[str]:
    """The settings of ``variant`` whose loss parameters all equal the variant's registered
    defaults (``clip`` -> ``clip(clip_epsilon=0.2)``); empty when the variant is not loaded."""
    from klppo_bench.variants import all_variants

    registered = all_variants().get(variant)
    if registered is None:
        return []
    defaults = registered.resolve({})
    out = []
    for setting in candidates:
        params = parse_params(runs.loc[runs.setting == setting, "params"].iloc[0])
        if all(str(defaults[k]) == v or as_float(defaults[k]) == as_float(v)
               for k, v in params.items() if k in defaults):
            out.append(setting)
    return out


def _resolve_baseline(requested: str, runs: pd.DataFrame, settings: list[str], notes: list):
    """The setting named ``requested``; for a variant name with several settings, the one at
    the variant's defaults (``clip`` means ``clip_epsilon=0.2``, whatever the sort order)."""
    if requested in settings:
        return requested
    candidates = sorted(runs.loc[runs.variant == requested, "setting"].unique())
    if len(candidates) > 1:
        default = _at_defaults(requested, runs, candidates)
        if len(default) == 1:
            notes.append(f"Baseline `{requested}`: `{default[0]}`, the setting at its defaults "
                         f"(of {', '.join(candidates)}).")
            return default[0]
        notes.append(f"Baseline `{requested}` has several settings ({', '.join(candidates)}) "
                     f"and {'none' if not default else 'more than one'} at its defaults; "
                     f"using `{candidates[0]}` (choose one with `--baseline`).")
    if candidates:
        return candidates[0]
    notes.append(f"Baseline `{requested}` is not a setting of this experiment (settings: "
                 f"{', '.join(settings)}); probability of improvement vs a baseline is skipped "
                 f"(choose one with `--baseline`).")
    return None


FEW_RUNS = 5
"""Fewer runs than this in a setting x environment cell (but more than one) get a note that
its percentile bootstrap CI understates the uncertainty."""


def _aggregate_envs(rep: Report) -> None:
    """The environments an aggregate over environments uses: those every setting ran on, so
    that every setting's aggregate covers the same tasks (a sweep still under way has tasks
    with only some settings done). Without such an environment, all of them (noted)."""
    ran = {e: set(g.setting) for e, g in rep.runs.groupby("env")}
    common = [e for e in rep.envs if ran[e] >= set(rep.settings)]
    rep.aggregate_envs = common or list(rep.envs)
    if not common:
        rep.notes.append("No environment has runs of every setting: aggregates over "
                         "environments compare settings over different sets of tasks.")
        return
    partial = [e for e in rep.envs if e not in common]
    if partial:
        rep.notes.append(
            f"Aggregates over environments (aggregate tables, the average of Table 1, "
            f"probability of improvement, performance profiles, sample-efficiency curves, "
            f"dtarg x increment grid) use the {len(common)} environment(s) every setting ran "
            f"on ({', '.join(common)}). Left out of them: " + "; ".join(
                f"{e} (no run of {', '.join(s for s in rep.settings if s not in ran[e])})"
                for e in partial) + ". Per-environment tables and figures show every "
            "environment.")


def _count_notes(rep: Report) -> None:
    runs = rep.runs[rep.runs.env.isin(rep.aggregate_envs)]
    for s in rep.settings:
        counts = runs[runs.setting == s].groupby("env").size()
        absent = sorted(set(rep.aggregate_envs) - set(counts.index))
        if counts.nunique() > 1 or absent:
            rep.notes.append(
                f"Unequal seeds: `{s}` has " + ", ".join(f"{e}: {n}" for e, n in counts.items())
                + (f" and no run on {', '.join(absent)}" if absent else "")
                + ". Its aggregates use every run (per-task stratified bootstrap, tasks "
                  "weighted equally); nothing is truncated.")
    cell = rep.runs.groupby(["setting", "env"]).size()
    few = cell[(cell > 1) & (cell < FEW_RUNS)]
    if len(few):
        n = f"{few.min()}" if few.min() == few.max() else f"{few.min()}-{few.max()}"
        rep.notes.append(
            f"Few runs: {len(few)} of {len(cell)} setting x environment cells have {n} runs "
            f"(fewer than {FEW_RUNS}). A percentile bootstrap "
            "interval never reaches beyond the lowest and highest of the runs it resamples, so "
            "a per-environment CI over so few runs is narrower than the real uncertainty: read "
            "overlapping CIs as ties, and a disjoint one on a single environment as a hint to "
            "run more seeds, not as a result.")
    per_setting = runs.groupby("setting").size()
    if per_setting.nunique() > 1:
        rep.notes.append("Settings have different numbers of runs: " + ", ".join(
            f"{s}: {per_setting[s]}" for s in rep.settings) + ".")


def engines_of(runs: pd.DataFrame, settings: list[str]) -> dict[str, str]:
    """``{setting: "batched"}``, or ``"batched+reference"`` where its runs used several."""
    return {s: "+".join(sorted(runs.loc[runs.setting == s, "engine"].unique()))
            for s in settings}


def _read_store(rep: Report) -> None:
    """Runs (done, not done, unreadable) and the metrics of the done ones."""
    records, rep.left_out, rep.definition = select_definition(
        rep.exp_dir, read_runs(rep.exp_dir), rep.options.all_definitions)
    runs, rep.not_done, rep.unreadable = records.done, records.not_done, records.unreadable
    if rep.left_out:
        n = sum(len(g.run_ids) for g in rep.left_out)
        rep.notes.append(f"{n} run(s) on disk are not part of this experiment's current "
                         f"definition (`manifest.json`, written by its last sweep) and are left "
                         f"out -- listed under *Runs of other definitions*; `--all-definitions` "
                         f"reports them beside it.")
    elif rep.definition == "all-definitions":
        rep.notes.append("Every definition on disk is reported (`--all-definitions`): a setting "
                         "label suffixed `[key=value]` holds the runs of another definition than "
                         "the current one, with its values of the keys that differ.")
    runs = runs.assign(source=str(rep.exp_dir))
    if rep.options.compare_to is not None:
        from klppo_bench.report.compare import pool, pooled_notes

        rep.pooled = pool(rep.options.compare_to, runs)
        rep.notes += pooled_notes(rep.pooled)
        runs = pd.concat([runs, rep.pooled.runs], ignore_index=True)
    rep.metrics, bad = load_tables(runs, "metrics", METRICS_REQUIRED)
    rep.unreadable += bad
    readable = ~runs.run_id.isin({u.run_id for u in bad})
    if len(rep.unreadable):
        rep.notes.append(f"{len(rep.unreadable)} run(s) could not be read and are left out of "
                         f"every table and figure -- listed under *Runs not readable*.")
    no_score = runs[readable & ~np.isfinite(runs.final_score)]
    rep.runs = runs[readable & np.isfinite(runs.final_score)].reset_index(drop=True)
    rep.metrics = rep.metrics[rep.metrics.run_id.isin(rep.runs.run_id)].reset_index(drop=True)
    if len(no_score):
        rep.notes.append(f"{len(no_score)} finished run(s) have no final score (no training "
                         f"episode ended) and are left out of the statistics: "
                         + ", ".join(no_score.run_id))


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
    _read_store(rep)
    if rep.runs.empty:
        first = f"; first: {rep.unreadable[0].path}: {rep.unreadable[0].error}" \
            if rep.unreadable else ""
        other = sum(len(g.run_ids) for g in rep.left_out)
        other = f", {other} of other definitions (--all-definitions reports them)" \
            if other else ""
        raise ConfigError(f"report: {exp_dir}: no finished run with a final score "
                          f"({len(rep.not_done)} not done, {len(rep.unreadable)} not "
                          f"readable{other}{first}); allowed: an experiment with at least one "
                          f"readable done run")
    if len(rep.not_done):
        counts = rep.not_done.state.value_counts()
        rep.notes.append("Runs not in the statistics (not done): "
                         + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
                         + " -- listed under *Runs not done*.")
    rep.envs = sorted(rep.runs.env.unique())
    settings = sorted(rep.runs.setting.unique(), key=natural_key)
    rep.baseline = _resolve_baseline(opts.baseline, rep.runs, settings, rep.notes)
    rep.settings = [s for s in settings if s == rep.baseline] + \
                   [s for s in settings if s != rep.baseline]
    rep.params = varied_params(rep.runs)
    rep.engines = engines_of(rep.runs, rep.settings)
    rep.sources = variant_sources(exp_dir, rep.runs)
    _aggregate_envs(rep)
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

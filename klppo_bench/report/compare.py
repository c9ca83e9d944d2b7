"""Pool stored runs into a report: ``klppo-bench report EXP --compare-to results/reference/<exp>``.

A researcher trains only their own objective and compares it with the shipped baselines. A
stored run joins the report when its *definition* matches this experiment's:

* its env id (name and version) is one of this experiment's envs;
* its harness definition equals this experiment's on that env: ``frames``, every ``train.*``,
  ``model.*`` and ``eval.*`` key (what the run was trained and scored with);
* where this experiment has a setting with the same definition (variant and every ``loss.*``
  value), the stored runs pool with it as further seeds, under this experiment's label (a
  spec's label depends on what it sweeps: ``clip`` here may be ``clip(clip_epsilon=0.2)``
  there); a stored setting with this experiment's label but another definition is left out;
* a stored setting this experiment does not have joins under its own label.

Not part of the comparison: the device, the variant's code hash and the code version. Stored
runs of another code version are allowed and named (commit, package versions). A stored run
whose seed this experiment already ran for the same setting is left out (it would count one
seed twice). Every stored run left out is listed with why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from klppo_bench.errors import ConfigError
from klppo_bench.manifest import definition, differences, fmt_value
from klppo_bench.report.definitions import select_definition
from klppo_bench.stats.scores import read_runs
from klppo_bench.store import RunDir

HARNESS_PREFIXES = ("train.", "model.", "eval.")
NOT_COMPARED = ("device", "code")
"""Definition keys a comparison ignores: where a run trained and its variant's code hash."""


def harness_definition(config: dict) -> dict:
    """``frames`` and every ``train.*``, ``model.*``, ``eval.*`` value of a run config."""
    return {k: v for k, v in definition(config).items()
            if k == "frames" or k.startswith(HARNESS_PREFIXES)}


def setting_definition(config: dict) -> dict:
    """The run's definition without :data:`NOT_COMPARED` (variant, loss and harness keys)."""
    return {k: v for k, v in definition(config).items() if k not in NOT_COMPARED}


def _key(d: dict) -> str:
    return json.dumps(d, sort_keys=True, default=str)


@dataclass
class Pooled:
    """What :func:`pool` took from a stored experiment and what it left out."""
    source: Path
    runs: pd.DataFrame
    """Stored done runs that join the report (``setting`` relabelled where it matches one of
    this experiment's), with ``source`` = the stored experiment's path."""
    left_out: list[tuple[str, str, str, str]] = field(default_factory=list)
    """``(run_id, env, setting, why)`` of every stored run left out."""
    relabelled: dict[str, str] = field(default_factory=dict)
    """``{stored label: this experiment's label}`` where the definitions match."""

    def versions(self) -> pd.DataFrame:
        """Runs per code version of the pooled runs: commit, versions, runs."""
        if self.runs.empty:
            return pd.DataFrame(columns=["commit", "versions", "runs"])
        return (self.runs.groupby(["commit", "versions"]).size().rename("runs")
                .reset_index())


def _configs(runs: pd.DataFrame) -> dict[str, dict]:
    out = {}
    for r in runs.itertuples():
        try:
            out[r.run_id] = RunDir(r.path).config()
        except Exception:  # noqa: BLE001 -- read once already by read_runs
            out[r.run_id] = None
    return out


def _ours(runs: pd.DataFrame, configs: dict[str, dict]):
    """This experiment's harness definitions per env, setting definitions per env, and the
    (env, setting, seed) triples it ran."""
    harness: dict[str, dict[str, dict]] = {}
    settings: dict[tuple[str, str], str] = {}
    by_label: dict[tuple[str, str], dict] = {}
    for r in runs.itertuples():
        cfg = configs.get(r.run_id)
        if cfg is None:
            continue
        h = harness_definition(cfg)
        harness.setdefault(r.env, {})[_key(h)] = h
        d = setting_definition(cfg)
        settings.setdefault((r.env, _key(d)), r.setting)
        by_label.setdefault((r.env, r.setting), d)
    seeds = {(r.env, r.setting, int(r.seed)) for r in runs.itertuples()}
    return harness, settings, by_label, seeds


def _diff_text(this: dict, ours: dict) -> str:
    return ", ".join(f"{k} {fmt_value(k, a)} (this experiment: {fmt_value(k, b)})"
                     for k, a, b in differences(this, ours))


def _why_left_out(r, cfg, ours, run_ids) -> tuple[str | None, str]:
    """``(None, label)`` for a stored run that joins (under ``label``), else ``(why, label)``."""
    harness, settings, by_label, seeds = ours
    if r.run_id in run_ids:
        return "the same run is in this experiment", r.setting
    if cfg is None:
        return "config not readable", r.setting
    if r.env not in harness:
        return f"env {r.env} is not in this experiment ({', '.join(sorted(harness))})", r.setting
    h = harness_definition(cfg)
    if _key(h) not in harness[r.env]:
        ours_h = next(iter(harness[r.env].values()))
        return f"harness differs: {_diff_text(h, ours_h)}", r.setting
    d = setting_definition(cfg)
    label = settings.get((r.env, _key(d)))
    if label is None:
        if (r.env, r.setting) in by_label:
            return (f"setting `{r.setting}` is defined differently here: "
                    f"{_diff_text(d, by_label[(r.env, r.setting)])}"), r.setting
        label = r.setting
    if (r.env, label, int(r.seed)) in seeds:
        return f"seed {r.seed} of `{label}` on {r.env} is already in this experiment", label
    return None, label


def pool(source: Path | str, runs: pd.DataFrame) -> Pooled:
    """The stored runs of experiment directory ``source`` that join ``runs`` (this
    experiment's done runs, as :func:`klppo_bench.stats.scores.read_runs` gives them).

    Raises:
        ConfigError: ``source`` is not an experiment directory, or has no done run.
    """
    source = Path(source)
    if not (source / "runs").is_dir():
        raise ConfigError(f"report --compare-to: {source}: no runs directory "
                          f"({source}/runs/<run_id>/); allowed: an experiment directory, e.g. "
                          f"results/reference/ppo_table1")
    records, _, _ = select_definition(source, read_runs(source), False)
    stored = records.done
    if stored.empty:
        raise ConfigError(f"report --compare-to: {source}: no finished run to compare to")
    ours = _ours(runs, _configs(runs))
    stored_configs = _configs(stored)
    run_ids = set(runs.run_id)
    keep, labels, left_out, relabelled = [], [], [], {}
    for r in stored.itertuples():
        why, label = _why_left_out(r, stored_configs.get(r.run_id), ours, run_ids)
        if why is None:
            keep.append(r.Index)
            labels.append(label)
            if label != r.setting:
                relabelled[r.setting] = label
        else:
            left_out.append((r.run_id, r.env, r.setting, why))
    joined = stored.loc[keep].assign(setting=labels, source=str(source)).reset_index(drop=True)
    return Pooled(source, joined, left_out, relabelled)


def pooled_notes(pooled: Pooled) -> list[str]:
    """The report's notes on a comparison: what joined, from which code versions, and how
    many stored runs were left out (report.md lists each)."""
    notes = []
    if len(pooled.runs):
        versions = "; ".join(f"commit {v.commit} ({v.versions}): {v.runs} runs"
                             for v in pooled.versions().itertuples())
        notes.append(f"{len(pooled.runs)} stored run(s) from `{pooled.source}` are pooled "
                     f"with this experiment's (code versions: {versions}).")
    for stored, ours in sorted(pooled.relabelled.items()):
        notes.append(f"Stored `{stored}` has the definition of this experiment's `{ours}` and "
                     f"is pooled with it.")
    if pooled.left_out:
        notes.append(f"{len(pooled.left_out)} stored run(s) of `{pooled.source}` are left out "
                     f"(definition differs) -- listed under *Stored runs left out*.")
    return notes

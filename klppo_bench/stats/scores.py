"""Scores, defined once: what a run's score is and how it is normalized.

* **Final score** of a run: ``summary.json['final_score']``, the mean return of its last 100
  training episodes (the PPO paper's rule). Also kept: ``final_eval_return``, the mean return
  of the final deterministic evaluation.
* **minmax** normalization, per environment: the random policy scores 0 and the best setting
  of the experiment (highest mean final score on that env) scores 1, as the PPO paper's
  Table 1. The best setting is found within the experiment, so adding a setting can move it.
* **reference** normalization, per environment: random = 0 and a published reference score
  (``reference_scores.csv``, one source per row) = 1. NaN where no reference is shipped.

The algorithm unit is the ``setting`` (variant + varied parameters); tasks are environments.
Everything here reads the results store only (:mod:`klppo_bench.store`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from klppo_bench.store import RunDir, Unreadable, error_line, scan_runs

RUN_COLUMNS = ["experiment", "env", "variant", "setting", "params", "seed", "run_id",
               "final_score", "final_score_episodes", "final_eval_return", "frames",
               "frames_requested", "wall_seconds", "sps", "engine", "job", "job_lanes", "commit",
               "versions", "path"]
VERSION_KEYS = ("klppo-bench", "torchrl", "torch", "gymnasium", "mujoco")
"""Package versions named where stored runs of another code version are pooled."""
UNRECORDED = "unrecorded"
"""``engine`` of a run whose status has no ``provenance.engine`` (written before it existed)."""


def parse_params(params: str) -> dict[str, str]:
    """``"beta=1.0,dtarg=0.01"`` (``run_index``'s flat form) -> ``{"beta": "1.0", ...}``."""
    out = {}
    for item in filter(None, (params or "").split(",")):
        key, _, value = item.partition("=")
        out[key] = value
    return out


def as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def env_family(env_id: str) -> str:
    """``Hopper-v5`` -> ``Hopper``; ``ALE/Pong-v5`` -> ``Pong``."""
    return re.sub(r"-v\d+$", "", env_id.split("/")[-1])


@dataclass
class RunRecords:
    """What :func:`read_runs` found in an experiment directory."""
    done: pd.DataFrame
    """One row per finished run with :data:`RUN_COLUMNS` (the store's summary)."""
    not_done: pd.DataFrame
    """``run_index`` rows (no ``path``) of every pending, running or failed run, with its
    error text: reported, never dropped silently."""
    unreadable: list[Unreadable] = field(default_factory=list)
    """Runs whose status, config or (done runs) summary could not be read."""


def _read_summary(path: Path) -> dict:
    summary = json.loads(path.read_text())
    if not isinstance(summary, dict):
        raise ValueError(f"a {type(summary).__name__}, not a JSON object")
    return summary


def _provenance_columns(status: dict, run_id: str) -> dict:
    """``job`` (the first run id of the job that trained the run: runs of one batched job share
    it), ``job_lanes`` (runs trained together in the run's job; 1 for a one-run job), ``commit``
    (short git commit) and ``versions`` (``"klppo-bench 0.1.0, torchrl 0.14.1, ..."``)."""
    prov = status.get("provenance") or {}
    if not isinstance(prov, dict):
        prov = {}
    lanes = prov.get("batch_runs")
    versions = prov.get("versions") if isinstance(prov.get("versions"), dict) else {}
    commit = (prov.get("git") or {}).get("commit") if isinstance(prov.get("git"), dict) else None
    job = min(map(str, lanes)) if isinstance(lanes, list) and lanes else run_id
    return {"job": job, "job_lanes": len(lanes) if isinstance(lanes, list) and lanes else 1,
            "commit": str(commit)[:12] if commit else UNRECORDED,
            "versions": ", ".join(f"{k} {versions[k]}" for k in VERSION_KEYS if k in versions)
            or UNRECORDED}


def read_runs(exp_dir: Path | str) -> RunRecords:
    """Done runs, runs not done and unreadable runs of an experiment directory."""
    exp_dir = Path(exp_dir)
    index, unreadable = scan_runs(exp_dir)
    done_index = index[index.state == "done"]
    rows = []
    for row in done_index.itertuples():
        path = Path(row.path) / "summary.json"
        try:
            summary = _read_summary(path)
        except Exception as err:  # reported by the caller; the other runs still count
            unreadable.append(Unreadable(row.run_id, str(path), error_line(err)))
            continue
        status = RunDir(row.path).status() or {}
        rows.append({
            "experiment": exp_dir.name,
            "env": row.env, "variant": row.variant, "setting": row.setting,
            "params": row.params, "seed": int(row.seed), "run_id": row.run_id,
            "final_score": as_float(summary.get("final_score")),
            "final_score_episodes": summary.get("final_score_episodes"),
            "final_eval_return": as_float(summary.get("final_eval_return")),
            "frames": summary.get("frames"),
            "frames_requested": summary.get("frames_requested", summary.get("frames")),
            "wall_seconds": as_float(status.get("seconds", summary.get("wall_seconds"))),
            "sps": as_float(summary.get("sps")),
            "engine": row.engine or UNRECORDED,
            **_provenance_columns(status, row.run_id),
            "path": str(row.path),
        })
    done = pd.DataFrame(rows, columns=RUN_COLUMNS).astype(
        {c: float for c in ("final_score", "final_eval_return", "wall_seconds", "sps")})
    done = done.sort_values(["setting", "env", "seed"], kind="stable").reset_index(drop=True)
    not_done = index[index.state != "done"].drop(columns=["path"]).reset_index(drop=True)
    return RunRecords(done, not_done, unreadable)


def collect_runs(exp_dir: Path | str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(done, not_done)`` of :func:`read_runs` (which also lists the unreadable runs)."""
    records = read_runs(exp_dir)
    return records.done, records.not_done


def load_reference_scores(path: Path | str | None = None) -> pd.DataFrame:
    """The shipped table of published reference scores (env family, score, source)."""
    if path is None:
        with resources.files("klppo_bench.stats").joinpath("reference_scores.csv").open() as f:
            return pd.read_csv(f)
    return pd.read_csv(path)


def minmax_constants(runs: pd.DataFrame, random: dict[str, float]) -> pd.DataFrame:
    """Per env: random score, best setting and its mean final score (the 0 and 1 of minmax)."""
    means = runs.groupby(["env", "setting"])["final_score"].mean().reset_index()
    rows = []
    for env, group in means.groupby("env"):
        best = group.loc[group["final_score"].idxmax()]
        rows.append({"env": env, "random_score": float(random[env]),
                     "best_setting": best["setting"], "best_score": float(best["final_score"])})
    return pd.DataFrame(rows, columns=["env", "random_score", "best_setting", "best_score"])


def normalize(values, low, high):
    """``(values - low) / (high - low)``; NaN where ``high == low`` (nothing to scale by)."""
    values, low, high = np.asarray(values, float), np.asarray(low, float), np.asarray(high, float)
    span = high - low
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(span != 0, (values - low) / np.where(span != 0, span, 1.0), np.nan)


def score_table(runs: pd.DataFrame, random: dict[str, float],
                references: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(scores, constants)``: the runs with their normalized scores, and per-env constants.

    ``scores`` adds ``random_score``, ``best_setting_score``, ``reference_score``,
    ``reference_source``, ``score_minmax``, ``score_reference`` and ``eval_minmax`` (the final
    evaluation return on the same min-max scale). ``constants`` holds one row per env.
    """
    references = load_reference_scores() if references is None else references
    constants = minmax_constants(runs, random)
    ref = references.set_index("env")
    constants["reference_score"] = [
        float(ref.loc[env_family(e), "score"]) if env_family(e) in ref.index else np.nan
        for e in constants["env"]]
    constants["reference_env"] = [
        ref.loc[env_family(e), "reference_env"] if env_family(e) in ref.index else None
        for e in constants["env"]]
    constants["reference_source"] = [
        ref.loc[env_family(e), "source"] if env_family(e) in ref.index else None
        for e in constants["env"]]
    merged = runs.merge(constants, on="env", how="left")
    scores = runs.copy()
    scores["random_score"] = merged["random_score"].to_numpy()
    scores["best_setting_score"] = merged["best_score"].to_numpy()
    scores["reference_score"] = merged["reference_score"].to_numpy()
    scores["reference_source"] = merged["reference_source"].to_numpy()
    scores["score_minmax"] = normalize(scores.final_score, scores.random_score,
                                       scores.best_setting_score)
    scores["score_reference"] = normalize(scores.final_score, scores.random_score,
                                          scores.reference_score)
    scores["eval_minmax"] = normalize(scores.final_eval_return, scores.random_score,
                                      scores.best_setting_score)
    return scores, constants


def varied_params(runs: pd.DataFrame) -> dict[str, str]:
    """``{setting: "dtarg=0.03, increment=2.0"}``: the loss parameters that vary between the
    settings of the same variant (empty when a variant appears with one setting only)."""
    out = {}
    for variant, group in runs.groupby("variant"):
        parsed = {s: parse_params(p) for s, p in zip(group.setting, group.params)}
        keys = sorted({k for d in parsed.values() for k in d})
        varying = [k for k in keys if len({d.get(k) for d in parsed.values()}) > 1]
        for setting, d in parsed.items():
            out[setting] = ", ".join(f"{k}={d.get(k)}" for k in varying)
    return out

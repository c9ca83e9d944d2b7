"""The results store: one directory per run, written so that a crash never corrupts it.

Layout::

    <results>/<experiment>/runs/<run_id>/
        config.yaml        resolved RunConfig (written first)
        status.json        pending | running | done | failed, error text, timings, provenance
        metrics.parquet    one row per iteration
        episodes.parquet   one row per finished training episode
        evals.parquet      one row per deterministic evaluation episode
        summary.json       final score and totals

Every file is written to a temporary name in the same directory and renamed into place
(``os.replace`` is atomic on POSIX), so a reader never sees a truncated file under a final
name. ``status.json`` is written last with ``done``: a run is complete exactly when its
status says so, and readers ignore every other run. A run found ``running`` with no live
writer was interrupted; it is restarted from scratch (its stale files are removed first).
Each run directory has one writer; nothing is shared between processes.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml

STATES = ("pending", "running", "done", "failed")
_UMASK = os.umask(0)
os.umask(_UMASK)
TABLES = ("metrics", "episodes", "evals")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are shared files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True).encode())


def atomic_write_parquet(path: Path, df: pd.DataFrame) -> None:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


class RunDir:
    """One run's directory."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    @property
    def run_id(self) -> str:
        return self.path.name

    def status(self) -> dict | None:
        try:
            return json.loads((self.path / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def state(self) -> str | None:
        s = self.status()
        return None if s is None else s.get("state")

    def config(self) -> dict:
        return yaml.safe_load((self.path / "config.yaml").read_text())

    def set_status(self, state: str, **fields: Any) -> None:
        assert state in STATES, state
        current = self.status() or {}
        current.update(fields)
        current["state"] = state
        current[f"{state}_at"] = time.time()
        atomic_write_json(self.path / "status.json", current)

    def start(self, config: dict, **fields: Any) -> None:
        """Begin (or restart) the run: mark it ``running``, clear stale outputs, write config.

        The status is replaced first (only the attempt count carries over), so a crash
        in between never leaves a ``done`` status beside deleted tables, nor an old
        attempt's error or timings beside a new result.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        attempts = (self.status() or {}).get("attempts", 0) + 1
        atomic_write_json(self.path / "status.json", {
            "state": "running", "running_at": time.time(), "pid": os.getpid(),
            "attempts": attempts, "error": None, **fields})
        for name in TABLES + ("summary",):
            for f in self.path.glob(f"{name}.*"):
                f.unlink()
        for f in self.path.glob(".*.tmp"):
            f.unlink()
        atomic_write_bytes(self.path / "config.yaml",
                           yaml.safe_dump(config, sort_keys=False).encode())

    def finish(self, tables: dict[str, pd.DataFrame], summary: dict, **fields: Any) -> None:
        for name, df in tables.items():
            atomic_write_parquet(self.path / f"{name}.parquet", df)
        atomic_write_json(self.path / "summary.json", summary)
        self.set_status("done", **fields)

    def fail(self, error: str, **fields: Any) -> None:
        self.set_status("failed", error=error, **fields)

    def table(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(self.path / f"{name}.parquet")

    def summary(self) -> dict:
        return json.loads((self.path / "summary.json").read_text())


def experiment_runs(exp_dir: Path | str) -> list[RunDir]:
    runs = Path(exp_dir) / "runs"
    if not runs.is_dir():
        return []
    return [RunDir(p) for p in sorted(runs.iterdir()) if p.is_dir()]


def _flat_params(loss: dict) -> str:
    return ",".join(f"{k}={loss[k]}" for k in sorted(loss))


def run_index(exp_dir: Path | str, states: Iterable[str] = STATES) -> pd.DataFrame:
    """One row per run directory: run_id, state, env, variant, params, seed, error."""
    rows = []
    for run in experiment_runs(exp_dir):
        status = run.status()
        if status is None or status.get("state") not in states:
            continue
        try:
            cfg = run.config()
        except (FileNotFoundError, yaml.YAMLError):
            continue
        rows.append({
            "run_id": run.run_id,
            "state": status["state"],
            "env": cfg["env"],
            "variant": cfg["variant"],
            "setting": status.get("setting") or cfg["variant"],
            "params": _flat_params(cfg.get("loss", {})),
            "seed": cfg["seed"],
            "error": status.get("error"),
            "path": str(run.path),
        })
    return pd.DataFrame(rows, columns=["run_id", "state", "env", "variant", "setting", "params",
                                       "seed", "error", "path"])


def load_experiment(exp_dir: Path | str, table: str = "metrics") -> pd.DataFrame:
    """Long-format DataFrame of every *done* run of an experiment.

    Columns: run_id, env, variant, setting, params, seed, frames, metric, value. Runs that are
    not done (running, failed, interrupted) are ignored; :func:`run_index` lists them.
    """
    index = run_index(exp_dir, states=("done",))
    frames = []
    for row in index.itertuples():
        df = pd.read_parquet(Path(row.path) / f"{table}.parquet")
        id_cols = ["frames"] + (["episode"] if "episode" in df.columns else [])
        value_cols = [c for c in df.columns if c not in id_cols]
        long = df.melt(id_vars=id_cols, value_vars=value_cols, var_name="metric",
                       value_name="value")
        for col in ("run_id", "env", "variant", "setting", "params", "seed"):
            long[col] = getattr(row, col)
        frames.append(long)
    cols = ["run_id", "env", "variant", "setting", "params", "seed", "frames", "metric", "value"]
    if not frames:
        return pd.DataFrame(columns=cols)
    out = pd.concat(frames, ignore_index=True)
    return out[cols + [c for c in out.columns if c not in cols]]


def remove_run(run: RunDir) -> None:
    shutil.rmtree(run.path, ignore_errors=True)

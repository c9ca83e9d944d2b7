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
Each run directory has one writer; nothing is shared between processes. How files are
written and read (one-line errors: a full disk is recorded as the run's reason; parquet
without Arrow's thread pools) is :mod:`klppo_bench.files`, re-exported here.

Readers never let one damaged record hide the others: :func:`scan_runs` and
:func:`load_tables` return the runs they could not read (file and error, as
:class:`Unreadable`) beside what they read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml

from klppo_bench.files import (  # noqa: F401 -- re-exported: the store's file functions
    DISK_FULL, FILE_MODE, WriteError, atomic_write_bytes, atomic_write_json,
    atomic_write_parquet, check_output_dir, parquet_bytes, read_parquet, write_error)

STATES = ("pending", "running", "done", "failed")
TABLES = ("metrics", "episodes", "evals")


class RunDir:
    """One run's directory."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    @property
    def run_id(self) -> str:
        return self.path.name

    def status(self) -> dict | None:
        """The run's status, or ``None`` when it is missing or damaged (unreadable, not UTF-8
        JSON, not a mapping): such a run is trained again (:func:`status_problem` says why)."""
        try:
            status = json.loads((self.path / "status.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            return None
        return status if isinstance(status, dict) else None

    def state(self) -> str | None:
        """One of :data:`STATES`, or ``None`` (no status, or a damaged one)."""
        s = self.status()
        state = None if s is None else s.get("state")
        return state if isinstance(state, str) and state in STATES else None

    def status_problem(self) -> str | None:
        """Why an existing ``status.json`` cannot be used (one line), or ``None`` when it is
        readable or absent."""
        path = self.path / "status.json"
        if not path.exists() and not path.is_symlink():
            return None
        try:
            _read_status(path)
        except Exception as err:  # noqa: BLE001 -- any damage, one line
            return error_line(err)
        return None

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
        attempts = (self.status() or {}).get("attempts", 0)
        attempts = (attempts if isinstance(attempts, int) else 0) + 1
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
        """Write the tables and the summary, then mark the run ``done``.

        The summary gains ``frames_requested`` (the config's ``frames``) and
        ``frames_actual`` (its ``frames``: what ran, rounded up to whole iterations).

        If a file cannot be written (disk full...), the files written so far are removed and
        the run is recorded ``failed`` with that :class:`WriteError` as its reason (``retry``:
        the next sweep runs it again); it raises only when even that record cannot be written.
        """
        summary = dict(summary)
        if "frames" in summary:
            summary.setdefault("frames_actual", summary["frames"])
            with contextlib.suppress(FileNotFoundError, yaml.YAMLError, TypeError, KeyError):
                summary.setdefault("frames_requested", self.config()["frames"])
        try:
            for name, df in tables.items():
                atomic_write_parquet(self.path / f"{name}.parquet", df)
            atomic_write_json(self.path / "summary.json", summary)
        except OSError as err:
            for name in [*tables, "summary"]:
                for f in self.path.glob(f"{name}.*"):
                    with contextlib.suppress(OSError):
                        f.unlink()
            self.fail(err, **fields)
            return
        self.set_status("done", **fields)

    def write_record(self, files: dict[str, bytes]) -> None:
        """Store a record made in another directory (a Ray worker that cannot see this one
        trained the run in its own scratch directory and sent its files, by name): stale
        outputs are removed, every file is written atomically and ``status.json`` last, so a
        reader sees the old record or the whole new one."""
        names = [n for n in files if Path(n).name == n and not n.startswith(".")]
        self.path.mkdir(parents=True, exist_ok=True)
        for name in TABLES + ("summary",):
            for f in self.path.glob(f"{name}.*"):
                if f.name not in files:
                    f.unlink()
        for name in sorted(n for n in names if n != "status.json"):
            atomic_write_bytes(self.path / name, files[name])
        if "status.json" in names:
            atomic_write_bytes(self.path / "status.json", files["status.json"])

    def fail(self, error: str | BaseException, **fields: Any) -> None:
        """Record the run ``failed`` with ``error`` (a line, or the exception that ended it).
        An ``OSError`` (a :class:`WriteError`: results that could not be written, disk
        full...) is the machine's fault, not the run's: the status gets ``retry: true`` and the
        next sweep reruns it; any other failure gets ``retry: false``."""
        retry = isinstance(error, OSError)
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}"
        self.set_status("failed", error=error, **{"retry": retry, **fields})

    def set_progress(self, row: dict, total_frames: int, started: float,
                     frames_at_start: int = 0) -> None:
        """Record a running run's progress in its status: frames done of ``total_frames``, the
        latest training return, env-steps/s and the ETA (from ``started``, a ``time.time()``,
        when the run was at ``frames_at_start``: a resumed job's rate counts this attempt's
        frames only)."""
        current = self.status() or {}
        elapsed = max(time.time() - started, 1e-9)
        done = int(row["frames"])
        rate = (done - frames_at_start) / elapsed
        ret = row.get("episode_return")
        current["progress"] = {
            "frames": done, "total_frames": int(total_frames),
            "episode_return": None if ret is None or ret != ret else float(ret),
            "sps": rate, "eta_seconds": (total_frames - done) / rate if rate > 0 else None,
            "updated_at": time.time()}
        atomic_write_json(self.path / "status.json", current)

    def table(self, name: str) -> pd.DataFrame:
        return read_parquet(self.path / f"{name}.parquet")

    def summary(self) -> dict:
        return json.loads((self.path / "summary.json").read_text())


def progress_text(status: dict | None) -> str:
    """A running run's progress from its status.json (frames, latest return, ETA), or ''."""
    p = (status or {}).get("progress")
    if not p or (status or {}).get("state") != "running":
        return ""
    try:
        ret = p.get("episode_return")
        eta = p.get("eta_seconds")
        return (f"{p['frames']:,}/{p['total_frames']:,} frames"
                + (f", return {ret:.0f}" if ret is not None else "")
                + (f", eta {eta / 60:.0f} min" if eta is not None else "")
                + f" (updated {max(0.0, time.time() - p['updated_at']) / 60:.0f} min ago)")
    except (AttributeError, KeyError, TypeError, ValueError):  # a damaged progress record
        return ""


def experiment_runs(exp_dir: Path | str) -> list[RunDir]:
    runs = Path(exp_dir) / "runs"
    if not runs.is_dir():
        return []
    return [RunDir(p) for p in sorted(runs.iterdir()) if p.is_dir()]


def _flat_params(loss: dict) -> str:
    return ",".join(f"{k}={loss[k]}" for k in sorted(loss))


@dataclass(frozen=True)
class Unreadable:
    """A run record that could not be read: the file and why, in one line."""
    run_id: str
    path: str
    error: str


def error_line(err: BaseException, limit: int = 240) -> str:
    """``"ArrowInvalid: Parquet magic bytes not found ..."``: the error's type and message on
    one line, at most ``limit`` characters."""
    text = " ".join(str(err).split()) or "(no message)"
    text = f"{type(err).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


CONFIG_KEYS = ("env", "variant", "seed")
INDEX_COLUMNS = ["run_id", "state", "env", "variant", "setting", "params", "seed", "error",
                 "engine", "path"]


def _read_status(path: Path) -> dict:
    status = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(status, dict):
        raise ValueError(f"a JSON {type(status).__name__}, not a mapping")
    if not isinstance(status.get("state"), str) or status["state"] not in STATES:
        raise ValueError(f"state {status.get('state')!r}; allowed: {', '.join(STATES)}")
    return status


def _read_config(path: Path) -> dict:
    cfg = yaml.safe_load(path.read_text())
    if not isinstance(cfg, dict):
        raise ValueError(f"a {type(cfg).__name__}, not a mapping")
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"missing keys: {', '.join(missing)}")
    if not isinstance(cfg.get("loss") or {}, dict):
        raise ValueError("loss is not a mapping")
    if not (isinstance(cfg["env"], str) and isinstance(cfg["variant"], str)
            and isinstance(cfg["seed"], int)):
        raise ValueError(f"env={cfg['env']!r}, variant={cfg['variant']!r}, seed={cfg['seed']!r}; "
                         f"allowed: env and variant strings, an integer seed")
    return cfg


def scan_runs(exp_dir: Path | str, states: Iterable[str] = STATES
              ) -> tuple[pd.DataFrame, list[Unreadable]]:
    """``(index, unreadable)``: one index row per run in ``states`` (see :func:`run_index`),
    and every run whose ``status.json`` or ``config.yaml`` is missing, not JSON / YAML, or
    lacks what the index needs (its state is then unknown, so it is listed whatever
    ``states`` asks for)."""
    rows, unreadable = [], []
    for run in experiment_runs(exp_dir):
        path = run.path / "status.json"
        try:
            status = _read_status(path)
        except Exception as err:  # any damage to one record must not hide the others
            unreadable.append(Unreadable(run.run_id, str(path), error_line(err)))
            continue
        if status["state"] not in states:
            continue
        path = run.path / "config.yaml"
        try:
            cfg = _read_config(path)
        except Exception as err:
            unreadable.append(Unreadable(run.run_id, str(path), error_line(err)))
            continue
        rows.append({
            "run_id": run.run_id,
            "state": status["state"],
            "env": cfg["env"],
            "variant": cfg["variant"],
            "setting": status.get("setting") or cfg["variant"],
            "params": _flat_params(cfg.get("loss") or {}),
            "seed": cfg["seed"],
            "error": status.get("error"),
            "engine": (status.get("provenance") or {}).get("engine"),
            "path": str(run.path),
        })
    return pd.DataFrame(rows, columns=INDEX_COLUMNS), unreadable


def run_index(exp_dir: Path | str, states: Iterable[str] = STATES) -> pd.DataFrame:
    """One row per run directory: run_id, state, env, variant, setting, params, seed, error,
    engine (``provenance.engine`` of its status; None where unrecorded), path. Runs whose
    status or config cannot be read are left out; :func:`scan_runs` lists them."""
    return scan_runs(exp_dir, states)[0]


LONG_COLUMNS = ["run_id", "env", "variant", "setting", "params", "seed", "frames", "metric",
                "value"]


def _long(df: pd.DataFrame, row) -> pd.DataFrame:
    id_cols = ["frames"] + (["episode"] if "episode" in df.columns else [])
    value_cols = [c for c in df.columns if c not in id_cols]
    long = df.melt(id_vars=id_cols, value_vars=value_cols, var_name="metric",
                   value_name="value")
    for col in ("run_id", "env", "variant", "setting", "params", "seed"):
        long[col] = getattr(row, col)
    return long


def _concat_long(frames: list[pd.DataFrame]) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame(columns=LONG_COLUMNS)
    out = pd.concat(frames, ignore_index=True)
    return out[LONG_COLUMNS + [c for c in out.columns if c not in LONG_COLUMNS]]


def read_table(path: Path | str, required: Iterable[str] = ("frames",)) -> pd.DataFrame:
    """One run table; ValueError when a ``required`` column is missing or it has no row."""
    df = read_parquet(path)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"missing columns: {', '.join(missing)} (has: "
                         f"{', '.join(map(str, df.columns)) or 'none'})")
    if df.empty:
        raise ValueError("no rows")
    return df


def load_tables(index: pd.DataFrame, table: str = "metrics",
                required: Iterable[str] = ("frames",)
                ) -> tuple[pd.DataFrame, list[Unreadable]]:
    """``(long, unreadable)``: ``table`` of every run in ``index`` (rows of :func:`run_index`)
    in :func:`load_experiment`'s long format, and the runs whose table is missing, not parquet,
    empty or lacks a ``required`` column (left out of ``long``)."""
    frames, unreadable = [], []
    required = tuple(required)
    for row in index.itertuples():
        path = Path(row.path) / f"{table}.parquet"
        try:
            df = read_table(path, required)
        except Exception as err:  # a damaged table is reported, not fatal to the others
            unreadable.append(Unreadable(row.run_id, str(path), error_line(err)))
            continue
        frames.append(_long(df, row))
    return _concat_long(frames), unreadable


def load_experiment(exp_dir: Path | str, table: str = "metrics") -> pd.DataFrame:
    """Long-format DataFrame of every *done* run of an experiment.

    Columns: run_id, env, variant, setting, params, seed, frames, metric, value. Runs that are
    not done (running, failed, interrupted) are ignored; :func:`run_index` lists them. A table
    that cannot be read raises; :func:`load_tables` lists such runs instead.
    """
    index = run_index(exp_dir, states=("done",))
    return _concat_long([_long(read_parquet(Path(row.path) / f"{table}.parquet"), row)
                         for row in index.itertuples()])


def remove_run(run: RunDir) -> None:
    shutil.rmtree(run.path, ignore_errors=True)

"""Experiment loggers: every run's per-iteration metrics, streamed to torchrl's loggers.

``--logger csv|tensorboard|wandb|mlflow`` (repeatable, on ``run`` and ``sweep``) or a spec's
``loggers: [tensorboard]`` sends each iteration's metrics row, as the engines hand it to their
``on_iteration`` callback, through :mod:`torchrl.record.loggers`. The step is the row's
``frames``; each other column of ``metrics.parquet`` becomes a scalar of the same name (a NaN,
"not measured at this iteration" such as ``eval_return`` between evaluations, is not logged).

Logging never changes a run: the logger choice is not part of :class:`RunConfig` or the run
id (it travels beside the config, as a :class:`LogTarget` in each job entry), logger calls run
with the random number generators saved and restored, and a logger that fails is dropped with
a warning while the run trains on.

Where each logger writes, under ``log_dir`` (default ``<experiment dir>/logs``)::

    csv/<setting>/<env>/seed<k>-<run_id>/scalars/<metric>.csv   lines "step,value"
    tensorboard/<setting>/<env>/seed<k>-<run_id>/events.out.*   tensorboard --logdir <that root>
    wandb/wandb/<W&B run dirs>       project = experiment, group = setting, job type = env, tags
    mlflow/mlflow.db, artifacts/     MLflow experiment = experiment, run name = the path above

W&B and MLflow honour their own environment variables (``WANDB_MODE=offline``,
``WANDB_ENTITY``, ``MLFLOW_TRACKING_URI``, ...). The clients of tensorboard, wandb and mlflow are
the ``loggers`` extra (``pip install 'klppo-bench[loggers]'``) and are imported only here, only
when used.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

from klppo_bench.errors import ConfigError
from klppo_bench.labels import run_setting
from klppo_bench.loggers.clients import _FACTORIES, _Start, _mlflow_experiment_id
from klppo_bench.loggers.target import LogTarget, RunLabel, mlflow_tracking_uri

LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")
LOGGER_CHOICES = LOGGERS + ("none",)
"""``none`` turns a spec's loggers off from the command line."""
EXTRA = "pip install 'klppo-bench[loggers]'"
_CLIENTS = {"tensorboard": ("tensorboard",), "wandb": ("wandb",), "mlflow": ("mlflow",)}
_MLFLOW_LOCAL_STORE = ("sqlalchemy", "alembic")
"""What MLflow's default local store (SQLite) needs beyond mlflow-skinny."""
_STEP = "frames"


def parse_loggers(raw: Any, where: str) -> tuple[str, ...]:
    """Validate logger names (a name or a list of names); ``none`` means no logger.

    Raises:
        ConfigError: naming ``where``, the bad value and the allowed names.
    """
    names = [raw] if isinstance(raw, str) else raw
    if names is None:
        return ()
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) \
            or any(n not in LOGGER_CHOICES for n in names):
        raise ConfigError(f"{where}={raw!r} is invalid; allowed: a list of "
                          + ", ".join(LOGGER_CHOICES))
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_clients(names: Iterable[str], where: str = "--logger") -> None:
    """Raise a one-line :class:`ConfigError` naming the extra if a logger's client is missing."""
    for name in names:
        needed = _CLIENTS.get(name, ())
        if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
            needed = needed + _MLFLOW_LOCAL_STORE
        missing = [m for m in needed if not _installed(m)]
        if missing:
            raise ConfigError(f"{where} {name}: {', '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} not installed; allowed: "
                              f"{EXTRA} (tensorboard, wandb, mlflow), or --logger csv, which "
                              "needs nothing")


def log_target(names: Iterable[str], log_dir: str | Path | None, exp_dir: str | Path,
               experiment: str, where: str = "--logger") -> LogTarget | None:
    """A checked :class:`LogTarget` (``None`` without loggers); ``log_dir`` defaults to
    ``<exp_dir>/logs``.

    Raises:
        ConfigError: a logger whose client is not installed (before anything is written).
    """
    names = tuple(names)
    if not names:
        return None
    check_clients(names, where)
    directory = Path(log_dir) if log_dir else Path(exp_dir) / "logs"
    return LogTarget(names, str(directory.resolve()), experiment)


@contextlib.contextmanager
def rng_untouched() -> Iterator[None]:
    """Run a block (a logger's client code) with Python's, NumPy's and torch's global random
    states restored afterwards, so a client that draws random numbers (run ids, sampling)
    cannot change a run's bits."""
    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def scalars(row: dict) -> dict[str, float]:
    """The scalars logged for one metrics row: every numeric column but the step, NaNs left
    out (not measured at this iteration)."""
    out = {}
    for key, value in row.items():
        if key == _STEP or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and math.isnan(value):
            continue
        out[key] = float(value)
    return out


def prepare(target: LogTarget | None) -> None:
    """What must happen once, in the parent, before workers log: the MLflow experiment (and
    its SQLite store's schema) is created here, so concurrent workers only add runs to it.

    Raises:
        ConfigError: the MLflow tracking store cannot be opened.
    """
    if target is None or "mlflow" not in target.loggers:
        return
    try:
        with rng_untouched():
            _mlflow_experiment_id(target)
    except Exception as err:  # noqa: BLE001 -- any client failure: say it in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(f"--logger mlflow: cannot open the tracking store "
                          f"{mlflow_tracking_uri(target.log_dir)} ({type(err).__name__}: "
                          f"{first[:200]}); allowed: a reachable MLFLOW_TRACKING_URI, or unset "
                          "it for a local store under the log dir") from None


class RunLoggers:
    """The loggers of the runs of one job (one run, or a batched job's lanes).

    ``log(cfg, row)`` is the engines' ``on_iteration`` callback; a run's loggers start at its
    first row, so only runs that really train (and are written) get any, and a batched job
    resumed from its checkpoint continues its runs' CSV and TensorBoard logs where the
    checkpoint was taken (W&B and MLflow get a new run per attempt). A logger that fails (to
    start, or later) is dropped with one warning on stderr; the run trains on.
    """

    def __init__(self, target: LogTarget, runs: Iterable[tuple[Any, str | None]]):
        """``runs``: ``(RunConfig, setting)`` of the job's runs (setting ``None``: the variant
        and its changed parameters, as :func:`run_setting` labels them)."""
        self.target = target
        self.labels = {cfg.run_id(): (cfg, setting) for cfg, setting in runs}
        self.loggers: dict[str, dict[str, Any]] = {}

    @staticmethod
    def _warn(name: str, run_id: str, what: str, err: BaseException) -> None:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"klppo-bench: warning: {name} logger of run {run_id} {what} "
              f"({type(err).__name__}: {first[:200]}); the run goes on without it",
              file=sys.stderr, flush=True)

    def _start(self, run_id: str, row: dict) -> dict[str, Any]:
        cfg, setting = self.labels[run_id]
        label = RunLabel(self.target.experiment, cfg.env, setting or run_setting(cfg),
                         cfg.seed, run_id)
        start = _Start(int(row[_STEP]), int(row.get("iteration", 0)) > 0)
        loggers = {}
        for name in self.target.loggers:
            try:
                loggers[name] = _FACTORIES[name](self.target, label, cfg.to_dict(), start)
            except Exception as err:  # noqa: BLE001 -- logging must not stop training
                self._warn(name, run_id, "could not start", err)
        return loggers

    def log(self, cfg, row: dict) -> None:
        """Log one iteration's metrics row of run ``cfg`` at step ``row["frames"]``."""
        run_id = cfg.run_id()
        if run_id not in self.labels:
            return
        with rng_untouched():
            if run_id not in self.loggers:
                self.loggers[run_id] = self._start(run_id, row)
            loggers, values, step = self.loggers[run_id], scalars(row), int(row[_STEP])
            for name, logger in list(loggers.items()):
                try:
                    logger.log_metrics(values, step=step)
                except Exception as err:  # noqa: BLE001 -- logging must not stop training
                    self._warn(name, run_id, "failed", err)
                    loggers.pop(name)

    def close(self, failed: Iterable[str] = ()) -> None:
        """Flush and close every logger; W&B and MLflow runs in ``failed`` are marked so."""
        failed = set(failed)
        with rng_untouched():
            for run_id, loggers in self.loggers.items():
                for name, logger in loggers.items():
                    try:
                        if name == "wandb":
                            logger.experiment.finish(exit_code=int(run_id in failed))
                        elif name == "mlflow":
                            logger.finish(ok=run_id not in failed)
                        else:
                            logger.shutdown()
                        if name == "csv":  # torchrl's CSV logger leaves its files open
                            for f in logger.experiment.files.values():
                                f.close()
                    except Exception as err:  # noqa: BLE001
                        self._warn(name, run_id, "could not close", err)
        self.loggers = {}

    def __enter__(self) -> "RunLoggers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def open_loggers(log: LogTarget | dict | None, runs: Iterable[tuple[Any, str | None]],
                 exp_dir: str | Path) -> Iterator[RunLoggers | None]:
    """:class:`RunLoggers` for ``runs`` (``None`` without a target), closed on exit with the
    runs recorded as failed in ``exp_dir`` marked failed."""
    if not log:
        yield None
        return
    from klppo_bench.store import RunDir

    loggers = RunLoggers(log if isinstance(log, LogTarget) else LogTarget.from_dict(log), runs)
    try:
        yield loggers
    finally:
        loggers.close(failed=[r for r in loggers.loggers
                              if RunDir(Path(exp_dir) / "runs" / r).state() == "failed"])

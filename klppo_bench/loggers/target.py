"""What names a run in the loggers and where they write: the :class:`LogTarget` that travels
beside a run's config, the :class:`RunLabel` of one run, and the config as logged
hyperparameters. Shared by :mod:`klppo_bench.loggers` (when to log) and :mod:`.clients` (the
torchrl logger of each kind)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LogTarget", "RunLabel", "flat_config", "mlflow_tracking_uri"]


@dataclass(frozen=True)
class LogTarget:
    """Which loggers a run streams to and where: beside the run config, never in it."""

    loggers: tuple[str, ...]
    """Names from :data:`klppo_bench.loggers.LOGGERS`."""
    log_dir: str
    """Absolute directory the file-based loggers (and W&B's and MLflow's local files) use."""
    experiment: str
    """The experiment's name: W&B project, MLflow experiment, first part of every name."""

    def to_dict(self) -> dict:
        return {"loggers": list(self.loggers), "log_dir": self.log_dir,
                "experiment": self.experiment}

    @classmethod
    def from_dict(cls, d: dict) -> "LogTarget":
        return cls(tuple(d["loggers"]), d["log_dir"], d["experiment"])

    def describe(self) -> str:
        """One line: which loggers write where."""
        where = []
        for name in self.loggers:
            if name == "mlflow":
                where.append(f"mlflow -> {mlflow_tracking_uri(self.log_dir)}")
            elif name == "wandb":
                project = os.environ.get("WANDB_PROJECT") or self.experiment
                mode = os.environ.get("WANDB_MODE") or "online"
                where.append(f"wandb -> project {project} ({mode}, files in "
                             f"{Path(self.log_dir) / 'wandb'})")
            else:
                where.append(f"{name} -> {Path(self.log_dir) / name}")
        return "loggers: " + "; ".join(where)


@dataclass(frozen=True)
class RunLabel:
    """What names a run in every logger: experiment, env, setting, seed and run id."""

    experiment: str
    env: str
    setting: str
    seed: int
    run_id: str

    @property
    def path(self) -> str:
        """``<setting>/<env>/seed<k>-<run_id>``: seeds of one setting sit side by side."""
        safe = [p.replace("/", "_").replace(os.sep, "_") for p in (self.setting, self.env)]
        return f"{safe[0]}/{safe[1]}/seed{self.seed}-{self.run_id}"

    @property
    def name(self) -> str:
        return f"{self.experiment}/{self.path}"

    def tags(self) -> dict[str, str]:
        return {"experiment": self.experiment, "env": self.env, "setting": self.setting,
                "seed": str(self.seed), "run_id": self.run_id}


def mlflow_tracking_uri(log_dir: str) -> str:
    """``$MLFLOW_TRACKING_URI``, else a SQLite store in ``<log_dir>/mlflow/mlflow.db``."""
    return (os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{Path(log_dir) / 'mlflow' / 'mlflow.db'}")


def flat_config(cfg_dict: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as one level of ``section.key`` names (lists as strings)."""
    out = {}
    for key, value in cfg_dict.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if not isinstance(value, (list, tuple)) else str(value)
    return out

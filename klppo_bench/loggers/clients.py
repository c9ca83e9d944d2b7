"""One torchrl logger per kind (csv, tensorboard, wandb, mlflow) for one run.

Each factory takes the sweep's :class:`~.target.LogTarget`, the run's
:class:`~.target.RunLabel`, its config and where its logging starts, and returns a
started torchrl logger. Split from :mod:`klppo_bench.loggers` (what is logged, when, and the
command-line side) so each module reads in one go.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from klppo_bench.loggers.target import LogTarget, RunLabel, flat_config, mlflow_tracking_uri

_W_AND_B_TAG_LEN = 64


@dataclass(frozen=True)
class _Start:
    """Where a run's logging starts: its first logged step, and whether that is a resumed
    job's first iteration (a batched job restarted from its checkpoint)."""

    step: int
    resumed: bool


def _run_dir(path: Path, start: _Start) -> None:
    """A run's own log directory: emptied for a run that starts at frame 0 (a rerun after a
    failure must not be drawn over the failed attempt), kept for a resumed one."""
    if path.exists() and not start.resumed:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def _csv(target: LogTarget, label: RunLabel, config: dict, start: _Start):
    from torchrl.record.loggers import CSVLogger

    root = Path(target.log_dir) / "csv"
    _run_dir(root / label.path, start)
    for csv in (root / label.path / "scalars").glob("*.csv"):  # resumed: drop steps redone
        kept = [line for line in csv.read_text().splitlines()
                if re.fullmatch(r"\d+,.+", line) and int(line.split(",")[0]) < start.step]
        csv.write_text("".join(line + "\n" for line in kept))
    logger = CSVLogger(exp_name=label.path, log_dir=str(root))
    logger.log_hparams({**label.tags(), **flat_config(config)})
    return logger


@functools.lru_cache(maxsize=1)
def _tensorboard_logger_class():
    from torchrl.record.loggers import TensorboardLogger

    class ResumableTensorboardLogger(TensorboardLogger):
        """Passes ``purge_step`` (torchrl's logger has no such argument): a resumed job hides
        the steps its interrupted attempt logged after the checkpoint it resumes from."""

        def __init__(self, exp_name: str, log_dir: str, purge_step: int | None = None):
            self.purge_step = purge_step
            super().__init__(exp_name=exp_name, log_dir=log_dir)

        def _create_experiment(self):
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(log_dir=os.path.join(self.log_dir, self.exp_name),
                                 purge_step=self.purge_step)

    return ResumableTensorboardLogger


def _tensorboard(target: LogTarget, label: RunLabel, config: dict, start: _Start):
    root = Path(target.log_dir) / "tensorboard"
    _run_dir(root / label.path, start)
    logger = _tensorboard_logger_class()(label.path, str(root),
                                         purge_step=start.step if start.resumed else None)
    table = "\n".join(f"| {k} | {v} |" for k, v in {**label.tags(),
                                                     **flat_config(config)}.items())
    logger.experiment.add_text("run", "| key | value |\n|---|---|\n" + table,
                               global_step=start.step)
    return logger


def _wandb(target: LogTarget, label: RunLabel, config: dict, start: _Start):
    from torchrl.record.loggers import WandbLogger

    tags = [f"{k}:{v}"[:_W_AND_B_TAG_LEN] for k, v in label.tags().items() if k != "seed"]
    return WandbLogger(exp_name=label.name, save_dir=str(Path(target.log_dir) / "wandb"),
                       project=os.environ.get("WANDB_PROJECT") or target.experiment,
                       group=label.setting, job_type=label.env, tags=tags,
                       config={**label.tags(), "seed": label.seed, "config": config},
                       reinit="create_new",  # a batched job holds several runs at once
                       log_env_packages=False)


def _mlflow_experiment_id(target: LogTarget) -> str:
    """Get or create the MLflow experiment (the sweep does it once, before any worker)."""
    import logging

    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating tables"
    uri = mlflow_tracking_uri(target.log_dir)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(target.experiment)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        artifacts = (Path(target.log_dir) / "mlflow" / "artifacts").as_uri()
    try:
        return client.create_experiment(target.experiment, artifact_location=artifacts)
    except Exception:  # created meanwhile by another process
        experiment = client.get_experiment_by_name(target.experiment)
        if experiment is None:
            raise
        return experiment.experiment_id


@functools.lru_cache(maxsize=1)
def _mlflow_logger_class():
    from torchrl.record.loggers import MLFlowLogger

    class RunMLFlowLogger(MLFlowLogger):
        """torchrl's MLFlowLogger logs to mlflow's one process-wide *active* run, but a batched
        job trains several runs in one process: this one owns its run (an explicit run id
        through ``MlflowClient``), names it and tags it."""

        def __init__(self, target: LogTarget, label: RunLabel):
            self.target, self.label = target, label
            super().__init__(exp_name=target.experiment,
                             tracking_uri=mlflow_tracking_uri(target.log_dir))

        def _create_experiment(self):
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(self.log_dir)
            self.id = _mlflow_experiment_id(self.target)
            return self.client.create_run(self.id, run_name=self.label.path,
                                          tags=self.label.tags())

        def log_scalar(self, name: str, value: float, step: int | None = None) -> None:
            self.log_metrics({name: value}, step=step)

        def log_metrics(self, metrics: dict, step: int | None = None, **kwargs) -> dict:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
            self.client.log_batch(self.experiment.info.run_id, metrics=batch)
            return metrics

        def log_hparams(self, cfg: dict) -> None:
            from mlflow.entities import Param

            params = [Param(k, str(v)) for k, v in cfg.items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(self.experiment.info.run_id, params=params[i:i + 100])

        def finish(self, ok: bool = True) -> None:
            if not self._service_shutdown:
                self.client.set_terminated(self.experiment.info.run_id,
                                           "FINISHED" if ok else "FAILED")
                self._service_shutdown = True

        def shutdown(self, timeout: float | None = None) -> None:
            self.finish(True)

    return RunMLFlowLogger


def _mlflow(target: LogTarget, label: RunLabel, config: dict, start: _Start):
    logger = _mlflow_logger_class()(target, label)
    logger.log_hparams(flat_config(config))
    return logger


_FACTORIES = {"csv": _csv, "tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow}



"""What every worker runs, whatever the backend: :func:`execute_job`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

from klppo_bench.config import RunConfig
from klppo_bench.harness.run import execute_run
from klppo_bench.store import RunDir


def run_status(exp_dir: Path | str, entry: dict) -> dict:
    """The status a backend reports for one run of a job (read from its status.json)."""
    cfg = entry["config"]
    run = RunDir(Path(exp_dir) / "runs" / RunConfig.from_dict(cfg).run_id())
    status = run.status() or {}
    out = {"run_id": run.run_id, "setting": entry["setting"], "env": cfg["env"],
           "seed": cfg["seed"], "state": status.get("state", "missing"),
           "error": status.get("error"), "seconds": status.get("seconds"),
           "attempts": status.get("attempts", 0), "final_score": None}
    if out["state"] == "done":
        with contextlib.suppress(OSError, ValueError, AttributeError):  # a damaged summary
            out["final_score"] = run.summary().get("final_score")
    return out


def execute_job(job: list[dict], exp_dir: Path | str,
                on_event: Callable[[dict], None] | None = None) -> list[dict]:
    """Run ``job`` into ``exp_dir``; return one status per run.

    Entries whose ``engine`` is ``batched`` are the seeds of one configuration and train
    together (:func:`klppo_bench.harness.batched.execute_batch`); an entry with
    ``write: False`` is trained for the batch's sake but not written or reported. Any other
    job runs its entries one by one on the torchrl reference engine. A run that fails is
    recorded as failed and the job goes on. An entry's ``log`` (a
    :class:`~klppo_bench.loggers.LogTarget` as a dict) streams each written run's metrics
    rows to its experiment loggers.
    """
    cfgs = [RunConfig.from_dict(entry["config"]) for entry in job]
    if on_event is not None:
        for cfg, entry in zip(cfgs, job):
            if entry.get("write", True):
                on_event({"event": "start", "run_id": cfg.run_id(), "frames": 0})

    log = next((entry["log"] for entry in job if entry.get("log")), None)
    written = [(cfg, entry["setting"]) for cfg, entry in zip(cfgs, job)
               if entry.get("write", True)]
    with _open_loggers(log, written, exp_dir) as loggers:  # beside the configs, never in them

        def hook(cfg: RunConfig, row: dict) -> None:
            if on_event is not None:
                on_event({"event": "iteration", "run_id": cfg.run_id(), "frames": row["frames"],
                          "episode_return": row["episode_return"]})
            if loggers is not None:
                loggers.log(cfg, row)

        _execute(job, cfgs, exp_dir, hook if on_event is not None or loggers is not None
                 else None)
    return [run_status(exp_dir, entry) for entry in job if entry.get("write", True)]


def _execute(job: list[dict], cfgs: list[RunConfig], exp_dir: Path | str,
             hook: Callable[[RunConfig, dict], None] | None) -> None:
    if all(entry.get("engine") == "batched" for entry in job):
        from klppo_bench.harness.batched import execute_batch

        options = {"progress": False, "on_iteration": hook,
                   "checkpoint_every": job[0].get("checkpoint_every"),
                   "keep_checkpoints": job[0].get("keep_checkpoints", False)}
        try:
            execute_batch(cfgs, exp_dir, settings=[entry["setting"] for entry in job],
                          write=[entry.get("write", True) for entry in job],
                          raise_errors=True, **options)
        except OSError:  # results not written (disk full): the worker says so and ends
            raise
        except Exception as err:  # noqa: BLE001 -- recorded on the runs already
            _train_lanes_alone(job, cfgs, exp_dir, err, options)
    else:
        for cfg, entry in zip(cfgs, job):
            execute_run(cfg, exp_dir, progress=False, setting=entry["setting"],
                        on_iteration=(lambda row, cfg=cfg: hook(cfg, row))
                        if hook is not None else None)


def _train_lanes_alone(job: list[dict], cfgs: list[RunConfig], exp_dir: Path | str,
                       err: Exception, options: dict) -> None:
    """After an error that ended a whole batched job, train each of its lanes alone.

    An exception raised inside the batch (not a lane's own divergence, which ends only that
    lane) may come from one lane's seed or hyperparameters, and it ended every lane: so each
    lane being written is trained again on its own, and only the lanes that fail alone stay
    failed. Not for an error writing results (disk full: the location's fault, every lane
    would hit it) nor for a job of one lane. A lane trained alone has the bits of a job of one
    lane (the batch size changes float rounding); its status says so (``trained_alone``).
    """
    from klppo_bench.errors import DivergenceError
    from klppo_bench.harness.batched import execute_batch
    from klppo_bench.store import error_line

    runs = [RunDir(Path(exp_dir) / "runs" / cfg.run_id()) for cfg in cfgs]
    writing = [i for i, entry in enumerate(job) if entry.get("write", True)]
    if (len(job) < 2 or isinstance(err, (OSError, DivergenceError))
            or any(runs[i].state() == "done" for i in writing)):
        return  # one lane's own failure, or one the other lanes would share
    why = f"its batched job failed ({error_line(err)})"
    for i in writing:
        execute_batch([cfgs[i]], exp_dir, settings=[job[i]["setting"]], **options)
        status = runs[i].status()
        if status is not None:
            runs[i].set_status(status["state"], trained_alone=why)


def _open_loggers(log: dict | None, runs: list, exp_dir: Path | str):
    if not log:  # no logger: klppo_bench.loggers is not even imported
        return contextlib.nullcontext()
    from klppo_bench.loggers import open_loggers

    return open_loggers(log, runs, exp_dir)


def record_lost(job: list[dict], exp_dir: Path | str, reason: str) -> list[dict]:
    """Statuses for a job whose worker died: unfinished runs are recorded as failed."""
    out = []
    for entry in (e for e in job if e.get("write", True)):
        run = RunDir(Path(exp_dir) / "runs" / RunConfig.from_dict(entry["config"]).run_id())
        if run.state() not in ("done", "failed"):
            run.fail(reason)
        out.append(run_status(exp_dir, entry))
    return out

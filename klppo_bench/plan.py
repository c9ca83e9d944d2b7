"""Runs -> jobs: the one place that chooses each run's engine and packs lanes into jobs.

``klppo-bench run`` and ``klppo-bench sweep`` both call :func:`choose_engine`. The batched
engine takes every run it can (it runs the variant's own loss module for all lanes at once,
and is faster even for one seed: README "Speed"); the reference engine (torchrl's modules,
one run per process) takes the rest, and the reason is said in one line.

A batched job holds lanes that share everything but the seed, the variant's parameter values
and ``train.lr``, and whose loss modules agree in everything that is not a tensor
(:func:`klppo_bench.harness.batched.lane_key`): the seeds of one setting and, as well, the
settings of a ``dtarg x increment`` grid or PPO Table 1's rows of one loss class.
"""

from __future__ import annotations

from typing import Protocol

from klppo_bench.config import RunConfig
from klppo_bench.errors import ConfigError

ENGINES = ("auto", "batched", "reference")
MAX_LANES_PER_PROCESS = 32


def choose_engine(cfg: RunConfig, requested: str = "auto", where: str = "") -> tuple[str, str | None]:
    """``(engine, reason)``: the engine that runs ``cfg`` and, when it is not the batched
    engine under ``auto``, why (one line naming the variant and what blocks batching).

    Raises:
        ConfigError: ``requested`` is not an engine, ``batched`` for a config the batched
            engine cannot run, or a loss that ``cfg``'s parameters fail to build
            (:mod:`klppo_bench.loss_check`: not a reason to fall back to the reference engine).
    """
    from klppo_bench.harness.batched import batch_unsupported_reason
    from klppo_bench.loss_check import check_loss

    if requested not in ENGINES:
        raise ConfigError(f"--engine {requested!r}: allowed: {', '.join(ENGINES)}")
    check_loss(cfg, where)
    if requested == "reference":
        return "reference", None
    reason = batch_unsupported_reason(cfg)
    if reason and requested == "batched":
        raise ConfigError(f"--engine batched: {where}{reason}; allowed: --engine auto or "
                          "reference")
    return ("reference", reason) if reason else ("batched", None)


class _Planned(Protocol):
    config: RunConfig
    setting: str
    run_id: str

    def job_entry(self) -> dict: ...


def plan_jobs(runs: list[_Planned], engine: str = "auto", lanes_per_process: int | None = None,
              workers: int = 1) -> tuple[list[list[dict]], dict[str, str]]:
    """Group runs into jobs; return ``(jobs, reasons)``.

    Each job is a list of job entries (``run.job_entry()`` plus ``engine`` and ``run_id``).
    Runs with one lane key form a group; a group is split evenly into jobs of at most
    ``lanes_per_process`` lanes, by default an even share of all batched lanes per worker
    (at most 32), so a big group is split rather than left to one worker. A reference-engine run is a job of its own. ``reasons`` maps each
    setting sent to the reference engine under ``auto`` to why (one line).
    """
    from klppo_bench.harness.batched import lane_key

    groups: dict[str, list[_Planned]] = {}
    single: list[_Planned] = []
    reasons: dict[str, str] = {}
    for run in runs:
        chosen, reason = choose_engine(run.config, engine,
                                       where=f"{run.setting} on {run.config.env}: ")
        if chosen == "reference":
            single.append(run)
            if reason:
                reasons.setdefault(run.setting, reason)
            continue
        groups.setdefault(lane_key(run.config), []).append(run)
    size = lanes_per_process
    if size is None:  # an even share of all batched lanes per worker, at most 32
        lanes = sum(len(g) for g in groups.values())
        size = min(MAX_LANES_PER_PROCESS, max(1, -(-lanes // max(1, workers))))
    jobs = []
    for group in groups.values():  # ceil(g / size) jobs whose sizes differ by at most one
        k = -(-len(group) // size)
        bounds = [len(group) * i // k for i in range(k + 1)]
        jobs += [[dict(r.job_entry(), engine="batched", run_id=r.run_id)
                  for r in group[a:b]] for a, b in zip(bounds, bounds[1:])]
    jobs += [[dict(r.job_entry(), engine="reference", run_id=r.run_id)] for r in single]
    return jobs, reasons


def describe_job(job: list[dict]) -> str:
    """One line: the job's engine and its lanes (settings and seeds)."""
    by_setting: dict[str, list[int]] = {}
    for entry in job:
        by_setting.setdefault(entry["setting"], []).append(entry["config"]["seed"])
    lanes = "; ".join(f"{s} seeds {','.join(map(str, seeds))}" for s, seeds in by_setting.items())
    env = job[0]["config"]["env"]
    return f"{job[0]['engine']:9} {len(job):2} lane{'s' if len(job) > 1 else ' '}  {env}  {lanes}"

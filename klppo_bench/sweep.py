"""``klppo-bench sweep``: run every run of an experiment spec that is not done yet.

The spec is expanded and validated by :mod:`klppo_bench.spec`, the runs are packed into jobs by
:mod:`klppo_bench.plan` (which also chooses each job's engine), and a backend
(:mod:`klppo_bench.backends`) executes the jobs. Finished runs are never redone: a rerun of the
same command resumes where an interrupted sweep stopped. Before training, the sweep records the
spec as the experiment's current definition (``spec.yaml``, ``manifest.json``:
:mod:`klppo_bench.manifest`); the report uses only that definition's runs, and both the sweep
and its ``--dry-run`` list the runs on disk that are not part of it.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
from pathlib import Path
from typing import Iterator

import yaml

from klppo_bench.config import frames_note
from klppo_bench.errors import ConfigError
from klppo_bench.loggers import LogTarget, log_target, parse_loggers, prepare
from klppo_bench.plan import MAX_LANES_PER_PROCESS, plan_jobs
from klppo_bench.spec import PlannedRun, _bad, expand, load_spec


def run_state(exp_dir: Path, run_id: str) -> str:
    """done | failed | running | pending | missing | unreadable (from the run's status.json).
    A run that failed because its results could not be written (disk full: ``retry`` in its
    status) is ``pending``: the next sweep runs it again, without ``--retry-failed``. An
    unreadable status (damaged in any way) is trained again."""
    from klppo_bench.store import RunDir

    run = RunDir(exp_dir / "runs" / run_id)
    status = run.status()
    if isinstance(status, dict) and status.get("state") == "failed" and status.get("retry"):
        return "pending"
    state = run.state()
    if state is not None:
        return state
    return "unreadable" if run.status_problem() else "missing"


def _print_unreadable(exp_dir: Path, runs: list[PlannedRun], states: dict[str, str]) -> None:
    """One line per run whose status.json is damaged: it will be trained again."""
    from klppo_bench.store import RunDir

    for r in runs:
        if states[r.run_id] == "unreadable":
            run = RunDir(exp_dir / "runs" / r.run_id)
            print(f"run {r.run_id}: {run.path / 'status.json'} is unreadable "
                  f"({run.status_problem()}); will retrain")


def needs_run(state: str, retry_failed: bool) -> bool:
    return state != "done" and (state != "failed" or retry_failed)


@contextlib.contextmanager
def sweep_lock(exp_dir: Path) -> Iterator[None]:
    """One sweep per experiment directory at a time (runs have a single writer)."""
    import fcntl

    exp_dir.mkdir(parents=True, exist_ok=True)
    with open(exp_dir / ".sweep.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise ConfigError(f"{exp_dir}: another sweep is running on it (pid "
                              f"{f.read().strip() or '?'}); allowed: one sweep at a time")
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


def _check_args(args) -> None:
    if args.workers is not None and args.workers < 1:
        raise _bad("--workers", args.workers, "int >= 1")
    spp = getattr(args, "seeds_per_process", None)
    if spp is not None and not 1 <= spp <= MAX_LANES_PER_PROCESS:
        raise _bad("--seeds-per-process", spp, f"int from 1 to {MAX_LANES_PER_PROCESS}")
    every = getattr(args, "checkpoint_every", None)
    if every is not None and every < 1:
        raise _bad("--checkpoint-every", every, "int >= 1")
    interval = getattr(args, "progress_interval", 30.0)
    if not math.isfinite(interval) or interval < 0:
        raise _bad("--progress-interval", interval, "a finite number of seconds >= 0 (0: a "
                   "line at every iteration)")
    for flag in ("ray_address", "ray_storage"):
        if getattr(args, flag, None) and args.backend != "ray":
            raise ConfigError(f"--{flag.replace('_', '-')} applies to --backend ray only; "
                              "allowed: --backend ray")
    if args.backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ConfigError("--backend ray: ray is not installed; allowed: --backend local, "
                              "or pip install 'klppo-bench[ray]'")


def _print_frames(runs: list[PlannedRun]) -> None:
    for note in dict.fromkeys(frames_note(r.config) for r in runs):
        if note:
            print(note)


def _definition(spec, runs: list[PlannedRun], exp_dir: Path) -> dict:
    """The manifest this sweep makes current (see :mod:`klppo_bench.manifest`)."""
    from klppo_bench.manifest import build_manifest, read_manifest

    try:
        previous = read_manifest(exp_dir)
    except ConfigError:  # a damaged manifest is replaced by this sweep's
        previous = None
    return build_manifest(spec.name, spec.resolved(),
                          [(r.run_id, r.setting, r.config.to_dict()) for r in runs],
                          previous=previous)


def _record_definition(spec, runs: list[PlannedRun], exp_dir: Path, write: bool = True) -> bool:
    """Make this spec the experiment's definition: write ``spec.yaml`` and ``manifest.json``
    where they differ (a rerun of a finished sweep touches nothing). Returns whether one
    differs; with ``write=False`` only checks."""
    import json

    from klppo_bench.manifest import MANIFEST, write_manifest
    from klppo_bench.store import atomic_write_bytes

    made = _definition(spec, runs, exp_dir)
    # the spec as swept, its envs extended by those the manifest keeps from earlier sweeps
    spec_text = yaml.safe_dump(made["spec"], sort_keys=False).encode()
    manifest = json.loads(json.dumps(made, default=str))
    changed = []
    if not (exp_dir / "spec.yaml").is_file() or (exp_dir / "spec.yaml").read_bytes() != spec_text:
        changed.append(lambda: atomic_write_bytes(exp_dir / "spec.yaml", spec_text))
    try:
        same = json.loads((exp_dir / MANIFEST).read_text()) == manifest
    except (OSError, ValueError):
        same = False
    if not same:
        changed.append(lambda: write_manifest(exp_dir, manifest))
    if write:
        for step in changed:
            step()
    return bool(changed)


def _print_left_out(exp_dir: Path, manifest: dict) -> None:
    """The runs on disk that are not part of this definition, grouped by what differs."""
    from klppo_bench.manifest import disk_runs, partition

    if not (exp_dir / "runs").is_dir():
        return
    _, left_out = partition(manifest, disk_runs(exp_dir))
    if left_out:
        n = sum(len(g.run_ids) for g in left_out)
        print(f"{n} run{'s' * (n != 1)} in {exp_dir / 'runs'} not part of this definition (they "
              "stay on disk; the report leaves them out, `report --all-definitions` shows them):")
        for group in left_out:
            print(f"  {group.line()}")


def _print_plan(runs: list[PlannedRun], states: dict[str, str], retry_failed: bool,
                exp_dir: Path | None = None) -> None:
    from klppo_bench.store import RunDir, progress_text

    _print_frames(runs)
    width = max(len(r.setting) for r in runs)
    for r in runs:
        state = states[r.run_id]
        action = "run" if needs_run(state, retry_failed) else "skip"
        progress = ""
        if state == "running" and exp_dir is not None:
            progress = "  " + progress_text(RunDir(exp_dir / "runs" / r.run_id).status())
        print(f"{action:4}  {state:10}  {r.config.env:24}  {r.setting:{width}}  "
              f"seed {r.config.seed:<3}  {r.run_id}{progress.rstrip()}")


def _summary(name: str, runs: list[PlannedRun], states: dict[str, str], ran: int) -> str:
    counts = {s: sum(v == s for v in states.values()) for s in ("done", "failed")}
    other = len(runs) - counts["done"] - counts["failed"]
    if not ran and counts["done"] == len(runs):
        return f"sweep {name}: all {len(runs)} runs are done; nothing to run"
    text = (f"sweep {name}: {len(runs)} runs: {counts['done']} done, {counts['failed']} failed"
            + (f", {other} not finished" if other else "") + f" ({ran} run now)")
    return text


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main_sweep(args) -> int:
    """``klppo-bench sweep``: validate the spec, skip done runs, run the rest, summarize.

    Returns 0 when every run of the spec is done, 1 when some failed (listed on stderr).
    """
    _check_args(args)
    spec = load_spec(args.spec, envs=args.env, seeds=args.seeds, frames=args.frames,
                     plugins=tuple(args.plugin), device=args.device)
    runs = expand(spec)
    exp_dir = Path(args.results) / spec.name
    from klppo_bench.store import check_output_dir

    check_output_dir(exp_dir, "--results")
    cli_loggers = getattr(args, "logger", None)  # --logger replaces the spec's loggers
    log = log_target(parse_loggers(cli_loggers, "--logger") if cli_loggers else spec.loggers,
                     getattr(args, "log_dir", None), exp_dir, spec.name,
                     where="--logger" if cli_loggers else f"{spec.path}: loggers:")
    if args.dry_run:
        states = {r.run_id: run_state(exp_dir, r.run_id) for r in runs}
        _print_unreadable(exp_dir, runs, states)
        _print_plan(runs, states, args.retry_failed, exp_dir)
        _print_jobs(runs, args, states)
        _print_left_out(exp_dir, _definition(spec, runs, exp_dir))
        todo = sum(needs_run(s, args.retry_failed) for s in states.values())
        print(f"{len(runs)} runs in {exp_dir}: {len(runs) - todo} skipped, {todo} to run "
              "(dry run: nothing written)")
        return 0

    _print_frames(runs)
    _print_left_out(exp_dir, _definition(spec, runs, exp_dir))
    states = {r.run_id: run_state(exp_dir, r.run_id) for r in runs}
    _print_unreadable(exp_dir, runs, states)
    if not any(needs_run(state, args.retry_failed) for state in states.values()):
        if _record_definition(spec, runs, exp_dir, write=False):
            with sweep_lock(exp_dir):  # nothing to run, but this spec is the definition now
                _record_definition(spec, runs, exp_dir)
        return _finish(spec.name, runs, exp_dir, ran=0)
    # SIGTERM (a scheduler's stop, `kill`) stops the sweep like Ctrl-C: workers are ended,
    # finished runs are kept, and the same command resumes.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    prepare(log)
    with sweep_lock(exp_dir):
        todo = [r for r in runs if needs_run(run_state(exp_dir, r.run_id), args.retry_failed)]
        _record_definition(spec, runs, exp_dir)
        if getattr(args, "checkpoint_every", None) is None:
            args.checkpoint_every = spec.checkpoint_every
        _execute(runs, todo, exp_dir, args, log)
        _drop_stale_checkpoints(runs, exp_dir, keep=getattr(args, "keep_checkpoints", False))
    return _finish(spec.name, runs, exp_dir, ran=len(todo))


def _drop_stale_checkpoints(runs: list[PlannedRun], exp_dir: Path, keep: bool) -> None:
    """Once every run of the spec is done, checkpoints left by jobs planned another way (an
    earlier ``--workers`` or ``--lanes-per-process``: other lanes, another file) serve no
    job any more; they are deleted unless ``keep``."""
    if keep or any(run_state(exp_dir, r.run_id) != "done" for r in runs):
        return
    for pattern in ("job-*.pt", ".job-*.tmp"):  # and temporaries of a save that was killed
        for path in (exp_dir / "checkpoints").glob(pattern):
            path.unlink(missing_ok=True)


def _print_reasons(reasons: dict[str, str]) -> None:
    for setting, reason in reasons.items():
        print(f"{setting}: reference engine: {reason}")


def _print_jobs(runs: list[PlannedRun], args, states: dict[str, str]) -> None:
    """The jobs the same command without --dry-run starts (as :func:`_execute` plans them:
    over the whole spec, a job whose runs are all done dropped), and which runs each writes."""
    from klppo_bench.backends import default_workers
    from klppo_bench.plan import describe_job

    jobs, reasons = plan_jobs(runs, getattr(args, "engine", "auto"),
                              getattr(args, "seeds_per_process", None),
                              args.workers or default_workers())
    _print_reasons(reasons)
    todo = [[needs_run(states[e["run_id"]], args.retry_failed) for e in job] for job in jobs]
    started = [(job, writes) for job, writes in zip(jobs, todo) if any(writes)]
    done = len(jobs) - len(started)
    if done:
        print(f"{len(started)} jobs:" + (f" ({done} more planned, all of their runs done)"
                                          if started else f" (all {done} planned jobs done)"))
    else:
        print(f"{len(started)} jobs:")
    for i, (job, writes) in enumerate(started):
        print(f"  job {i + 1:<3} {describe_job(job)}")
        if not all(writes):
            print(f"          trains all {len(job)} lanes again (the same bits), writes "
                  f"{sum(writes)}: the lanes' runs not done")


def _execute(runs: list[PlannedRun], todo: list[PlannedRun], exp_dir: Path, args,
             log: LogTarget | None = None) -> None:
    from klppo_bench.backends import default_workers, make_backend
    from klppo_bench.backends.progress import SweepProgress

    # Jobs are planned over the whole spec, so the same command always batches the same
    # seeds together. A job with nothing to do is dropped; a partly finished one trains its
    # whole original batch again (from its checkpoint, if it has one) and writes only the
    # missing seeds, because the batch size S changes float rounding: resumed runs get the
    # bits of an uninterrupted sweep.
    todo_ids = {r.run_id for r in todo}
    planned, reasons = plan_jobs(runs, getattr(args, "engine", "auto"),
                                 getattr(args, "seeds_per_process", None),
                                 args.workers or default_workers())
    _print_reasons(reasons)
    options = {"checkpoint_every": getattr(args, "checkpoint_every", None),
               "keep_checkpoints": getattr(args, "keep_checkpoints", False),
               "log": log.to_dict() if log else None}
    jobs = [[dict(e, write=e["run_id"] in todo_ids, **options) for e in job] for job in planned]
    jobs = [job for job in jobs if any(e["write"] for e in job)]
    workers = min(args.workers or default_workers(), len(jobs))
    progress = SweepProgress(todo, workers, interval=getattr(args, "progress_interval", 30.0))
    backend = make_backend(args.backend, exp_dir.resolve(), workers=workers,
                           ray_address=args.ray_address,
                           on_event=progress.on_event,
                           ray_storage=getattr(args, "ray_storage", None) or "auto")
    batched = sum(e["write"] for j in jobs if j[0]["engine"] == "batched" for e in j)
    if log:
        print(log.describe())
    progress.start(f"{args.backend} backend, {workers} worker{'s' * (workers > 1)}, "
                   f"{len(jobs)} jobs ({batched} of {len(todo)} runs on the batched engine)")
    try:
        for status in backend.run(jobs):
            progress.on_status(status)
    except KeyboardInterrupt:
        progress.close()
        print(f"sweep interrupted after {progress.finished} of {len(todo)} runs; the same "
              "command resumes it (finished runs are kept)", file=sys.stderr)
        raise
    finally:
        progress.close()


def _finish(name: str, runs: list[PlannedRun], exp_dir: Path, ran: int) -> int:
    from klppo_bench.store import RunDir

    states = {r.run_id: run_state(exp_dir, r.run_id) for r in runs}
    print(_summary(name, runs, states, ran) + f"; results in {exp_dir}")
    failed = [r for r in runs if states[r.run_id] == "failed"]
    for r in failed:
        error = (RunDir(exp_dir / "runs" / r.run_id).status() or {}).get("error")
        print(f"  failed: {r.run_id}  {r.setting}  {r.config.env}  seed {r.config.seed}: "
              f"{error}", file=sys.stderr)
    if failed and not ran:
        print("  (rerun with --retry-failed to retry them)", file=sys.stderr)
    elif failed:
        print("  (--retry-failed reruns them)", file=sys.stderr)
    for r in runs:  # failed for where they write (disk full): rerun by the next sweep
        status = RunDir(exp_dir / "runs" / r.run_id).status()
        if states[r.run_id] == "pending" and isinstance(status, dict) and status.get("error"):
            print(f"  not finished: {r.run_id}  {r.setting}  {r.config.env}  seed "
                  f"{r.config.seed}: {status['error']} (the next sweep reruns it)",
                  file=sys.stderr)
    unfinished = len(runs) - len(failed) - sum(s == "done" for s in states.values())
    return 1 if failed or unfinished else 0


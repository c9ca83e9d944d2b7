"""Experiment specs: a YAML file -> fully resolved, validated runs; and ``klppo-bench sweep``.

A spec (``experiments/*.yaml``)::

    name: dtarg_increment          # results go to <results>/<name>/ (default: the file's stem)
    description: free text
    envs: [Hopper]                 # gymnasium ids or families (Hopper -> Hopper-v5)
    seeds: 10                      # a count (seeds 0..9) or a list of seeds
    frames: 1000000
    variants:                      # short form: [clip, klpen-fixed] (names at their defaults)
      - name: clip                 # a registry name, at its defaults
      - name: klpen-adaptive
        params:                    # a scalar fixes a parameter, a list is a grid axis
          dtarg: [0.003, 0.01, 0.03]
          increment: [1.5, 2.0, 4.0]
        derived:                   # computed per grid point from another parameter
          decrement: {reciprocal: increment}
        label: ...                 # optional: replaces the variant name in setting labels
    train: {steps_per_iter: 2048}  # fixed harness overrides (the keys of --set train.x=...)
    model: {hidden: [64, 64]}
    eval: {every: 50000}
    plugins: [my_package.variants] # modules (or .py paths, relative to this file's folder)
                                   # that register user variants

Every run is validated with :func:`~klppo_bench.config.build_run_config` before anything is
written, so a bad value anywhere in a grid fails up front. A run's *setting* label is the
variant name (or ``label``) plus the grid axes of its entry, e.g.
``klpen-adaptive(dtarg=0.003,increment=1.5)``; the report groups runs by (env, setting) and
treats seeds as repetitions. Runs are ordered seed-major, so an interrupted sweep has every
setting at the first seeds done first.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from klppo_bench.config import (
    SECTIONS,
    RunConfig,
    build_run_config,
    frames_note,
    resolve_env_id,
    set_section_value,
)
from klppo_bench.errors import ConfigError
from klppo_bench.plan import ENGINES, MAX_LANES_PER_PROCESS, plan_jobs  # noqa: F401
from klppo_bench.variants import get_variant, load_plugins
from klppo_bench.variants.registry import plugin_target

TOP_KEYS = ("name", "description", "envs", "seeds", "frames", "variants", "train", "model",
            "eval", "plugins")
VARIANT_KEYS = ("name", "params", "derived", "label")
DERIVED_OPS = {"reciprocal": lambda x: 1.0 / x}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its resolved config and its setting label."""

    config: RunConfig
    setting: str

    @property
    def run_id(self) -> str:
        return self.config.run_id()

    def job_entry(self) -> dict:
        """What a worker receives (plain data: no pickled classes)."""
        return {"config": self.config.to_dict(), "setting": self.setting}


@dataclass
class Spec:
    """A loaded, type-checked spec with the command-line overrides applied."""

    path: Path
    name: str
    envs: list[str]
    """Resolved gymnasium ids."""
    seeds: list[int]
    frames: int | None
    variants: list[dict]
    """Entries with keys name, params, derived, label (all present)."""
    overrides: dict = field(default_factory=dict)
    """Fixed harness overrides, ``{"train.epochs": 5}``."""
    plugins: tuple[str, ...] = ()
    device: str = "cpu"
    description: str = ""

    def resolved(self) -> dict:
        """The spec as it was run (written to ``<results>/<name>/spec.yaml``)."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out.update(envs=list(self.envs), seeds=list(self.seeds), frames=self.frames,
                   device=self.device)
        out["variants"] = [{k: v for k, v in e.items() if v} for e in self.variants]
        for section in SECTIONS:
            values = {k.split(".", 1)[1]: v for k, v in self.overrides.items()
                      if k.startswith(section + ".")}
            if values:
                out[section] = values
        if self.plugins:
            out["plugins"] = list(self.plugins)
        return out


def _bad(where: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{where}={value!r} is invalid; allowed: {allowed}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_keys(mapping: Any, allowed: tuple[str, ...], where: str) -> dict:
    if not isinstance(mapping, dict):
        raise _bad(where, mapping, "a mapping with keys " + ", ".join(allowed))
    for key in mapping:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}; allowed: {', '.join(allowed)}")
    return mapping


def _seed_list(raw: Any, where: str) -> list[int]:
    allowed = "a count (int >= 1) or a non-empty list of distinct ints >= 0"
    if _is_int(raw):
        if raw < 1:
            raise _bad(where, raw, allowed + " (empty grid)")
        return list(range(raw))
    if isinstance(raw, list) and raw and all(_is_int(s) and s >= 0 for s in raw) \
            and len(set(raw)) == len(raw):
        return list(raw)
    raise _bad(where, raw, allowed + (" (empty grid)" if raw == [] else ""))


def _frames(raw: Any, where: str) -> int:
    if not _is_int(raw) or raw < 1:
        raise _bad(where, raw, "int >= 1 (write 1000000, not 1e6)")
    return raw


def _variant_entry(raw: Any, where: str) -> dict:
    if isinstance(raw, str):  # the short form: a plain name, at the variant's defaults
        raw = {"name": raw}
    elif not isinstance(raw, dict):
        raise _bad(where, raw, "a variant name or a mapping with keys " + ", ".join(VARIANT_KEYS))
    entry = _check_keys(raw, VARIANT_KEYS, where)
    if "name" not in entry:
        raise ConfigError(f"{where}: missing key 'name'; allowed: a registered variant name")
    variant = get_variant(entry["name"], where=f"{where}.name")
    params = entry.get("params") or {}
    _check_keys(params, tuple(variant.params) + tuple(variant.aliases), f"{where}.params")
    params = {variant.aliases.get(k, k): v for k, v in params.items()}  # canonical names
    for key, value in params.items():
        if isinstance(value, list):
            if not value:
                raise _bad(f"{where}.params.{key}", value, "a non-empty list (empty grid)")
            if any(isinstance(v, (list, dict)) for v in value):
                raise _bad(f"{where}.params.{key}", value, "a scalar or a list of scalars")
        elif isinstance(value, dict) or value is None:
            raise _bad(f"{where}.params.{key}", value, "a scalar or a list of scalars")
    derived = entry.get("derived") or {}
    _check_keys(derived, tuple(k for k in variant.params if k not in params), f"{where}.derived")
    for key, rule in derived.items():
        rule_where = f"{where}.derived.{key}"
        _check_keys(rule, tuple(DERIVED_OPS), rule_where)
        if len(rule) != 1 or next(iter(rule.values())) not in params:
            raise _bad(rule_where, rule, "one rule {op: parameter} whose parameter is set in "
                       f"params ({', '.join(params) or 'none set'}); ops: {', '.join(DERIVED_OPS)}")
    label = entry.get("label") or ""
    if not isinstance(label, str) or (label and not _NAME.fullmatch(label)):
        raise _bad(f"{where}.label", label, "a name of letters, digits, _ . -")
    return {"name": entry["name"], "params": dict(params), "derived": dict(derived),
            "label": label}


def load_spec(path: str | Path, envs: list[str] | None = None, seeds: int | None = None,
              frames: int | None = None, plugins: tuple[str, ...] = (),
              device: str = "cpu") -> Spec:
    """Read and type-check a spec; ``envs``/``seeds``/``frames`` replace the spec's values.

    Raises:
        ConfigError: naming the file, the key and the allowed values.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such spec file; allowed: a YAML file such as "
                          "experiments/bench.yaml") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{at}: {problem}") from None
    where = str(path)
    spec = _check_keys(raw if raw is not None else {}, TOP_KEYS, where)
    name = spec.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _bad(f"{where}: name", name, "a directory name of letters, digits, _ . -")
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise _bad(f"{where}: description", description, "a string")
    spec_plugins = spec.get("plugins", [])
    if not isinstance(spec_plugins, list) or not all(isinstance(p, str) for p in spec_plugins):
        raise _bad(f"{where}: plugins", spec_plugins,
                   "a list of .py paths (relative to the spec's folder) or module names")
    # the spec's paths are relative to its own folder; --plugin paths to the current directory
    load_plugins(spec_plugins, where=f"{where}: plugins:", base=path.parent)
    load_plugins(plugins)
    spec_plugins = [plugin_target(p, base=path.parent) for p in spec_plugins]
    all_plugins = tuple(dict.fromkeys([*spec_plugins, *plugins]))

    if envs:
        env_ids = [resolve_env_id(e, where="--env") for e in envs]
    else:
        raw_envs = spec.get("envs")
        if not isinstance(raw_envs, list) or not raw_envs \
                or not all(isinstance(e, str) for e in raw_envs):
            raise _bad(f"{where}: envs", raw_envs,
                       "a non-empty list of gymnasium ids or families, e.g. [Hopper]"
                       + (" (empty grid)" if raw_envs == [] else ""))
        env_ids = [resolve_env_id(e, where=f"{where}: envs") for e in raw_envs]
    if seeds is not None:
        seed_list = _seed_list(seeds, "--seeds")
    elif "seeds" in spec:
        seed_list = _seed_list(spec["seeds"], f"{where}: seeds")
    else:
        raise ConfigError(f"{where}: missing key 'seeds'; allowed: a count or a list of seeds")
    if frames is not None:
        n_frames = _frames(frames, "--frames")
    else:
        n_frames = _frames(spec["frames"], f"{where}: frames") if "frames" in spec else None

    overrides = {}
    for section, cls in SECTIONS.items():
        values = spec.get(section) or {}
        _check_keys(values, tuple(f.name for f in cls.__dataclass_fields__.values()),
                    f"{where}: {section}")
        for key, value in values.items():
            set_section_value(cls(), section, key, value, where)  # type/range check now
            overrides[f"{section}.{key}"] = value

    raw_variants = spec.get("variants")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise _bad(f"{where}: variants", raw_variants,
                   "a non-empty list of variant names or {name: <variant>, params: {...}} "
                   "entries"
                   + (" (empty grid)" if raw_variants == [] else ""))
    variants = [_variant_entry(e, f"{where}: variants[{i}]") for i, e in enumerate(raw_variants)]
    return Spec(path=path, name=name, envs=list(dict.fromkeys(env_ids)), seeds=seed_list,
                frames=n_frames, variants=variants, overrides=overrides,
                plugins=all_plugins, device=device, description=description)


def _fmt(value: Any) -> str:
    if isinstance(value, float) and not value.is_integer() and float(f"{value:g}") == value:
        return f"{value:g}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def _grid_points(entry: dict, where: str) -> Iterator[tuple[dict, list[str]]]:
    """(loss overrides, grid axes) for each point of one variant entry's grid."""
    params = entry["params"]
    axes = [k for k, v in params.items() if isinstance(v, list)]
    for values in itertools.product(*(params[k] for k in axes)):
        point = {**params, **dict(zip(axes, values))}
        for key, rule in entry["derived"].items():
            (op, source), = rule.items()
            x = point[source]
            if not isinstance(x, (int, float)) or isinstance(x, bool) or x == 0:
                raise _bad(f"{where}.derived.{key}", f"{op} of {source}={x!r}",
                           f"{op} of a non-zero number")
            point[key] = DERIVED_OPS[op](x)
        yield point, axes


def _planned_run(spec: Spec, i: int, env: str, seed: int, point: dict,
                 axes: list[str]) -> PlannedRun:
    entry, where = spec.variants[i], f"{spec.path}: variants[{i}]"
    try:
        cfg = build_run_config(entry["name"], env, seed, frames=spec.frames, device=spec.device,
                               overrides={**spec.overrides, **point}, plugins=spec.plugins,
                               where=f"{where}.params", resolve_env=False)
    except ConfigError as err:  # cross-field checks (frames vs steps_per_iter) name no file
        if str(err).startswith(str(spec.path)):
            raise
        raise ConfigError(f"{spec.path}: {err}") from None
    grid = ",".join(f"{k}={_fmt(cfg.loss[k])}" for k in axes)
    return PlannedRun(cfg, (entry["label"] or entry["name"]) + (f"({grid})" if axes else ""))


def expand(spec: Spec) -> list[PlannedRun]:
    """Every run of ``spec``, validated, in execution order (seed-major).

    Raises:
        ConfigError: a bad value in any grid point, or two different runs sharing a setting.
    """
    runs: list[PlannedRun] = []
    owner: dict[tuple, int] = {}  # (env, setting, seed) -> variant entry
    ids: set[str] = set()
    for seed in spec.seeds:
        for env in spec.envs:
            for i, entry in enumerate(spec.variants):
                where = f"{spec.path}: variants[{i}]"
                for point, axes in _grid_points(entry, where):
                    run = _planned_run(spec, i, env, seed, point, axes)
                    key = (env, run.setting, seed)
                    if run.run_id in ids:
                        raise ConfigError(f"{where}: run {run.run_id} ({run.setting}) is "
                                          "defined twice; allowed: distinct configs")
                    if key in owner:
                        raise ConfigError(
                            f"{where}: setting {run.setting!r} names two different configs "
                            f"(also variants[{owner[key]}]); allowed: distinct labels "
                            "(add label: to an entry)")
                    owner[key] = i
                    ids.add(run.run_id)
                    runs.append(run)
    return runs


# ---------------------------------------------------------------- the sweep command

def run_state(exp_dir: Path, run_id: str) -> str:
    """done | failed | running | pending | missing (from the run's status.json)."""
    from klppo_bench.store import RunDir

    return RunDir(exp_dir / "runs" / run_id).state() or "missing"


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
    if args.ray_address and args.backend != "ray":
        raise ConfigError("--ray-address applies to --backend ray only; allowed: --backend ray")
    if args.backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ConfigError("--backend ray: ray is not installed; allowed: --backend local, "
                              "or pip install 'klppo-bench[ray]'")


def _print_plan(runs: list[PlannedRun], states: dict[str, str], retry_failed: bool) -> None:
    for note in dict.fromkeys(frames_note(r.config) for r in runs):
        if note:
            print(note)
    width = max(len(r.setting) for r in runs)
    for r in runs:
        state = states[r.run_id]
        action = "run" if needs_run(state, retry_failed) else "skip"
        print(f"{action:4}  {state:8}  {r.config.env:24}  {r.setting:{width}}  "
              f"seed {r.config.seed:<3}  {r.run_id}")


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
    if args.dry_run:
        states = {r.run_id: run_state(exp_dir, r.run_id) for r in runs}
        _print_plan(runs, states, args.retry_failed)
        _print_jobs(runs, args)
        todo = sum(needs_run(s, args.retry_failed) for s in states.values())
        print(f"{len(runs)} runs in {exp_dir}: {len(runs) - todo} skipped, {todo} to run "
              "(dry run: nothing written)")
        return 0

    if not any(needs_run(run_state(exp_dir, r.run_id), args.retry_failed) for r in runs):
        return _finish(spec.name, runs, exp_dir, ran=0)
    # SIGTERM (a scheduler's stop, `kill`) stops the sweep like Ctrl-C: workers are ended,
    # finished runs are kept, and the same command resumes.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    with sweep_lock(exp_dir):
        from klppo_bench.store import atomic_write_bytes

        todo = [r for r in runs if needs_run(run_state(exp_dir, r.run_id), args.retry_failed)]
        atomic_write_bytes(exp_dir / "spec.yaml",
                           yaml.safe_dump(spec.resolved(), sort_keys=False).encode())
        _execute(runs, todo, exp_dir, args)
    return _finish(spec.name, runs, exp_dir, ran=len(todo))


def _print_reasons(reasons: dict[str, str]) -> None:
    for setting, reason in reasons.items():
        print(f"{setting}: reference engine: {reason}")


def _print_jobs(runs: list[PlannedRun], args) -> None:
    from klppo_bench.backends import default_workers
    from klppo_bench.plan import describe_job

    jobs, reasons = plan_jobs(runs, getattr(args, "engine", "auto"),
                              getattr(args, "seeds_per_process", None),
                              args.workers or default_workers())
    _print_reasons(reasons)
    print(f"{len(jobs)} jobs:")
    for i, job in enumerate(jobs):
        print(f"  job {i + 1:<3} {describe_job(job)}")


def _execute(runs: list[PlannedRun], todo: list[PlannedRun], exp_dir: Path, args) -> None:
    from klppo_bench.backends import default_workers, make_backend
    from klppo_bench.backends.progress import SweepProgress

    # Jobs are planned over the whole spec, so the same command always batches the same
    # seeds together. A job with nothing to do is dropped; a partly finished one trains its
    # whole original batch again and writes only the missing seeds, because the batch size S
    # changes float rounding: resumed runs get the bits of an uninterrupted sweep.
    todo_ids = {r.run_id for r in todo}
    planned, reasons = plan_jobs(runs, getattr(args, "engine", "auto"),
                                 getattr(args, "seeds_per_process", None),
                                 args.workers or default_workers())
    _print_reasons(reasons)
    jobs = [[dict(e, write=e["run_id"] in todo_ids) for e in job] for job in planned]
    jobs = [job for job in jobs if any(e["write"] for e in job)]
    workers = min(args.workers or default_workers(), len(jobs))
    progress = SweepProgress(todo, workers)
    backend = make_backend(args.backend, exp_dir.resolve(), workers=workers,
                           ray_address=args.ray_address,
                           on_event=progress.on_event if progress.live else None)
    batched = sum(e["write"] for j in jobs if j[0]["engine"] == "batched" for e in j)
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
    unfinished = len(runs) - len(failed) - sum(s == "done" for s in states.values())
    return 1 if failed or unfinished else 0


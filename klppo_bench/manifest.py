"""The experiment manifest: which runs on disk make up an experiment's current definition.

``klppo-bench sweep`` writes ``<results>/<experiment>/manifest.json`` (atomically, before it
trains anything): the spec as swept and, per environment, every setting's *definition* (its
resolved config without seed and env) and the run ids of its seeds. The report uses only those
runs; runs of earlier definitions (another ``frames``, ``train.epochs``, loss code, ...) stay on
disk and are listed with what differs, so a setting never pools seeds of two definitions. An
experiment directory without a manifest (``klppo-bench run --out``) is reported whole.

The current definition is the spec as last swept. One exception keeps per-environment sweeps
(``make bench ENV=Hopper`` then ``ENV=Walker2d``) whole: a sweep keeps the entries of the
environments it did not sweep when their settings have the same definitions as its own, and
adds them to the ``envs`` of the spec it records (``spec.yaml``, the manifest's ``spec``).

Layout::

    {"format": 1, "experiment": NAME, "spec": {resolved spec as swept},
     "envs": {ENV: {"settings": {SETTING: {"frames": 2048, "train.epochs": 2, ...}},
                    "runs": {RUN_ID: {"setting": SETTING, "seed": 0}}}}}
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from klppo_bench.errors import ConfigError

MANIFEST = "manifest.json"
FORMAT = 1
NOT_DEFINITION = ("seed", "env", "plugins")
"""Config keys that are not part of a definition: the seed (repetitions), the env (tasks), and
the plugin paths (where variants were loaded from; not part of the run id either)."""


def definition(config: Mapping[str, Any]) -> dict[str, Any]:
    """A run config flattened to dotted keys (``train.epochs``), without :data:`NOT_DEFINITION`."""
    out: dict[str, Any] = {}

    def walk(d: Mapping, prefix: str) -> None:
        for key, value in d.items():
            if not prefix and key in NOT_DEFINITION:
                continue
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    walk(config, "")
    return out


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def build_manifest(experiment: str, spec: Mapping, runs: Iterable[tuple[str, str, Mapping]],
                   previous: Mapping | None = None) -> dict:
    """The manifest of a sweep of ``runs`` (``(run_id, setting, config dict)``); ``previous``
    (the manifest on disk) contributes the environments this sweep did not sweep when their
    settings' definitions equal this sweep's, and the spec's ``envs`` then lists them after
    the swept ones (so the experiment's ``spec.yaml`` sweeps all of it again)."""
    envs: dict[str, dict] = {}
    for run_id, setting, config in runs:
        entry = envs.setdefault(config["env"], {"settings": {}, "runs": {}})
        entry["settings"][setting] = definition(config)
        entry["runs"][run_id] = {"setting": setting, "seed": config["seed"]}
    spec = dict(spec)
    if previous and envs:
        ours = _canonical(next(iter(envs.values()))["settings"])
        kept = [env for env, entry in sorted((previous.get("envs") or {}).items())
                if env not in envs and _canonical(entry.get("settings")) == ours]
        for env in kept:
            envs[env] = previous["envs"][env]
        if kept and isinstance(spec.get("envs"), list):
            spec["envs"] = [*spec["envs"], *(e for e in kept if e not in spec["envs"])]
    return {"format": FORMAT, "experiment": experiment, "spec": spec,
            "envs": dict(sorted(envs.items()))}


def write_manifest(exp_dir: Path | str, manifest: Mapping) -> None:
    from klppo_bench.store import atomic_write_json

    atomic_write_json(Path(exp_dir) / MANIFEST, manifest)


def read_manifest(exp_dir: Path | str) -> dict | None:
    """The manifest of an experiment directory, or None where there is none.

    Raises:
        ConfigError: it exists but cannot be read (one line; removing it reports every run).
    """
    path = Path(exp_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not readable ({type(err).__name__}: {err}); allowed: the "
                          f"file a sweep writes (remove it to report every run)") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("envs"), dict):
        raise ConfigError(f"{path}: not a manifest (no envs mapping); allowed: the file a "
                          f"sweep writes (remove it to report every run)")
    return manifest


def manifest_run_ids(manifest: Mapping) -> set[str]:
    return {run_id for entry in manifest["envs"].values() for run_id in entry["runs"]}


# ------------------------------------------------------------------ runs on disk vs manifest

@dataclass(frozen=True)
class DiskRun:
    """A run directory as the definition check sees it (``config`` None: not readable)."""
    run_id: str
    setting: str | None = None
    config: dict | None = None

    @property
    def env(self) -> str | None:
        return (self.config or {}).get("env")


def disk_runs(exp_dir: Path | str) -> list[DiskRun]:
    """Every run directory of an experiment, with its setting label and config."""
    from klppo_bench.store import experiment_runs

    out = []
    for run in experiment_runs(exp_dir):
        try:
            config = run.config()
            if not isinstance(config, dict) or "env" not in config:
                raise ValueError("not a run config")
            status = run.status() or {}
            out.append(DiskRun(run.run_id, status.get("setting") or config.get("variant"),
                               config))
        except Exception:  # noqa: BLE001 -- unreadable: listed as such, never fatal
            out.append(DiskRun(run.run_id))
    return out


_UNSET = object()


def fmt_value(key: str, value: Any) -> str:
    """A definition value in one short token: code hashes shortened, lists comma-joined."""
    if key == "code":
        return "unrecorded" if value is None or value is _UNSET else str(value)[:8]
    if value is _UNSET:
        return "unset"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def differences(this: Mapping, other: Mapping) -> list[tuple[str, Any, Any]]:
    """``[(key, this value, other value)]`` of two definitions, top-level keys first."""
    keys = sorted(set(this) | set(other), key=lambda k: (k.count("."), k))
    return [(k, this.get(k, _UNSET), other.get(k, _UNSET)) for k in keys
            if this.get(k, _UNSET) != other.get(k, _UNSET)]


def _current_settings(manifest: Mapping) -> dict[tuple[str, str], dict]:
    return {(env, s): d for env, entry in manifest["envs"].items()
            for s, d in entry["settings"].items()}


@dataclass
class LeftOut:
    """Runs on disk outside the current definition, for one reason."""
    kind: str
    detail: str
    run_ids: list[str] = field(default_factory=list)
    settings: set[str] = field(default_factory=set)
    values: set = field(default_factory=set)

    def line(self) -> str:
        n = len(self.run_ids)
        runs = f"{n} run{'s' * (n != 1)}"
        names = sorted(self.settings)
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        if self.kind == "definition":
            return f"{runs} of another definition: {self.detail}; settings: {shown}"
        if self.kind == "seed":
            seeds = ", ".join(map(str, sorted(self.values)))
            return f"{runs} at seeds not in this definition: {seeds} ({self.detail}; " \
                   f"settings: {shown})"
        if self.kind == "env":
            return f"{runs} on environments not in this definition: " \
                   f"{', '.join(sorted(self.values))} ({self.detail})"
        if self.kind == "setting":
            return f"{runs} of settings not in this definition: {shown}"
        return f"{runs} not in this definition whose record cannot be read: " \
               + ", ".join(sorted(self.run_ids)[:3]) + (" ..." if n > 3 else "")


def partition(manifest: Mapping, runs: Iterable[DiskRun]) -> tuple[set[str], list[LeftOut]]:
    """``(current run ids, left out)``: the runs on disk that the manifest lists, and the
    others grouped by why they are not part of the current definition."""
    current = manifest_run_ids(manifest)
    settings = _current_settings(manifest)
    envs = sorted(manifest["envs"])
    groups: dict[tuple, LeftOut] = {}

    def add(key: tuple, kind: str, detail: str, run: DiskRun, value: Any = None) -> None:
        group = groups.setdefault(key, LeftOut(kind, detail))
        group.run_ids.append(run.run_id)
        if run.setting:
            group.settings.add(run.setting)
        if value is not None:
            group.values.add(value)

    for run in runs:
        if run.run_id in current:
            continue
        if run.config is None:
            add(("unreadable",), "unreadable", "", run)
            continue
        ours = settings.get((run.env, run.setting))
        if ours is None and any(s == run.setting for _, s in settings):
            add(("env",), "env", f"this definition: {', '.join(envs)}", run, run.env)
        elif ours is None:
            add(("setting",), "setting", "", run)
        else:
            diff = differences(definition(run.config), ours)
            if diff:
                detail = ", ".join(f"{k} {fmt_value(k, a)} (this definition: {fmt_value(k, b)})"
                                   for k, a, b in diff)
                add(("definition", detail), "definition", detail, run)
            else:
                seeds = sorted({r["seed"] for e in manifest["envs"].values()
                                for r in e["runs"].values()})
                detail = "this definition: seeds " + ", ".join(map(str, seeds))
                add(("seed", detail), "seed", detail, run, run.config.get("seed"))
    order = ("definition", "seed", "env", "setting", "unreadable")
    return current, sorted(groups.values(), key=lambda g: (order.index(g.kind), g.detail))


def definition_labels(manifest: Mapping | None, runs: Iterable[DiskRun]) -> dict[str, str]:
    """``{run_id: "clip [frames=1024]"}`` for the runs whose setting label is shared by runs of
    another definition (``report --all-definitions``). The current definition (the
    manifest's; without one, the most common definition of that label) keeps the plain
    label; every other definition gets the label suffixed with its values of the keys that
    differ. Runs that differ from the current definition in the seed only keep the label."""
    current = {s: d for (_, s), d in _current_settings(manifest).items()} if manifest else {}
    by_setting: dict[str, dict[str, tuple[dict, list[str]]]] = {}
    for run in runs:
        if run.config is None or not run.setting:
            continue
        d = definition(run.config)
        entry = by_setting.setdefault(run.setting, {}).setdefault(_canonical(d), (d, []))
        entry[1].append(run.run_id)
    labels = {}
    for setting, sigs in by_setting.items():
        reference = current.get(setting)
        if reference is None:
            counts = Counter({sig: len(ids) for sig, (_, ids) in sigs.items()})
            top = max(counts.values())
            reference = sigs[min(sig for sig, n in counts.items() if n == top)][0]
        for d, ids in sigs.values():
            diff = differences(d, reference)
            if diff:
                suffix = ", ".join(f"{k}={fmt_value(k, a)}" for k, a, _ in diff)
                labels.update({run_id: f"{setting} [{suffix}]" for run_id in ids})
    return labels

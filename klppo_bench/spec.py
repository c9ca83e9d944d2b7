"""Experiment specs: a YAML file -> fully resolved, validated runs with stable run ids.

A spec (``experiments/*.yaml``)::

    name: dtarg_increment          # results go to <results>/<name>/ (default: the file's stem)
    description: free text
    envs: [Hopper]                 # gymnasium ids or families (Hopper -> Hopper-v5)
    seeds: 10                      # a count (seeds 0..9) or a list of seeds
    frames: 1000000
    device: cpu                    # cpu (default), cuda, cuda:N, auto (--device replaces it)
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
    loggers: [tensorboard]         # stream every run's metrics (csv, tensorboard, wandb, mlflow;
                                   # --logger replaces them); not part of any run or run id

Every run is validated with :func:`~klppo_bench.config.build_run_config` before anything is
written, so a bad value anywhere in a grid fails up front. A run's *setting* label is the
variant name (or ``label``) plus the grid axes of its entry, e.g.
``klpen-adaptive(dtarg=0.003,increment=1.5)``; the report groups runs by (env, setting) and
treats seeds as repetitions. Runs are ordered seed-major, so an interrupted sweep has every
setting at the first seeds done first.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from klppo_bench.config import (
    FRAMES_RANGE,
    MAX_FRAMES,
    MAX_SEED,
    SECTIONS,
    RunConfig,
    build_run_config,
    resolve_env_id,
    set_section_value,
)
from klppo_bench.errors import ConfigError
from klppo_bench.labels import setting_label
from klppo_bench.loggers import parse_loggers
from klppo_bench.variants import get_variant, load_plugins
from klppo_bench.variants.registry import plugin_target

TOP_KEYS = ("name", "description", "envs", "seeds", "frames", "device", "variants", "train",
            "model", "eval", "plugins", "loggers", "checkpoint_every")
_DEVICE = re.compile(r"cpu|auto|cuda(:\d+)?")
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
    loggers: tuple[str, ...] = ()
    """Experiment loggers (:mod:`klppo_bench.loggers`); they change no run, so no run id."""
    checkpoint_every: int | None = None
    """Batched jobs checkpoint every N iterations (``None``: about every 5 minutes); changes
    no run, so no run id. ``--checkpoint-every`` replaces it."""

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
    allowed = (f"a count (int >= 1) or a non-empty list of distinct ints >= 0, seeds up to "
               f"{MAX_SEED} (2**32 - 1, numpy's seed range)")
    if _is_int(raw):
        if raw < 1:
            raise _bad(where, raw, allowed + " (empty grid)")
        if raw > MAX_SEED + 1:
            raise _bad(where, raw, allowed)
        return list(range(raw))
    if isinstance(raw, list) and raw and all(_is_int(s) and 0 <= s <= MAX_SEED for s in raw) \
            and len(set(raw)) == len(raw):
        return list(raw)
    raise _bad(where, raw, allowed + (" (empty grid)" if raw == [] else ""))


def _frames(raw: Any, where: str) -> int:
    if not _is_int(raw) or not 1 <= raw <= MAX_FRAMES:
        raise _bad(where, raw, f"{FRAMES_RANGE}; write 1000000, not 1e6")
    return raw


def check_env(env_id: str, where: str) -> None:
    """Refuse an env the harness cannot train (discrete actions, image observations, missing
    package) now, before anything runs (:func:`klppo_bench.harness.env.env_problem`)."""
    from klppo_bench.harness.env import env_problem

    problem = env_problem(env_id)
    if problem:
        raise ConfigError(f"{where}: {env_id}: {problem}")


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


def _read_yaml(path: Path) -> Any:
    """The parsed YAML of a spec file; ConfigError in one line when it cannot be read."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such spec file; allowed: a YAML file such as "
                          "experiments/bench.yaml") from None
    except (OSError, UnicodeDecodeError) as err:  # a directory, unreadable, binary
        why = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else \
            (err.strerror or str(err)).lower()
        raise ConfigError(f"{path}: cannot read the spec ({why}); allowed: a YAML file such "
                          "as experiments/bench.yaml") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{at}: {problem}") from None


def _spec_envs(spec: dict, envs: list[str] | None, where: str) -> list[str]:
    """The env ids of a spec (or of ``--env``), each resolved and checked."""
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
    for env_id in dict.fromkeys(env_ids):
        check_env(env_id, "--env" if envs else f"{where}: envs")
    return env_ids


def load_spec(path: str | Path, envs: list[str] | None = None, seeds: int | None = None,
              frames: int | None = None, plugins: tuple[str, ...] = (),
              device: str | None = None) -> Spec:
    """Read and type-check a spec; ``envs``/``seeds``/``frames``/``device`` replace the
    spec's values (the device defaults to the spec's ``device``, else cpu).

    Raises:
        ConfigError: naming the file, the key and the allowed values.
    """
    path = Path(path)
    raw = _read_yaml(path)
    where = str(path)
    spec = _check_keys(raw if raw is not None else {}, TOP_KEYS, where)
    name = spec.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _bad(f"{where}: name", name, "a directory name of letters, digits, _ . -")
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise _bad(f"{where}: description", description, "a string")
    if device is None:
        device = spec.get("device", "cpu")
        if not isinstance(device, str) or not _DEVICE.fullmatch(device):
            raise _bad(f"{where}: device", device, "cpu, cuda, cuda:N or auto (--device "
                                                    "replaces it)")
    loggers = parse_loggers(spec.get("loggers", []), f"{where}: loggers")
    checkpoint_every = spec.get("checkpoint_every")
    if checkpoint_every is not None and (not _is_int(checkpoint_every) or checkpoint_every < 1):
        raise _bad(f"{where}: checkpoint_every", checkpoint_every, "int >= 1")
    spec_plugins = spec.get("plugins", [])
    if not isinstance(spec_plugins, list) or not all(isinstance(p, str) for p in spec_plugins):
        raise _bad(f"{where}: plugins", spec_plugins,
                   "a list of .py paths (relative to the spec's folder) or module names")
    # the spec's paths are relative to its own folder; --plugin paths to the current directory
    load_plugins(spec_plugins, where=f"{where}: plugins:", base=path.parent)
    load_plugins(plugins)
    spec_plugins = [plugin_target(p, base=path.parent) for p in spec_plugins]
    all_plugins = tuple(dict.fromkeys([*spec_plugins, *plugins]))

    env_ids = _spec_envs(spec, envs, where)
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
                plugins=all_plugins, device=device, description=description, loggers=loggers,
                checkpoint_every=checkpoint_every)


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
    return PlannedRun(cfg, setting_label(entry["label"] or entry["name"], cfg.loss, axes))


def expand(spec: Spec) -> list[PlannedRun]:
    """Every run of ``spec``, validated, in execution order (seed-major).

    Raises:
        ConfigError: a bad value in any grid point, two different runs sharing a setting, or
            a setting whose loss its parameters fail to build (:mod:`klppo_bench.loss_check`).
    """
    from klppo_bench.loss_check import check_loss

    runs: list[PlannedRun] = []
    owner: dict[tuple, int] = {}  # (env, setting, seed) -> variant entry
    ids: set[str] = set()
    for seed in spec.seeds:
        for env in spec.envs:
            for i, entry in enumerate(spec.variants):
                where = f"{spec.path}: variants[{i}]"
                for point, axes in _grid_points(entry, where):
                    run = _planned_run(spec, i, env, seed, point, axes)
                    check_loss(run.config, where=f"{where}: ")  # once per setting
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

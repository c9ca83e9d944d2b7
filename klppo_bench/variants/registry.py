"""The loss-variant registry: the only plug-in point for PPO objectives.

A :class:`~klppo_bench.variants.variant.Variant` names a torchrl loss class, the parameters a
run may set on it (with the ranges torchrl enforces), the policy distribution (which decides
the KL path) and the beta schedule. The harness never branches on a variant's name: it asks
the variant for its loss module (:meth:`Variant.build_loss`) and its beta schedule
(:meth:`Variant.beta_schedule`).

Variants come from three places: the built-ins (:mod:`klppo_bench.variants.builtin`, registered
here on first use), the ``klppo_bench.variants`` entry-point group of any installed package,
and ``--plugin MODULE`` (any importable module that calls :func:`register`, or uses
:func:`klppo_bench.variants.surrogate.surrogate`). Each registration records its source
(:func:`variant_source`), so a name registered twice is reported with both origins, and a
run can record where its loss came from.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
import sysconfig
import traceback
import types
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from klppo_bench.errors import ConfigError
from klppo_bench.variants import builtin
from klppo_bench.variants.params import Param
from klppo_bench.variants.variant import Variant

__all__ = ["ENTRY_POINT_GROUP", "Param", "Variant", "all_variants", "describe_source",
           "get_variant", "load_plugins", "register", "registering_from", "variant_rows",
           "variant_source"]

ENTRY_POINT_GROUP = "klppo_bench.variants"


_REGISTRY: dict[str, Variant] = {}
_SOURCES: dict[str, dict] = {}
"""Where each registered variant came from (see :func:`variant_source`)."""
_SCOPE: list[dict] = []
"""Sources whose code is running now, innermost last: register() records the innermost."""
_ENTRY_POINTS_LOADED = False
_BUILTINS_REGISTERED = False
_LOADED_PLUGINS: set[str] = set()
_WARNED: set[str] = set()


def make_source(kind: str, name: str, package: str | None = None, version: str | None = None,
                path: str | None = None) -> dict:
    """A source record: kind, name, package, version, path, sha256 (of a plugin's file)."""
    sha256 = None
    if path and kind.startswith("plugin") and os.path.isfile(path):
        sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return {"kind": kind, "name": name, "package": package, "version": version, "path": path,
            "sha256": sha256}


def describe_source(source: Mapping[str, Any]) -> str:
    """``built-in (klppo_bench.variants.builtin)``, ``entry point NAME (package DIST VERSION)``,
    ``plugin file PATH``, ``plugin module NAME`` or ``module NAME`` (a direct register() call)."""
    kind, name = source["kind"], source["name"]
    if kind == "builtin":
        return f"built-in ({name})"
    if kind == "entry point" and source.get("package"):
        dist = " ".join(x for x in (source["package"], source.get("version")) if x)
        return f"entry point {name} (package {dist})"
    if kind == "plugin file":
        return f"plugin file {source['path']}"
    return f"{kind} {name}"


@contextlib.contextmanager
def registering_from(source: dict):
    """Attribute the :func:`register` calls made inside this block to ``source``."""
    _SCOPE.append(source)
    try:
        yield source
    finally:
        _SCOPE.pop()


def _warn(message: str) -> None:
    """One stderr line per distinct message and process (commands go on)."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"klppo-bench: warning: {message}", file=sys.stderr)


def register(variant: Variant, *, module: str | None = None) -> Variant:
    """Add ``variant`` to the registry, recording where it came from.

    The source is the plugin or entry point being loaded; outside one, the module ``module``
    (default: the caller's module). A name registered twice is a :class:`ConfigError` naming
    both sources, except from an installed entry point: that only warns (once) and the first
    registration stays, so one package cannot break every command in an environment.
    """
    if not isinstance(variant, Variant):
        raise TypeError(f"register() takes a Variant, got {type(variant).__name__}")
    source = _SCOPE[-1] if _SCOPE else make_source(
        "module", module or sys._getframe(1).f_globals.get("__name__", "?"))
    if variant.name in _REGISTRY:
        clash = (f"variant {variant.name!r} is registered twice: by "
                 f"{describe_source(_SOURCES[variant.name])} and by {describe_source(source)}")
        if source["kind"] == "entry point":
            _warn(f"{clash}; the first is kept")
            return variant
        raise ConfigError(f"{clash}; allowed: a name not registered yet "
                          "(`klppo-bench variants` lists them)")
    _REGISTRY[variant.name] = variant
    _SOURCES[variant.name] = source
    return variant


def error_line(err: BaseException) -> str:
    """An exception from a user's code in one line: ``Type: first line`` and, where it was
    raised in the user's own file, `` at FILE:LINE``."""
    return _one_line(err) + _user_line(err)


def _one_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _forget_since(names: set[str]) -> None:
    """Drop what a failed plugin or entry point registered before it failed."""
    for name in set(_REGISTRY) - names:
        del _REGISTRY[name]
        _SOURCES.pop(name, None)


def _entry_point_source(ep: Any) -> dict:
    dist = getattr(ep, "dist", None)
    return make_source("entry point", ep.name, package=getattr(dist, "name", None),
                       version=getattr(dist, "version", None))


def _load_entry_points() -> None:
    """Register the variants of every installed ``klppo_bench.variants`` entry point, once.

    A broken entry point (its load or its callable raises, or it returns no Variants) warns
    once and is skipped; the others and every command that does not need it go on.
    """
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        source = _entry_point_source(ep)
        before = set(_REGISTRY)
        try:
            with registering_from(source):
                _register_loaded(ep.load())
        except Exception as err:  # a third-party package: report it, never stop on it
            _forget_since(before)
            _warn(f"{describe_source(source)} is broken and skipped: {_one_line(err)}")


def _register_loaded(obj: Any) -> None:
    """An entry point's object: a Variant, a callable returning Variants, or a module (it
    registered its variants when imported)."""
    if isinstance(obj, types.ModuleType):
        return
    if callable(obj) and not isinstance(obj, (type, Variant)):
        obj = obj()
    for v in obj if isinstance(obj, (list, tuple)) else [obj]:
        if not isinstance(v, Variant):
            raise TypeError(f"it gave type {type(v).__name__}; allowed: a Variant, a callable "
                            "returning a list of Variants, or a module calling register()")
        register(v)


def plugin_target(module: str, base: str | Path | None = None) -> str:
    """A plugin as :func:`load_plugins` imports it: a ``.py`` path made absolute against
    ``base`` (default: the current directory); a module name unchanged."""
    if _is_path(module):
        return str((Path(base or os.getcwd()) / module).resolve())
    return module


def _is_path(module: str) -> bool:
    return module.endswith(".py") or os.sep in module


def _module_source(name: str) -> dict:
    mod = sys.modules.get(name)
    top = name.split(".")[0]
    dists = metadata.packages_distributions().get(top) or [None]
    version = None
    if dists[0]:
        with contextlib.suppress(metadata.PackageNotFoundError):
            version = metadata.version(dists[0])
    return make_source("plugin module", name, package=dists[0], version=version,
                       path=getattr(mod, "__file__", None))


def load_plugins(modules: list[str] | tuple[str, ...] = (), where: str = "--plugin",
                 base: str | Path | None = None) -> None:
    """Import each plugin (a module name, or a ``.py`` file path) once; it calls :func:`register`.

    File paths resolve against ``base`` (default: the current directory; a spec passes its
    own folder). Module names are looked up on ``sys.path`` plus the current directory, so
    ``--plugin my_variants`` finds ``./my_variants.py`` from the console script too. The
    built-ins and entry points are registered first, so a plugin that reuses one of their
    names is the one reported.

    Raises:
        ConfigError: ``{where} MODULE: ...``: it cannot be imported, raised while importing,
            or registers a name that is taken (the message names both sources).
    """
    if modules:
        all_variants()
    for module in modules:
        target = plugin_target(module, base)
        if target in _LOADED_PLUGINS:
            continue
        before = set(_REGISTRY)
        try:
            if _is_path(module):
                _import_file(Path(target))
            else:
                if os.getcwd() not in sys.path:
                    sys.path.append(os.getcwd())
                with registering_from(make_source("plugin module", module)) as source:
                    importlib.import_module(module)
                source.update(_module_source(module))
        except ConfigError as err:
            _forget_since(before)
            raise ConfigError(f"{where} {module}: {err}") from None
        # the user's code: one line, never a traceback; sys.exit() or a KeyboardInterrupt
        # raised by a plugin at import is its error too, not the end of the command
        except (Exception, SystemExit, KeyboardInterrupt) as err:
            _forget_since(before)
            raise ConfigError(f"{where} {module}: cannot import it ({_one_line(err)}"
                              f"{_user_line(err)}); allowed: a .py file or an importable "
                              "module that calls register()") from err
        _LOADED_PLUGINS.add(target)


def _user_line(err: BaseException) -> str:
    """`` at FILE:LINE`` of the innermost frame in the plugin's own code (not in klppo_bench,
    the standard library, installed packages or importlib), or ``""``."""
    library = (str(Path(__file__).parents[1]), *{sysconfig.get_path(k) for k in
                                                ("stdlib", "platstdlib", "purelib", "platlib")})
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        if not frame.filename.startswith(("<", *library)):
            return f" at {frame.filename}:{frame.lineno}"
    return ""


def _import_file(path: Path) -> None:
    if not path.is_file():
        raise ImportError(f"no such file: {path}")
    name = f"klppo_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise ImportError(f"not a Python module: {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        with registering_from(make_source("plugin file", path.stem, path=str(path))):
            spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise


def _register_builtins() -> None:
    global _BUILTINS_REGISTERED
    if _BUILTINS_REGISTERED:
        return
    _BUILTINS_REGISTERED = True
    from klppo_bench import __version__

    with registering_from(make_source("builtin", builtin.__name__, package="klppo-bench",
                                      version=__version__)):
        for variant in builtin.BUILTINS:
            register(variant)


def all_variants() -> dict[str, Variant]:
    """Every registered variant: the built-ins, installed entry points, loaded plugins."""
    _register_builtins()
    _load_entry_points()
    return dict(_REGISTRY)


def variant_source(name: str, where: str = "--variant") -> dict:
    """Where the variant ``name`` came from, for a run's provenance (a copy; JSON-ready).

    Keys: ``kind`` (``builtin``, ``entry point``, ``plugin file``, ``plugin module``, or
    ``module``: a direct :func:`register` call), ``name`` (the module, the entry point's
    name, or the plugin file's stem), ``package`` and ``version`` (the installed
    distribution providing it, where known), ``path`` (the plugin's file) and ``sha256`` (of
    that file, for plugins), each ``None`` where not applicable. :func:`describe_source`
    turns it into one phrase.

    Raises:
        ConfigError: ``name`` is not registered (lists the registered names).
    """
    get_variant(name, where)
    return dict(_SOURCES.get(name) or make_source("unknown", name))


def get_variant(name: str, where: str = "--variant") -> Variant:
    variants = all_variants()
    if name not in variants:
        raise ConfigError(
            f"{where}: unknown variant {name!r}; allowed: {', '.join(sorted(variants))}"
        )
    return variants[name]


def variant_rows() -> list[dict[str, str]]:
    """One row per registered variant, for ``klppo-bench variants``."""
    return [
        {
            "name": v.name,
            "loss": v.loss_class.__name__,
            "kl_estimator": v.kl_estimator,
            "beta_rule": v.beta_rule,
            "description": v.description,
        }
        for v in all_variants().values()
    ]


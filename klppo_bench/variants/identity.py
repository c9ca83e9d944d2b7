"""Code identity of a loss variant: the ``code`` entry of a run's resolved config.

A run id hashes the resolved config (:meth:`klppo_bench.config.RunConfig.run_id`), and
:func:`~klppo_bench.config.build_run_config` puts :func:`variant_code_hash` in it. So a run of a
variant whose loss code changed gets a **new run id**: the next sweep trains it instead of
reusing a record made with other code. We chose a new id over refusing to run (or over
reusing): an edit to a loss is an experiment of its own, the old runs stay on disk as another
definition (the report leaves them out and says so; ``report --all-definitions`` shows both).

What the hash covers:

* the variant's definition: name, the loss class's name, every parameter's default, type,
  choices, bounds and loss keyword (not its doc), the pinned keywords, the distribution class's
  name, the aliases, ``kl_estimator`` and ``beta_rule`` (not ``description``);
* the code of the loss class and of the distribution class: the source (``inspect.getsource``)
  of each class and of its base classes (for a ``@surrogate`` variant's class, made at run
  time: the source of its formula), walking up until a class from an installed library
  (a module file under the interpreter's library directories: torchrl, torch, tensordict, the
  standard library); for those, the library's name and version instead (``torchrl 0.14.1``).
  Code outside an installed library -- a ``--plugin`` file, a package installed with
  ``pip install -e`` -- counts by its source, and so does ``klppo_bench`` itself however it
  was installed (a wheel and a checkout of the same code give the same run ids).

Not covered: module-level helpers and constants a class uses outside its body, and the harness
itself (each run's provenance records the git commit, and its variant's source file sha256).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import marshal
import os
import platform
import sys
import sysconfig
from importlib import metadata
from typing import Any

from klppo_bench.variants.registry import get_variant, load_plugins, variant_source
from klppo_bench.variants.variant import Variant

__all__ = ["code_identity", "variant_code_hash", "variant_provenance"]

HASH_CHARS = 16
"""Hex digits kept of the sha256 (the ``code`` entry of a config)."""

_CACHE: dict[int, tuple[Variant, dict]] = {}


def _library_dirs() -> tuple[str, ...]:
    import site

    keys = ("stdlib", "platstdlib", "purelib", "platlib")
    paths = [sysconfig.get_path(k) for k in keys]
    try:  # system and user site-packages too (a venv with --system-site-packages, pip --user)
        paths += [*site.getsitepackages(), site.getusersitepackages()]
    except AttributeError:  # an embedded interpreter's site module may lack them
        pass
    dirs = {os.path.realpath(p) for p in paths if p}
    return tuple(d.rstrip(os.sep) + os.sep for d in dirs)


_LIBRARY_DIRS = _library_dirs()


def _library(cls: type) -> tuple[str, str] | None:
    """``(name, version)`` of the installed library ``cls`` comes from; None for code hashed
    by its source (anything not under the interpreter's library directories)."""
    module = sys.modules.get(cls.__module__)
    top = cls.__module__.split(".")[0]
    path = getattr(module, "__file__", None)
    if module is None:
        return None
    if path is None:  # builtins and modules compiled into the interpreter
        return ("python", platform.python_version()) if top in sys.builtin_module_names \
            else None
    if top == "klppo_bench" or not os.path.realpath(path).startswith(_LIBRARY_DIRS):
        return None  # this package counts by its source however it was installed
    if top in sys.stdlib_module_names:
        return "python", platform.python_version()
    version = getattr(sys.modules.get(top), "__version__", None)
    if version is None:
        try:
            version = metadata.version(top)
        except metadata.PackageNotFoundError:
            version = "unknown"
    return top, str(version)


def function_source(fn) -> str:
    """A function's source; where it has none (made by ``exec``), its bytecode."""
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return f"{fn.__qualname__} (no source):{marshal.dumps(fn.__code__).hex()}"


def _source(cls: type) -> str:
    """The class's source; where it has none (made at run time), its ``__identity_source__``
    (a :func:`~klppo_bench.variants.surrogate.surrogate` class: its formula's source) or else
    its methods' bytecode."""
    if "__identity_source__" in vars(cls):
        return vars(cls)["__identity_source__"]
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        parts = [f"{cls.__module__}.{cls.__qualname__} (no source)"]
        for name, value in sorted(vars(cls).items()):
            code = getattr(value, "__code__", None)
            if code is not None:
                parts.append(f"{name}:{marshal.dumps(code).hex()}")
        return "\n".join(parts)


def _walk(cls: type, seen: set, sources: list, libraries: dict) -> None:
    """Source of ``cls`` and its bases up to (not including) installed-library classes."""
    if cls is object or cls in seen:
        return
    seen.add(cls)
    library = _library(cls)
    if library is not None:
        libraries[library[0]] = library[1]
        return
    sources.append((cls.__qualname__, _source(cls)))
    for base in cls.__bases__:
        _walk(base, seen, sources, libraries)


def _class_name(cls: type) -> str:
    # by-source classes by their name alone: moving a plugin file keeps its identity
    return f"{cls.__module__}.{cls.__qualname__}" if _library(cls) else cls.__qualname__


def _definition(v: Variant) -> dict:
    params = {k: {"default": p.default, "kind": p.kind.__name__, "choices": p.choices,
                  "low": p.low, "high": p.high, "low_open": p.low_open,
                  "high_open": p.high_open, "loss_kwarg": p.loss_kwarg}
              for k, p in v.params.items()}
    return {"name": v.name, "loss_class": _class_name(v.loss_class), "params": params,
            "pinned": dict(v.pinned), "distribution_class": _class_name(v.distribution_class),
            "aliases": dict(v.aliases), "kl_estimator": v.kl_estimator,
            "beta_rule": v.beta_rule}


def code_identity(v: Variant) -> dict:
    """``{"hash", "classes", "libraries"}`` of a registered variant (see the module doc):
    ``classes`` are the classes hashed by source, ``libraries`` the installed libraries
    (name -> version) the walk stopped at. Cached per Variant object."""
    cached = _CACHE.get(id(v))
    if cached is not None and cached[0] is v:
        return dict(cached[1])
    seen: set = set()
    sources: list = []
    libraries: dict = {}
    for cls in (v.loss_class, v.distribution_class):
        _walk(cls, seen, sources, libraries)
    payload = json.dumps({"definition": _definition(v), "sources": sources,
                          "libraries": sorted(libraries.items())},
                         sort_keys=True, default=repr)
    identity = {"hash": hashlib.sha256(payload.encode()).hexdigest()[:HASH_CHARS],
                "classes": [name for name, _ in sources], "libraries": dict(sorted(
                    libraries.items()))}
    _CACHE[id(v)] = (v, identity)
    return dict(identity)


def variant_code_hash(name: str, where: str = "--variant") -> str:
    """The code hash of the registered variant ``name`` (16 hex digits; see the module doc).

    Raises:
        ConfigError: ``name`` is not registered.
    """
    return code_identity(get_variant(name, where))["hash"]


def variant_provenance(name: str, plugins: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """What a run records about its variant (``provenance.variant`` of its status): the
    source (:func:`~klppo_bench.variants.registry.variant_source`: kind, name, package,
    version, path, sha256) plus ``code`` (the hash), ``classes`` and ``libraries``. Never
    raises: a variant that cannot be loaded gives ``{"error": ...}`` (the run then fails in
    training and records why)."""
    try:
        load_plugins(plugins)
        identity = code_identity(get_variant(name))
        return {**variant_source(name), "code": identity["hash"],
                "classes": identity["classes"], "libraries": identity["libraries"]}
    except Exception as err:  # noqa: BLE001 -- provenance must not stop a run from recording
        return {"error": f"{type(err).__name__}: {err}".splitlines()[0]}

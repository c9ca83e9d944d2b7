"""The loss-variant registry: the only plug-in point for PPO objectives.

A :class:`Variant` names a torchrl loss class, the parameters a run may set on it (with the
ranges torchrl enforces), the policy distribution (which decides the KL path) and the beta
schedule. The harness never branches on a variant's name: it asks the variant for its loss
module (:meth:`Variant.build_loss`) and its beta schedule (:meth:`Variant.beta_schedule`).

Variants come from three places: the built-ins (:mod:`klppo_bench.variants.builtin`), the
``klppo_bench.variants`` entry-point group of any installed package, and ``--plugin MODULE``
(any importable module that calls :func:`register`).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import torch
from torchrl.objectives import LossModule

from klppo_bench.errors import ConfigError
from klppo_bench.variants.beta import BetaSchedule, make_beta_schedule
from klppo_bench.variants.distributions import JointNormal

ENTRY_POINT_GROUP = "klppo_bench.variants"

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class Param:
    """One settable parameter of a variant.

    Attributes:
        default: value used when a run does not set it.
        kind: ``bool``, ``int``, ``float`` or ``str``.
        doc: one line for ``klppo-bench variants --params``.
        choices: allowed values (``str`` parameters).
        low / high: bounds; ``low_open`` / ``high_open`` make them strict.
        loss_kwarg: keyword passed to the loss class (``None``: used by the harness only).
    """

    default: Any
    kind: type
    doc: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    loss_kwarg: str | None = "same"

    def allowed(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind is bool:
            return "true or false"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high}")
        return " ".join([self.kind.__name__, " and ".join(bounds)]).strip()

    def parse(self, raw: Any, key: str, where: str) -> Any:
        """Convert ``raw`` (a YAML value or a command-line string) and check its range."""

        def bad(reason: str = "") -> ConfigError:
            return ConfigError(
                f"{where}: {key}={raw!r} is invalid{reason}; allowed: {self.allowed()}"
            )

        value = raw
        if self.kind is bool:
            if isinstance(raw, bool):
                value = raw
            elif isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
                value = raw.lower() in _TRUE
            else:
                raise bad()
        elif self.kind is int:
            if isinstance(raw, bool):
                raise bad()
            try:
                value = int(raw) if not isinstance(raw, float) or raw.is_integer() else None
            except (TypeError, ValueError):
                value = None
            if value is None:
                raise bad()
        elif self.kind is float:
            if isinstance(raw, bool):
                raise bad()
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise bad() from None
            if not math.isfinite(value):
                raise bad(" (not finite)")
        elif self.kind is str:
            value = str(raw)
        if self.choices is not None and value not in self.choices:
            raise bad()
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise bad(" (out of range)")
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise bad(" (out of range)")
        return value


@dataclass(frozen=True)
class Variant:
    """A PPO loss variant: a torchrl loss class configured one way.

    Attributes:
        name: registry key (``klppo-bench run --variant NAME``).
        loss_class: a torchrl ``LossModule`` subclass taking ``actor_network`` and
            ``critic_network`` plus keyword arguments.
        description: one line for ``klppo-bench variants``.
        kl_estimator: ``analytic``, ``monte-carlo`` or ``none`` (what the loss really
            computes; tested in ``tests/test_variants.py``).
        beta_rule: ``adaptive``, ``fixed`` or ``none``.
        params: settable parameters and their defaults.
        pinned: loss keywords the variant fixes and a run may not set (e.g. a fixed beta's
            ``increment = decrement = 1``).
        distribution_class: policy distribution; it decides torchrl's KL path.
        aliases: alternative parameter names (``entropy_coef`` -> ``entropy_coeff``).
    """

    name: str
    loss_class: type[LossModule]
    description: str
    kl_estimator: str
    beta_rule: str
    params: Mapping[str, Param]
    pinned: Mapping[str, Any] = field(default_factory=dict)
    distribution_class: type[torch.distributions.Distribution] = JointNormal
    aliases: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.kl_estimator not in ("analytic", "monte-carlo", "none"):
            raise ValueError(f"variant {self.name}: kl_estimator={self.kl_estimator!r}")
        if self.beta_rule not in ("adaptive", "fixed", "none"):
            raise ValueError(f"variant {self.name}: beta_rule={self.beta_rule!r}")

    def defaults(self) -> dict[str, Any]:
        return {k: p.default for k, p in self.params.items()}

    def resolve(self, overrides: Mapping[str, Any] | None = None, where: str = "--set") -> dict:
        """Defaults updated with ``overrides``; each value parsed and range-checked.

        Raises:
            ConfigError: unknown key (lists the allowed ones) or a bad value.
        """
        params = self.defaults()
        for raw_key, raw in (overrides or {}).items():
            key = self.aliases.get(raw_key, raw_key)
            if key not in self.params:
                hint = ""
                if key in self.pinned:
                    hint = f" ({key} is pinned to {self.pinned[key]!r} by {self.name})"
                raise ConfigError(
                    f"{where}: unknown parameter {raw_key!r} for variant {self.name}{hint}; "
                    f"allowed: {', '.join(sorted(self.params))}"
                )
            params[key] = self.params[key].parse(raw, key, where)
        return params

    def beta_schedule(self, params: Mapping[str, Any]) -> BetaSchedule:
        """The beta schedule for these resolved parameters."""
        if self.beta_rule == "adaptive":
            return make_beta_schedule(params["beta_schedule"])
        return make_beta_schedule(self.beta_rule)

    def build_loss(self, actor, critic, params: Mapping[str, Any]) -> LossModule:
        """Instantiate ``loss_class`` on ``actor``/``critic`` with the resolved parameters."""
        kwargs = dict(self.pinned)
        for key, value in params.items():
            spec = self.params[key]
            if spec.loss_kwarg is None:
                continue
            name = key if spec.loss_kwarg == "same" else spec.loss_kwarg
            kwargs[name] = float(value) if spec.kind is float else value
        kwargs.update(self.beta_schedule(params).loss_overrides())
        return self.loss_class(actor_network=actor, critic_network=critic, **kwargs)


_REGISTRY: dict[str, Variant] = {}
_ENTRY_POINTS_LOADED = False


def register(variant: Variant) -> Variant:
    """Add ``variant`` to the registry; a duplicate name is an error."""
    if not isinstance(variant, Variant):
        raise TypeError(f"register() takes a Variant, got {type(variant).__name__}")
    if variant.name in _REGISTRY:
        raise ValueError(f"variant {variant.name!r} is already registered")
    _REGISTRY[variant.name] = variant
    return variant


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        _register_loaded(ep.load(), f"entry point {ep.name}")


def _register_loaded(obj: Any, source: str) -> None:
    if isinstance(obj, Variant):
        if obj.name not in _REGISTRY:
            register(obj)
    elif callable(obj) and not isinstance(obj, type):
        result = obj()
        for v in result if isinstance(result, (list, tuple)) else [result]:
            if isinstance(v, Variant) and v.name not in _REGISTRY:
                register(v)


_LOADED_PLUGINS: set[str] = set()


def load_plugins(modules: list[str] | tuple[str, ...] = ()) -> None:
    """Import each plugin (a module name, or a ``.py`` file path) once; it calls :func:`register`.

    Module names are looked up on ``sys.path`` plus the current directory, so
    ``--plugin my_variants`` finds ``./my_variants.py`` from the console script too.
    """
    for module in modules:
        if module in _LOADED_PLUGINS:
            continue
        try:
            if module.endswith(".py") or os.sep in module:
                path = Path(module).resolve()
                spec = importlib.util.spec_from_file_location(f"klppo_plugin_{path.stem}", path)
                if spec is None or not path.is_file():
                    raise ImportError(f"no such file: {path}")
                mod = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = mod
                spec.loader.exec_module(mod)
            else:
                if os.getcwd() not in sys.path:
                    sys.path.append(os.getcwd())
                importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"--plugin {module}: cannot import it ({err})") from err
        _LOADED_PLUGINS.add(module)


def all_variants() -> dict[str, Variant]:
    import klppo_bench.variants.builtin  # noqa: F401  (registers the built-ins)

    _load_entry_points()
    return dict(_REGISTRY)


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


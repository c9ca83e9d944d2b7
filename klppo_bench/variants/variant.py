"""A loss variant: a torchrl loss class configured one way (see :class:`Variant`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torchrl.objectives import LossModule

from klppo_bench.errors import ConfigError
from klppo_bench.variants.beta import BetaSchedule, make_beta_schedule
from klppo_bench.variants.common import ALIASES, COMMON
from klppo_bench.variants.distributions import JointNormal
from klppo_bench.variants.params import Param

__all__ = ["Variant"]


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
        params: settable parameters and their defaults. After construction it also holds
            every ``common`` parameter the variant does not set or pin itself.
        pinned: loss keywords the variant fixes and a run may not set (e.g. a fixed beta's
            ``increment = decrement = 1``).
        distribution_class: policy distribution; it decides torchrl's KL path.
        aliases: alternative parameter names; the common ones (``entropy_coef`` ->
            ``entropy_coeff``) are added where their target is a parameter.
        common: the harness parameters the variant shares with every other
            (:data:`~klppo_bench.variants.common.COMMON`: no entropy bonus, squared-error
            value loss, advantage normalization, ...). Pass ``{}`` for a loss class that does
            not take torchrl's ``PPOLoss`` keywords.
        check: a cross-parameter check run with the range checks (:meth:`resolve`): called
            with the resolved parameters, it returns ``None`` or a one-line problem, e.g.
            ``"clip_epsilon_high must be >= clip_epsilon_low"``.
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
    common: Mapping[str, Param] = field(default_factory=lambda: dict(COMMON))
    check: Callable[[Mapping[str, Any]], str | None] | None = None

    def __post_init__(self):
        if self.kl_estimator not in ("analytic", "monte-carlo", "none"):
            raise ValueError(f"variant {self.name}: kl_estimator={self.kl_estimator!r}")
        if self.beta_rule not in ("adaptive", "fixed", "none"):
            raise ValueError(f"variant {self.name}: beta_rule={self.beta_rule!r}")
        # the variant's own entries win; a common one it neither sets nor pins is added
        params = dict(self.params)
        for key, param in self.common.items():
            if key not in params and key not in self.pinned:
                params[key] = param
        aliases = {a: t for a, t in ALIASES.items() if t in params and a not in params}
        aliases.update(self.aliases)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "aliases", aliases)

    def defaults(self) -> dict[str, Any]:
        return {k: p.default for k, p in self.params.items()}

    def param_origin(self, key: str) -> str:
        """Where parameter ``key`` comes from: ``common`` (the shared harness value),
        ``variant`` (the variant's own parameter) or ``variant, common default X`` (a common
        parameter the variant redefines)."""
        common = self.common.get(key)
        if common is None:
            return "variant"
        if self.params[key] == common:
            return "common"
        return f"variant, common default {common.default!r}"

    def resolve(self, overrides: Mapping[str, Any] | None = None, where: str = "--set") -> dict:
        """Defaults updated with ``overrides``; each value parsed and range-checked, then the
        variant's cross-parameter ``check``.

        Raises:
            ConfigError: unknown key (lists the allowed ones), a bad value, or a failed check.
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
        if self.check is not None:
            try:
                problem = self.check(dict(params))
            except (ValueError, TypeError) as err:
                problem = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            if problem:
                raise ConfigError(f"{where}: variant {self.name}: {problem}")
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

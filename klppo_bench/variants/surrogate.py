"""A new PPO objective from its per-sample formula: the ``@surrogate`` decorator.

::

    from klppo_bench.variants.surrogate import surrogate

    @surrogate(name="spo", params={"clip_epsilon": 0.2}, description="simple policy optimization")
    def spo(ratio, advantage, *, clip_epsilon):
        return ratio * advantage - advantage.abs() / (2 * clip_epsilon) * (ratio - 1) ** 2

registers the variant ``spo`` (``klppo-bench run --variant spo --plugin this_file.py``).

**The formula** returns the per-sample objective to *maximize*, of the shape of ``ratio``, or
``(objective, {name: tensor})`` to report diagnostics as well. Its arguments, by name:

* ``ratio`` -- ``pi_new(a|s) / pi_old(a|s)`` per sample (with gradient); required, first;
* ``advantage`` -- the GAE advantage, normalized per minibatch as for ``clip``; required,
  second;
* ``log_ratio`` -- ``log ratio`` (with gradient);
* ``kl`` -- the closed-form KL(pi_old || pi_new) per sample (with gradient; the policy's
  distribution must have a closed form, as the default ``JointNormal`` has). Asking for it
  makes the variant's ``kl_estimator`` ``analytic``: its ``kl`` is recorded, as for the KL
  penalty;
* ``entropy`` -- the current policy's entropy per sample (with gradient);
* every parameter in ``params``, as a 0-d tensor (a buffer of the loss module, so the lanes of
  one batched job may differ in it).

**Everything else comes from the suite, exactly as for** ``clip`` (torchrl's ``ClipPPOLoss``
steps, :mod:`klppo_bench.variants.torchrl_parts`): advantage normalization, the log-ratio, the
critic loss, the entropy bonus, the mean over the minibatch, and the diagnostics
``kl_approx``, ``explained_variance`` and, where the variant has clip bounds, ``clip_fraction``.
The common harness parameters (:data:`~klppo_bench.variants.common.COMMON`) are added to
``params``. A parameter named ``clip_epsilon`` (or both ``clip_epsilon_low`` and
``clip_epsilon_high``) is also the loss's clip bound: ``clip_fraction`` is the fraction of
samples whose ratio lies outside ``[1 - eps, 1 + eps]`` (``[1 - eps_low, 1 + eps_high]``), and
given as a plain number it gets ``clip``'s range (0 < eps < 1).

**The output contract** (:mod:`klppo_bench.variants.outputs`; the same for subclasses of a
torchrl loss): ``forward`` returns a ``TensorDict`` that

* must hold ``loss_objective`` (a module without it is refused at planning, in one line);
* has every ``loss_*`` entry summed into the loss that is differentiated (``loss_objective``,
  ``loss_critic``, ``loss_entropy``, and any of the module's own);
* has recorded in ``metrics.parquet`` under their own names: ``loss_objective``,
  ``loss_critic``, ``kl``, ``kl_approx``, ``clip_fraction``, ``explained_variance``;
* has not recorded: torchrl's ``loss_entropy``, ``entropy``, ``composite_entropy``,
  ``value_clip_fraction``, ``ESS``, ``max_ratio``, ``mean_ratio`` (the metrics' ``entropy`` is
  the policy's, computed by the harness);
* has any other tensor entry (a formula's diagnostics, a subclass's extra keys, a
  ``loss_*`` term of its own) recorded as ``extra/<key>``: the mean of its elements.

A surrogate variant's module returns ``loss_objective``, ``kl_approx``, ``clip_fraction`` (with
bounds), ``kl`` (if the formula reads it), ``entropy`` and ``loss_entropy`` (with the entropy
bonus), ``loss_critic`` and ``explained_variance`` (with a critic), and the formula's
diagnostics.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Mapping

import torch
from torchrl.objectives import ClipPPOLoss

from klppo_bench.variants.builtin import CLIP_EPSILON
from klppo_bench.variants.common import COMMON
from klppo_bench.variants.distributions import JointNormal
from klppo_bench.variants.identity import function_source
from klppo_bench.variants.params import Param
from klppo_bench.variants.registry import register
from klppo_bench.variants.torchrl_parts import BOUNDS, SurrogateLoss
from klppo_bench.variants.variant import Variant

__all__ = ["INPUTS", "surrogate", "surrogate_variant"]

INPUTS = ("log_ratio", "kl", "entropy")
"""What a formula may ask for besides ``ratio``, ``advantage`` and its parameters."""
_KNOWN_RANGES = {
    "clip_epsilon": CLIP_EPSILON,
    "clip_epsilon_low": Param(0.2, float, "lower clip range: ratio >= 1 - eps_low", low=0.0,
                              high=1.0, high_open=True),
    "clip_epsilon_high": Param(0.2, float, "upper clip range: ratio <= 1 + eps_high", low=0.0),
}


def surrogate(name: str, params: Mapping[str, Any] | None = None, description: str = "", *,
              check: Callable[[Mapping[str, Any]], str | None] | None = None,
              distribution_class: type[torch.distributions.Distribution] = JointNormal
              ) -> Callable[[Callable], Callable]:
    """Register the decorated per-sample formula as the variant ``name`` (module docstring).

    Args:
        name: registry key.
        params: the formula's parameters: ``{name: default}`` (a float or an int) or
            ``{name: Param(...)}`` for a range, a doc line or an int kind.
        description: one line for ``klppo-bench variants``.
        check: a cross-parameter check (:class:`~klppo_bench.variants.variant.Variant`),
            e.g. ``lambda p: None if p["a"] <= p["b"] else "a must be <= b"``.
        distribution_class: the policy distribution (default: joint diagonal Gaussian).

    Returns the formula unchanged, with the registered variant as its ``variant`` attribute.

    Raises:
        TypeError: the formula's arguments or the parameters do not fit the contract.
    """
    def decorate(fn: Callable) -> Callable:
        variant = surrogate_variant(fn, name, params, description, check=check,
                                    distribution_class=distribution_class)
        register(variant, module=getattr(fn, "__module__", None))
        fn.variant = variant
        return fn

    return decorate


def surrogate_variant(fn: Callable, name: str, params: Mapping[str, Any] | None = None,
                      description: str = "", *,
                      check: Callable[[Mapping[str, Any]], str | None] | None = None,
                      distribution_class: type[torch.distributions.Distribution] = JointNormal
                      ) -> Variant:
    """The :class:`~klppo_bench.variants.variant.Variant` of :func:`surrogate`, not registered
    (for an entry point returning a list of Variants)."""
    where = f"surrogate {name!r} ({getattr(fn, '__qualname__', fn)!r})"
    specs = {key: _param(key, value, where) for key, value in (params or {}).items()}
    bounds = _bounds(specs, where)
    inputs = _inputs(fn, specs, where)
    if "kl" in inputs:
        _check_closed_form_kl(distribution_class, where)
    loss_class = type(f"Surrogate[{name}]", (SurrogateLoss,), {
        "__module__": fn.__module__, "__qualname__": f"Surrogate[{name}]",
        "__doc__": f"The surrogate {name!r}: {fn.__module__}.{fn.__qualname__}.",
        "__identity_source__": function_source(fn),  # the run id follows the formula's code
        "objective": staticmethod(fn), "inputs": inputs, "bounds": bounds,
        "param_defaults": {k: p.default for k, p in specs.items()}, "surrogate_name": name})
    return Variant(name=name, loss_class=loss_class, description=description or name,
                   kl_estimator="analytic" if "kl" in inputs else "none", beta_rule="none",
                   params=specs, distribution_class=distribution_class, check=check)


def _reserved() -> frozenset[str]:
    """Names a parameter may not take: the common parameters, the formula's inputs, and the
    attributes of the loss module and the constructor keywords of torchrl's ``ClipPPOLoss`` (but
    its clip bounds)."""
    names = {*COMMON, *INPUTS, "ratio", "advantage", *dir(SurrogateLoss)}
    for cls in ClipPPOLoss.__mro__:
        if "__init__" in vars(cls):
            names.update(inspect.signature(vars(cls)["__init__"]).parameters)
    return frozenset(names - set(_KNOWN_RANGES))


def _param(key: str, value: Any, where: str) -> Param:
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", str(key)) or key in _reserved():
        raise TypeError(f"{where}: parameter name {key!r} is taken; allowed: an identifier "
                        "that is not a common parameter, a formula input or a keyword or "
                        "attribute of torchrl's ClipPPOLoss")
    spec = None
    if isinstance(value, Param):
        spec = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        known = _KNOWN_RANGES.get(key)
        if known is not None:
            spec = Param(float(value), float, known.doc, low=known.low, high=known.high,
                         low_open=known.low_open, high_open=known.high_open)
        else:
            spec = Param(value, type(value), f"parameter {key} of the formula")
    if spec is None or spec.kind not in (float, int) or spec.loss_kwarg != "same":
        raise TypeError(f"{where}: parameter {key}={value!r} is invalid; allowed: a float or "
                        "int default, or a Param of kind float or int (parameters become "
                        "buffers of the loss module)")
    return spec


def _inputs(fn: Callable, specs: Mapping[str, Param], where: str) -> tuple[str, ...]:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: the formula must be a Python function") from None
    args = signature.parameters
    names = list(args)
    allowed = f"ratio, advantage, then any of {', '.join(INPUTS)} and the parameters"
    if names[:2] != ["ratio", "advantage"]:
        raise TypeError(f"{where}: the formula's first arguments are {names[:2]}; allowed: "
                        f"{allowed}")
    for arg in args.values():
        if arg.kind in (arg.VAR_POSITIONAL, arg.VAR_KEYWORD) or \
                arg.name not in ("ratio", "advantage", *INPUTS, *specs):
            raise TypeError(f"{where}: formula argument {arg.name!r} is unknown; allowed: "
                            f"{allowed} ({', '.join(specs) or 'none declared'})")
    unused = [k for k in specs if k not in args]
    if unused:
        raise TypeError(f"{where}: parameters {', '.join(unused)} are not arguments of the "
                        "formula; allowed: declare only the parameters it takes")
    return tuple(k for k in INPUTS if k in args)


def _bounds(specs: Mapping[str, Param], where: str) -> str | None:
    low, high = BOUNDS["asymmetric"]
    if "clip_epsilon" in specs and (low in specs or high in specs):
        raise TypeError(f"{where}: clip_epsilon and {low}/{high} together; allowed: one kind "
                        "of clip bound")
    if "clip_epsilon" in specs:
        return "symmetric"
    if (low in specs) != (high in specs):
        raise TypeError(f"{where}: {low} and {high} go together; allowed: both or neither")
    return "asymmetric" if low in specs else None


def _check_closed_form_kl(distribution_class, where: str) -> None:
    try:
        d = distribution_class(torch.zeros(1, 1), torch.ones(1, 1))
        torch.distributions.kl_divergence(d, d)
    except NotImplementedError:
        raise TypeError(f"{where}: the formula reads kl, but {distribution_class.__name__} "
                        "has no closed-form KL; allowed: a distribution with one, such as "
                        "JointNormal") from None

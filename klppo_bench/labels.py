"""Setting labels: the one place that names a setting (a variant with its loss parameters).

The same label is stored in each run's ``status.json`` (and so names the setting in the
report), groups a sweep's seeds, and names the run in every logger:

* a sweep's grid point: the entry's ``label:`` (else its variant) and the values of the grid's
  axes, ``klpen-adaptive(dtarg=0.01,increment=2)`` (:func:`setting_label`);
* a single ``run``: the variant and the loss parameters it changed from the variant's
  defaults, ``klpen-adaptive(dtarg=0.03)``, or just ``clip`` (:func:`run_setting`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

__all__ = ["format_value", "run_setting", "setting_label"]


def format_value(value: Any) -> str:
    """A parameter value as a label shows it: ``0.003``, ``2`` (for ``2.0``), ``true``."""
    if isinstance(value, float) and not value.is_integer() and float(f"{value:g}") == value:
        return f"{value:g}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def setting_label(name: str, params: Mapping[str, Any], keys: Iterable[str]) -> str:
    """``name(k1=v1,k2=v2)`` for ``keys`` of ``params`` in that order; ``name`` alone when
    ``keys`` is empty."""
    shown = ",".join(f"{k}={format_value(params[k])}" for k in keys)
    return name + (f"({shown})" if shown else "")


def run_setting(cfg) -> str:
    """A single run's setting label: its variant and the loss parameters of ``cfg`` (a
    :class:`~klppo_bench.config.RunConfig`) that differ from the variant's defaults."""
    from klppo_bench.variants import get_variant

    defaults = get_variant(cfg.variant).resolve({}, "--set")
    return setting_label(cfg.variant, cfg.loss,
                         [k for k, v in cfg.loss.items() if defaults.get(k) != v])

"""The output contract of a loss module: what both engines sum, record and ignore.

A loss module's ``forward`` returns a ``TensorDict`` (or a mapping) of tensors keyed by name
(the contract is written out for plugin authors in :mod:`klppo_bench.variants.surrogate` and
``docs/objectives.md``):

* ``loss_objective`` -- required (a module without it is refused at planning); every
  ``loss_*`` entry is **summed** into the loss that is differentiated.
* recorded under their own names in ``metrics.parquet`` (each iteration's mean over its
  minibatches; NaN where a loss does not return it): :data:`RECORDED`.
* torchrl's own extra diagnostics, :data:`NOT_RECORDED`, are not recorded (the policy's
  entropy is recorded from the distribution itself).
* any other entry holding a tensor -- ``loss_*`` ones included -- is recorded as
  ``extra/<key>``: the mean of its elements, like the recorded ones (so return a scalar
  or a per-sample tensor). Nested entries (a ``TensorDict`` value) are not recorded.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

__all__ = ["EXTRA_PREFIX", "NOT_RECORDED", "RECORDED", "REQUIRED", "extra_outputs",
           "output_problem", "recorded_columns"]

REQUIRED = "loss_objective"
SUMMED_PREFIX = "loss_"
RECORDED = ("loss_objective", "loss_critic", "kl", "kl_approx", "clip_fraction",
            "explained_variance")
"""Outputs recorded under their own names (``kl`` is per sample: the penalty's KL)."""
NOT_RECORDED = frozenset({"loss_entropy", "entropy", "composite_entropy", "value_clip_fraction",
                          "ESS", "max_ratio", "mean_ratio"})
"""torchrl's ``PPOLoss`` family's other outputs: summed where they are ``loss_*``, not
recorded."""
EXTRA_PREFIX = "extra/"


def recorded_columns(out: Mapping[Any, Any]) -> dict[str, str]:
    """``{output key: metrics column}`` of the entries of ``out`` that are recorded."""
    columns = {}
    for key, value in out.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            continue
        if key in RECORDED:
            columns[key] = key
        elif key not in NOT_RECORDED:
            columns[key] = EXTRA_PREFIX + key
    return columns


def extra_outputs(out: Mapping[Any, Any]) -> frozenset[str]:
    """The keys of ``out`` recorded as ``extra/<key>``."""
    return frozenset(k for k, c in recorded_columns(out).items() if c != k)


def output_problem(out: Any) -> str | None:
    """Why ``out`` (one forward pass's output) breaks the contract, or ``None``."""
    if not hasattr(out, "keys") or not hasattr(out, "items"):
        return (f"its forward returned {type(out).__name__}; allowed: a TensorDict with "
                f"'{REQUIRED}'")
    if REQUIRED not in out.keys():
        keys = ", ".join(sorted(str(k) for k in out.keys())) or "nothing"
        return (f"its forward's output lacks '{REQUIRED}' (it returned {keys}); allowed: a "
                f"TensorDict with '{REQUIRED}' and any other loss_* terms, which are summed")
    return None

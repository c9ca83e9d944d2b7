"""What lanes must share to share one vmapped loss call: the loss class, every attribute that
is not a tensor (of the loss and of every module inside it), and the shapes of its parameters
and buffers, whose values are stacked per lane (:class:`~.lanes.LaneLoss`). The planner's lane
key (:func:`~.packing.lane_key`) is :func:`loss_structure`. When lanes read different values
into Python inside a call (:func:`lanes_equal`), the call raises :class:`LanesDisagree`."""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch
from tensordict import TensorDict, TensorDictBase

__all__ = ["LanesDisagree", "lane_state_differences", "lanes_equal", "loss_structure"]


# KLPENPPOLoss keeps its initial beta as a float for ``reset()`` (never called by the
# harness); the live value is the ``beta`` buffer, which is stacked per lane.
_LANE_FREE_ATTRIBUTES = frozenset({"_beta_init"})


def _normalized(value, depth: int = 0):
    """A comparable stand-in for an attribute value: tensors by shape and dtype (their values
    are stacked per lane), modules by class (they are walked themselves), functions by name,
    containers element by element, anything else by its repr without memory addresses. Lanes
    whose loss modules differ in any of these cannot share one module object."""
    if depth > 6:
        return ("deep", type(value).__qualname__)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    if isinstance(value, TensorDictBase):
        return ("tensordict", tuple(sorted(str(k) for k in value.keys(True, True))))
    if isinstance(value, torch.nn.Module):
        return ("module", type(value).__qualname__)
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return (type(value).__name__, value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_normalized(v, depth + 1) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((repr(k), repr(_normalized(v, depth + 1)))
                                     for k, v in value.items())))
    if isinstance(value, (set, frozenset)):
        return ("set", tuple(sorted(repr(_normalized(v, depth + 1)) for v in value)))
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        return ("callable", getattr(value, "__module__", ""), value.__qualname__)
    return ("object", type(value).__qualname__, re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value)))


def _plain_state(module: torch.nn.Module) -> dict:
    """Every attribute that is not a parameter or buffer, of the loss module and of every
    module inside it (registered or not: torchrl keeps ``actor_network`` as a plain
    attribute), normalized (:func:`_normalized`)."""
    out, seen, todo = {}, set(), [("", module)]
    while todo:
        prefix, mod = todo.pop()
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        if isinstance(mod, TensorDictBase):  # torchrl's *_network_params: a parameter
            out[prefix] = _normalized(mod)     # container whose other attributes are
            continue                           # tensordict's own bookkeeping
        for key, value in vars(mod).items():
            if key in ("_parameters", "_buffers") or key in _LANE_FREE_ATTRIBUTES:
                continue
            name = f"{prefix}.{key}" if prefix else key
            if key == "_modules":
                todo += [(f"{prefix}.{k}" if prefix else k, m) for k, m in value.items()
                         if m is not None]
                continue
            if isinstance(value, torch.nn.Module):
                todo.append((name, value))
            if "hook" in key and isinstance(value, dict):  # keyed by global handle ids
                value = list(value.values())
            out[name] = _normalized(value)
    return out


def _structure(loss: torch.nn.Module) -> dict:
    """What lanes must share to share one vmapped call, by name: the loss class, every
    attribute that is not a tensor (:func:`_plain_state`), and the shapes of its parameters
    and buffers (their values may differ: they are stacked per lane)."""
    out = {"loss class": f"{type(loss).__module__}.{type(loss).__qualname__}"}
    out.update(_plain_state(loss))
    out.update({f"shape of {k}": tuple(v.shape)
                for k, v in TensorDict.from_module(loss).items(True, True)})
    return out


def loss_structure(loss: torch.nn.Module) -> str:
    """:func:`_structure` as one string (the planner's lane key uses it)."""
    return repr(sorted((str(k), repr(v)) for k, v in _structure(loss).items()))


def lane_state_differences(losses: Sequence[torch.nn.Module]) -> list[str]:
    """What the lanes' loss modules differ in, besides tensor values; ``[]`` if they can
    share one vmapped call. Values kept in parameters or buffers (beta, clip_epsilon,
    critic_coeff, entropy_coeff, ...) may differ: they are stacked per lane."""
    ref = _structure(losses[0])
    diff = set()
    for loss in losses[1:]:
        other = _structure(loss)
        diff |= {k for k in ref.keys() | other.keys() if ref.get(k) != other.get(k)}
    return sorted(map(str, diff))


class LanesDisagree(RuntimeError):
    """Lanes took different branches of a Python ``if`` inside the loss (or read
    different values with ``item()``): the call is rerun lane by lane."""


def lanes_equal(lanes: torch.Tensor) -> torch.Tensor:
    """Elementwise: each lane's value equals lane 0's (NaN equals NaN)."""
    first = lanes[0]
    if lanes.is_floating_point():
        return (lanes == first) | (lanes.isnan() & first.isnan())
    return lanes == first

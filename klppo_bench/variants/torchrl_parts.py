"""The one place in klppo_bench that calls torchrl's private ``PPOLoss`` members.

:class:`SurrogateLoss` is the loss module behind every :func:`~klppo_bench.variants.surrogate`
variant: torchrl's ``ClipPPOLoss`` with its surrogate replaced by a per-sample formula. To
give such a variant exactly what ``clip`` gets -- the same advantage normalization, log-ratio,
entropy, critic loss, reduction and diagnostics -- it reuses ``ClipPPOLoss``'s own steps, and
in torchrl 0.14.1 those are private: ``_maybe_normalize_advantage``, ``_log_weight``,
``_clip_bounds``, ``_get_entropy``, ``_weighted_loss_entropy``, ``_has_critic``,
``_reduce_loss`` and ``_clear_weakrefs``. They are called here and nowhere else, so a torchrl
upgrade that renames one breaks this file only (and ``tests/test_surrogate.py``, which checks a
surrogate against the same formula written as a ``ClipPPOLoss`` subclass), never a plugin.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from tensordict import TensorDict
from torchrl.objectives import ClipPPOLoss

from klppo_bench.variants.outputs import NOT_RECORDED, RECORDED

__all__ = ["BOUNDS", "SurrogateLoss"]

BOUNDS = {"symmetric": ("clip_epsilon",),
          "asymmetric": ("clip_epsilon_low", "clip_epsilon_high")}
"""Parameter names that are also ``ClipPPOLoss``'s clip bounds (and give ``clip_fraction``)."""
_WEAKREFS = ("actor_network_params", "critic_network_params", "target_actor_network_params",
             "target_critic_network_params")


class SurrogateLoss(ClipPPOLoss):
    """``ClipPPOLoss`` whose per-sample surrogate is ``objective`` (a class attribute).

    Subclasses are made by :func:`klppo_bench.variants.surrogate.surrogate`; they set
    ``objective`` (the formula), ``inputs`` (which of ``log_ratio``, ``kl``, ``entropy`` it
    reads), ``param_defaults`` (its parameters, each registered as a buffer) and ``bounds``
    (``symmetric``, ``asymmetric`` or ``None``: the clip bounds behind ``clip_fraction``).
    Every other keyword goes to ``ClipPPOLoss``.
    """

    objective: Callable[..., Any]
    inputs: tuple[str, ...] = ()
    param_defaults: dict[str, float | int] = {}
    bounds: str | None = None
    surrogate_name: str = "surrogate"

    def __init__(self, *args, **kwargs):
        values = {k: kwargs.pop(k, d) for k, d in self.param_defaults.items()}
        if self.bounds == "symmetric":
            kwargs["clip_epsilon"] = float(values["clip_epsilon"])
        elif self.bounds == "asymmetric":
            kwargs["clip_epsilon"] = (float(values["clip_epsilon_low"]),
                                      float(values["clip_epsilon_high"]))
        super().__init__(*args, **kwargs)
        clip_names = BOUNDS.get(self.bounds, ())
        for name, value in values.items():
            if name not in clip_names:  # the clip bounds are torchrl's own buffers already
                dtype = torch.int64 if isinstance(value, int) else torch.get_default_dtype()
                self.register_buffer(name, torch.tensor(value, dtype=dtype))

    def forward(self, tensordict):
        tensordict = tensordict.clone(False)
        advantage = tensordict.get(self.tensor_keys.advantage, None)
        if advantage is None:
            raise KeyError(f"surrogate {self.surrogate_name}: no {self.tensor_keys.advantage!r} "
                           "in the batch (the harness computes it with GAE)")
        advantage = self._maybe_normalize_advantage(advantage, tensordict, update_norm=False)
        # the behaviour policy, from the batch's loc/scale before the actor overwrites them
        old = self.actor_network.build_dist_from_params(tensordict) if "kl" in self.inputs \
            else None
        log_weight, dist, kl_approx, log_is_weight = self._log_weight(
            tensordict, adv_shape=advantage.shape[:-1])
        log_ratio = log_weight if log_is_weight is None else log_weight + log_is_weight
        args = {"ratio": log_ratio.exp(), "advantage": advantage}
        entropy = kl = None
        if "entropy" in self.inputs or self.entropy_bonus:
            entropy = self._get_entropy(dist, adv_shape=advantage.shape[:-1])
        if old is not None:  # KL(old || new), per sample, as KLPENPPOLoss computes it
            kl = torch.distributions.kl_divergence(old, dist).unsqueeze(-1)
        optional = {"log_ratio": log_ratio, "entropy": entropy, "kl": kl}
        args.update({k: optional[k] for k in self.inputs})
        args.update({name: getattr(self, name) for name in self.param_defaults})
        objective, extras = self._split(type(self).objective(**args), args["ratio"])
        out = TensorDict({"loss_objective": -objective})
        if self.bounds is not None:
            clipped = log_weight.clamp(*self._clip_bounds)
            out.set("clip_fraction", (clipped != log_weight).to(log_weight.dtype).mean())
        out.set("kl_approx", kl_approx.detach().mean())
        if kl is not None:
            out.set("kl", kl.detach())
        for key, value in extras.items():
            out.set(key, value.detach().to(objective.dtype).mean())
        if self.entropy_bonus:
            out.set("entropy", entropy.detach().mean())
            out.set("loss_entropy", self._weighted_loss_entropy(entropy))
        if self._has_critic:
            loss_critic, value_clip_fraction, explained_variance = self.loss_critic(tensordict)
            out.set("loss_critic", loss_critic)
            if value_clip_fraction is not None:
                out.set("value_clip_fraction", value_clip_fraction)
            if explained_variance is not None:
                out.set("explained_variance", explained_variance)
        out = out.named_apply(lambda name, value: self._reduce_loss(value, tensordict).squeeze(-1)
                              if name.startswith("loss_") else value)
        self._clear_weakrefs(tensordict, out, *_WEAKREFS)
        return out

    def _split(self, result, ratio: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The formula's result: a per-sample objective, or ``(objective, {name: tensor})``."""
        extras = {}
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):
            result, extras = result
        where = f"surrogate {self.surrogate_name}"
        if not isinstance(result, torch.Tensor) or result.shape != ratio.shape:
            got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
            raise ValueError(f"{where}: the formula returned {got}; allowed: a tensor of the "
                             f"per-sample shape of ratio {tuple(ratio.shape)}, or (that tensor, "
                             "dict of diagnostics)")
        for key, value in extras.items():
            if (not isinstance(key, str) or key.startswith("loss_") or key in RECORDED
                    or key in NOT_RECORDED or not isinstance(value, torch.Tensor)):
                raise ValueError(f"{where}: diagnostic {key!r} is invalid; allowed: a name not "
                                 "starting with loss_ and not an output of the suite, mapped to "
                                 "a tensor")
        return result, extras

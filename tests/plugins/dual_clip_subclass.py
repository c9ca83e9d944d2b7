"""Test plugin: Dual-Clip PPO written the other way, as a ``ClipPPOLoss`` subclass that
overrides ``forward`` (the subclass route of ``docs/objectives.md``): the variant
``dual-clip-subclass``.

The shipped example (``examples/dual_clip.py``) states the same objective as one
``@surrogate`` formula; ``tests/test_surrogate.py`` checks that both train alike. This module
also returns a key of its own, ``dual_clip_fraction`` (recorded as
``extra/dual_clip_fraction``), and its constructor rejects ``dual_clip_c <= 1`` with a
``ValueError`` while its ``Param`` allows ``dual_clip_c >= 0``: on purpose, so the tests
can check that a loss constructor's error is reported as a config error.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torchrl.objectives import ClipPPOLoss

from klppo_bench.variants import Param, Variant, register
from klppo_bench.variants.builtin import CLIP_EPSILON


class DualClipPPOLoss(ClipPPOLoss):
    """Clipped surrogate with the dual clip ``c * A`` for negative advantages."""

    def __init__(self, *args, dual_clip_c: float = 3.0, **kwargs):
        super().__init__(*args, **kwargs)
        if dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
        self.register_buffer("dual_clip_c", torch.tensor(float(dual_clip_c)))

    def forward(self, tensordict):
        tensordict = tensordict.clone(False)
        advantage = self._maybe_normalize_advantage(
            tensordict.get(self.tensor_keys.advantage), tensordict, update_norm=False)
        log_weight, dist, kl_approx, _ = self._log_weight(tensordict,
                                                          adv_shape=advantage.shape[:-1])
        clipped = log_weight.clamp(*self._clip_bounds)
        gain = torch.minimum(log_weight.exp() * advantage, clipped.exp() * advantage)
        dual = torch.maximum(gain, self.dual_clip_c * advantage)
        negative = advantage < 0
        out = TensorDict({
            "loss_objective": -torch.where(negative, dual, gain).mean(),
            "clip_fraction": (clipped != log_weight).to(gain.dtype).mean(),
            "dual_clip_fraction": (negative & (dual > gain)).to(gain.dtype).mean(),
            "kl_approx": kl_approx.detach().mean(),
        })
        if self.entropy_bonus:
            entropy = self._get_entropy(dist, adv_shape=advantage.shape[:-1])
            out.set("entropy", entropy.detach().mean())
            out.set("loss_entropy", self._weighted_loss_entropy(entropy).mean())
        if self.critic_network is not None and float(self.critic_coeff) > 0:
            loss_critic, _, explained_variance = self.loss_critic(tensordict)
            out.set("loss_critic", loss_critic.mean())
            out.set("explained_variance", explained_variance)
        return out


DUAL_CLIP_SUBCLASS = register(Variant(
    name="dual-clip-subclass",
    loss_class=DualClipPPOLoss,
    description="test only: Dual-Clip PPO as a ClipPPOLoss subclass",
    kl_estimator="none",
    beta_rule="none",
    params={"clip_epsilon": CLIP_EPSILON,
            "dual_clip_c": Param(3.0, float, "dual clip bound c (the loss requires > 1)",
                                 low=0.0)},
))


class NoObjectiveLoss(ClipPPOLoss):
    """Returns its objective under another name: refused at planning."""

    def forward(self, tensordict):
        out = super().forward(tensordict)
        out.set("loss_surrogate", out.get("loss_objective"))
        return out.exclude("loss_objective")


register(Variant(name="no-objective", loss_class=NoObjectiveLoss, kl_estimator="none",
                 beta_rule="none", description="test only: output without loss_objective",
                 params={"clip_epsilon": CLIP_EPSILON}))

"""Dual-Clip PPO (Ye et al., 2020, "Mastering Complex Control in MOBA Games with Deep RL"),
written as a user would: a ``ClipPPOLoss`` subclass that overrides ``forward``, registered as
the variant ``dual-clip``.

For a negative advantage the clipped surrogate ``min(r A, clip(r, 1-eps, 1+eps) A)`` is
unbounded below as the ratio ``r`` grows; Dual-Clip bounds it by ``c A`` (``c > 1``):

    objective = max(min(r A, clip(r) A), c A)   if A < 0,   min(r A, clip(r) A) otherwise.

Run it with ``--plugin examples/dual_clip.py`` (or ``plugins: [../examples/dual_clip.py]`` in
a spec under ``experiments/``). ``dual_clip_c`` is a buffer, like torchrl's ``clip_epsilon``,
so settings that differ only in ``c`` share one batched job as lanes. The batched engine runs
this very ``forward`` for every lane (``tests/test_batched.py`` checks it against the module
applied to each seed's own networks).
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torchrl.objectives import ClipPPOLoss

from klppo_bench.variants import Param, Variant, register
from klppo_bench.variants.builtin import ALIASES, COMMON


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
        gain = torch.where(negative, dual, gain)
        out = TensorDict({
            "loss_objective": -gain.mean(),
            "clip_fraction": (clipped != log_weight).to(gain.dtype).mean(),
            "dual_clip_fraction": (negative & (dual > torch.minimum(
                log_weight.exp() * advantage, clipped.exp() * advantage))).to(gain.dtype).mean(),
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


DUAL_CLIP = register(Variant(
    name="dual-clip",
    loss_class=DualClipPPOLoss,
    description="Dual-Clip PPO: clipped surrogate, negative advantages bounded by c*A (example)",
    kl_estimator="none",
    beta_rule="none",
    params={"clip_epsilon": Param(0.2, float, "clip range epsilon", low=0.0, low_open=True,
                                  high=1.0, high_open=True),
            "dual_clip_c": Param(3.0, float, "dual clip bound c (> 1)", low=1.0, low_open=True),
            **COMMON},
    aliases=ALIASES,
))

"""The harness parameters every variant shares, so that variants are compared on one setup.

:class:`~klppo_bench.variants.variant.Variant` adds :data:`COMMON` to the parameters of every
variant that does not set them itself: a variant registered with only its own parameter trains
with the PPO paper's MuJoCo setup (no entropy bonus, squared-error value loss, advantage
normalization), not with torchrl's constructor defaults (entropy bonus 0.01, smooth-l1 value
loss, no normalization). ``klppo-bench variants --params`` says where each value comes from.
"""

from __future__ import annotations

from klppo_bench.variants.params import Param

COMMON = {
    "entropy_bonus": Param(False, bool, "add an entropy bonus (the paper uses none on MuJoCo)"),
    "samples_mc_entropy": Param(1, int, "samples for a Monte-Carlo entropy estimate", low=1),
    "entropy_coeff": Param(0.0, float, "entropy bonus coefficient", low=0.0),
    "critic_coeff": Param(1.0, float, "value-loss coefficient c1", low=0.0),
    "loss_critic_type": Param("l2", str, "value loss", choices=("l1", "l2", "smooth_l1")),
    "normalize_advantage": Param(True, bool, "standardize advantages per minibatch"),
    "separate_losses": Param(False, bool, "shared parameters trained by the policy loss only"),
}
"""Keyword arguments of torchrl's ``PPOLoss`` family, at the PPO paper's MuJoCo values."""

ALIASES = {"entropy_coef": "entropy_coeff", "critic_coef": "critic_coeff"}
"""Alternative names of common parameters (each applies where its target is a parameter)."""

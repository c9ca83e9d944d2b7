"""Built-in variants: the PPO paper's rows, on torchrl's loss classes.

Defaults follow the PPO paper's MuJoCo setup (no entropy bonus, squared-error critic loss),
not torchrl's (entropy bonus 0.01, smooth-l1 critic loss); README lists every deviation.
Ranges are the ones torchrl enforces (``increment >= 1``, ``decrement <= 1``) plus the ones
that make the math meaningful (``dtarg > 0``, ``samples_mc_kl >= 1``).

This module only defines them (:data:`BUILTINS`); the registry registers them on first use.
Every built-in lists :data:`COMMON` explicitly, as it did before every variant got the common
parameters by default, so their definitions (and run ids) are unchanged.
"""

from __future__ import annotations

from torchrl.objectives import ClipPPOLoss, KLPENPPOLoss, PPOLoss

from klppo_bench.variants.common import ALIASES, COMMON
from klppo_bench.variants.distributions import JointNormal, JointNormalMC
from klppo_bench.variants.params import Param
from klppo_bench.variants.variant import Variant

__all__ = ["ADAPTIVE", "ALIASES", "BUILTINS", "CLIP_EPSILON", "COMMON", "FIXED_PIN",
           "KL_PENALTY", "MONTE_CARLO"]

CLIP_EPSILON = Param(0.2, float, "clip range epsilon", low=0.0, low_open=True, high=1.0,
                     high_open=True)
KL_PENALTY = {
    "dtarg": Param(0.01, float, "target KL of the adaptive rule", low=0.0, low_open=True),
    "beta": Param(1.0, float, "initial KL coefficient (stored as float)", low=0.0),
}
ADAPTIVE = {
    "increment": Param(2.0, float, "beta multiplier when KL > 1.5 dtarg", low=1.0),
    "decrement": Param(0.5, float, "beta multiplier when KL < dtarg / 1.5",
                       low=0.0, low_open=True, high=1.0),
    "beta_schedule": Param("iteration", str, "minibatch: torchrl's per-call rule; "
                           "iteration: the paper's once-per-update rule",
                           choices=("minibatch", "iteration"), loss_kwarg=None),
}
MONTE_CARLO = {
    "samples_mc_kl": Param(1, int, "samples of the Monte-Carlo KL estimate", low=1),
}
FIXED_PIN = {"increment": 1.0, "decrement": 1.0}


def _klpen(name: str, description: str, adaptive: bool, mc: bool) -> Variant:
    params = {**KL_PENALTY, **(ADAPTIVE if adaptive else {}), **(MONTE_CARLO if mc else {}),
              **COMMON}
    return Variant(
        name=name,
        loss_class=KLPENPPOLoss,
        description=description,
        kl_estimator="monte-carlo" if mc else "analytic",
        beta_rule="adaptive" if adaptive else "fixed",
        params=params,
        pinned={} if adaptive else FIXED_PIN,
        distribution_class=JointNormalMC if mc else JointNormal,
        aliases=ALIASES,
    )


BUILTINS = [
    Variant(
        name="clip",
        loss_class=ClipPPOLoss,
        description="clipped surrogate, epsilon 0.2 (the PPO paper's best row)",
        kl_estimator="none",
        beta_rule="none",
        params={"clip_epsilon": CLIP_EPSILON, **COMMON},
        aliases=ALIASES,
    ),
    Variant(
        name="no-clip",
        loss_class=PPOLoss,
        description="unclipped surrogate (the paper's 'no clipping or penalty' row)",
        kl_estimator="none",
        beta_rule="none",
        params=dict(COMMON),
        aliases=ALIASES,
    ),
    _klpen("klpen-adaptive", "KL penalty, analytic KL, adaptive beta (dtarg 0.01, x2 / x0.5)",
           adaptive=True, mc=False),
    _klpen("klpen-adaptive-mc", "KL penalty, Monte-Carlo KL (samples_mc_kl), adaptive beta",
           adaptive=True, mc=True),
    _klpen("klpen-fixed", "KL penalty, analytic KL, fixed beta (increment = decrement = 1)",
           adaptive=False, mc=False),
    _klpen("klpen-fixed-mc", "KL penalty, Monte-Carlo KL, fixed beta", adaptive=False, mc=True),
]

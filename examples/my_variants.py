"""A user's own loss variants, added without forking klppo-bench: the subclass route of
``docs/objectives.md`` (a one-formula objective is shorter with ``@surrogate``, as in
``examples/dual_clip.py``).

Use it with ``--plugin examples/my_variants.py`` (or ``--plugin my_variants`` from the
folder that holds it), or ship it in a package with an entry point. Neither variant lists the
common harness parameters (no entropy bonus, squared-error value loss, ...): every variant gets
them unless it sets them itself (``klppo-bench variants --params`` shows where each comes from).
"""

from torchrl.objectives import ClipPPOLoss, KLPENPPOLoss

from klppo_bench.variants import JointNormal, Param, Variant, register
from klppo_bench.variants.builtin import ADAPTIVE, CLIP_EPSILON, KL_PENALTY

# 1. A registry entry on an existing torchrl loss, with other defaults.
register(Variant(
    name="klpen-tight",
    loss_class=KLPENPPOLoss,
    description="adaptive KL penalty with a tight target (dtarg 0.003, x1.5 / x1/1.5)",
    kl_estimator="analytic",
    beta_rule="adaptive",
    params={**KL_PENALTY, **ADAPTIVE,
            "dtarg": Param(0.003, float, "target KL", low=0.0, low_open=True),
            "increment": Param(1.5, float, "beta multiplier up", low=1.0),
            "decrement": Param(1 / 1.5, float, "beta multiplier down", low=0.0, low_open=True,
                               high=1.0)},
    distribution_class=JointNormal,
))


# 2. A new objective: a subclass of a torchrl loss (here: clipping plus a fixed KL term).
class ClipKLLoss(ClipPPOLoss):
    """Clipped surrogate plus ``kl_coeff`` times the closed-form KL to the behaviour policy."""

    def __init__(self, *args, kl_coeff: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.kl_coeff = kl_coeff

    def forward(self, tensordict):
        out = super().forward(tensordict)
        from torch.distributions import kl_divergence

        old = self.actor_network.build_dist_from_params(tensordict)
        with self.actor_network_params.to_module(self.actor_network):
            new = self.actor_network.get_dist(tensordict.copy())
        kl = kl_divergence(old, new).mean()
        out.set("loss_objective", out["loss_objective"] + self.kl_coeff * kl)
        out.set("kl", kl.detach())
        return out


register(Variant(
    name="clip-kl",
    loss_class=ClipKLLoss,
    description="clipped surrogate + 0.1 x analytic KL (a user-defined objective)",
    kl_estimator="analytic",
    beta_rule="none",
    params={"clip_epsilon": CLIP_EPSILON,
            "kl_coeff": Param(0.1, float, "weight of the KL term", low=0.0)},
))

"""Policy distributions chosen on purpose, so each variant takes the KL path it claims.

torchrl 0.14's ``KLPENPPOLoss`` decides between the closed-form KL and the Monte-Carlo
estimate with ``torchrl.modules.distributions.has_analytic_kl``: the analytic path is taken
whenever torch's KL registry holds a closed form for the (old, new) pair (``Independent``
and ``TransformedDistribution`` pairs are resolved through their base distributions). There
is no switch to force Monte-Carlo, so the choice is made through the distribution class:

* :class:`JointNormal` -- a diagonal Gaussian whose ``log_prob`` and KL are *joint* over the
  action vector (``Independent(Normal, 1)``). A plain ``Normal`` would give per-dimension
  KL, and ``kl.mean()`` would then be the joint KL divided by the action dimension.
* :class:`JointNormalMC` -- the same density, sampling and entropy, but deliberately *not*
  an ``Independent``/``Normal`` subclass, so no closed-form KL is registered for it and the
  loss must use its ``samples_mc_kl``-sample Monte-Carlo estimate.
"""

from __future__ import annotations

import torch
from torch import distributions as D
from torchrl.modules.distributions import IndependentNormal


class JointNormal(IndependentNormal):
    """Diagonal Gaussian over the whole action vector; closed-form joint KL.

    Args:
        loc: mean, shape ``[*batch, action_dim]``.
        scale: standard deviation, same shape (positive).
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, **kwargs):
        super().__init__(loc, scale, tanh_loc=False, **kwargs)

    @property
    def deterministic_sample(self) -> torch.Tensor:
        return self.base_dist.loc


class JointNormalMC(D.Distribution):
    """Diagonal Gaussian over the action vector with no registered closed-form KL.

    Same ``log_prob``/``sample``/``entropy`` as :class:`JointNormal`; only the KL path of
    ``KLPENPPOLoss`` differs (Monte-Carlo with ``samples_mc_kl`` samples from the old policy).
    """

    arg_constraints = {"loc": D.constraints.real, "scale": D.constraints.positive}
    support = D.constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, **kwargs):
        self._joint = D.Independent(D.Normal(loc, scale), 1)
        super().__init__(
            self._joint.batch_shape, self._joint.event_shape, validate_args=False
        )

    @property
    def loc(self) -> torch.Tensor:
        return self._joint.base_dist.loc

    @property
    def scale(self) -> torch.Tensor:
        return self._joint.base_dist.scale

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    @property
    def mode(self) -> torch.Tensor:
        return self.loc

    @property
    def deterministic_sample(self) -> torch.Tensor:
        return self.loc

    @property
    def variance(self) -> torch.Tensor:
        return self.scale.pow(2)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return self._joint.rsample(sample_shape)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return self._joint.sample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self._joint.log_prob(value)

    def entropy(self) -> torch.Tensor:
        return self._joint.entropy()


def joint_normal_kl(
    old_loc: torch.Tensor, old_scale: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Closed-form KL(old || new) of two diagonal Gaussians, summed over the action dim."""
    return D.kl_divergence(
        D.Independent(D.Normal(old_loc, old_scale), 1),
        D.Independent(D.Normal(loc, scale), 1),
    )

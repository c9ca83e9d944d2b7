"""torchrl 0.14.1's PPO losses, per seed, on stacked networks.

``PPOLoss``, ``ClipPPOLoss`` and ``KLPENPPOLoss`` cannot run under ``vmap`` as they are
(``KLPENPPOLoss.forward`` updates its ``beta`` buffer in place from the data), so their
math is reproduced here for S seeds at once, reading every hyperparameter from the torchrl
loss module the variant builds (:func:`loss_spec`). What is reproduced, per seed:

* advantage standardization per minibatch: ``(a - mean) / std.clamp_min(1e-6)`` with the
  unbiased std (``torchrl._utils._standardize``), when ``normalize_advantage`` and B > 1;
* ``log_weight = log pi(a) - stored log-prob``; ``kl_approx = mean(-log_weight)``;
* unclipped objective ``-mean(exp(lw) * A)``; clipped: ``lw`` clamped to
  ``[log1p(-eps), log1p(eps)]``, ``-mean(min(exp(lw) A, exp(lw_clip) A))``, clip fraction;
* KL penalty: closed-form joint Gaussian KL, or the Monte-Carlo estimate
  ``mean_k(log p_old(x_k) - log p_new(x_k))`` with ``x_k`` drawn from the old policy
  (``samples_mc_kl`` draws; the caller passes the standard-normal noise so each seed draws
  from its own generator); ``-mean(exp(lw) A - beta KL)``; then beta is multiplied by
  ``increment`` if ``mean KL > 1.5 dtarg`` and by ``decrement`` if ``< dtarg / 1.5``. torchrl
  updates ``beta.data`` after building the graph, so the *value* of the loss uses the old
  beta and its *gradient* the new one; both are reproduced;
* entropy bonus ``-coeff * mean(H)`` (analytic Gaussian entropy) when enabled;
* critic loss ``critic_coeff * mean(d(target, V))`` with ``d`` = squared error (``l2``, no
  1/2), ``l1`` or ``smooth_l1``; no critic term when ``critic_coeff`` is 0; explained
  variance ``1 - Var(target - V) / (Var(target) + eps)``.

``tests/test_batched.py`` feeds identical weights and data to torchrl's module and to
:func:`batched_loss` and requires equal values, KL, beta trajectories and gradients for every
registry variant and both beta schedules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchrl.objectives import ClipPPOLoss, KLPENPPOLoss, PPOLoss
from torchrl.modules.distributions.utils import has_analytic_kl

from klppo_bench.harness.batched_nets import StackedActorCritic
from klppo_bench.variants.distributions import JointNormal, JointNormalMC

_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))
_ADV_EPS = torch.finfo(torch.float).resolution  # torchrl._utils._standardize's default


class BatchUnsupported(ValueError):
    """This configuration cannot run on the batched engine (use the reference engine)."""


@dataclass(frozen=True)
class LossSpec:
    """The hyperparameters of one torchrl PPO loss module, as plain values."""

    objective: str
    """``ppo`` (PPOLoss), ``clip`` (ClipPPOLoss) or ``klpen`` (KLPENPPOLoss)."""
    normalize_advantage: bool
    entropy_bonus: bool
    entropy_coeff: float
    critic_coeff: float | None
    """``None``: no critic term (torchrl drops it when the coefficient is 0)."""
    loss_critic_type: str
    clip_epsilon: float | None = None
    dtarg: float | None = None
    beta: float | None = None
    """Initial beta (KL penalty only)."""
    increment: float = 1.0
    decrement: float = 1.0
    samples_mc_kl: int = 1
    analytic_kl: bool = True


def loss_spec(loss, distribution_class) -> LossSpec:
    """Read a torchrl loss module built by ``Variant.build_loss``.

    Raises:
        BatchUnsupported: a loss class, distribution or option the batched engine does not
            reproduce (the message names it).
    """
    kind = {PPOLoss: "ppo", ClipPPOLoss: "clip", KLPENPPOLoss: "klpen"}.get(type(loss))
    if kind is None:
        raise BatchUnsupported(f"loss class {type(loss).__name__} (batched engine reproduces "
                               "PPOLoss, ClipPPOLoss and KLPENPPOLoss)")
    if not issubclass(distribution_class, (JointNormal, JointNormalMC)):
        raise BatchUnsupported(f"distribution {distribution_class.__name__} (batched engine: "
                               "JointNormal, JointNormalMC)")
    unsupported = {
        "clip_value": loss.clip_value is not None,
        "delay_actor": loss.delay_actor,
        "max_importance_ratio": loss.max_importance_ratio is not None,
        "advantage_norm": loss.advantage_norm is not None,
        "reduction": loss.reduction != "mean",
        "normalize_advantage_exclude_dims": bool(loss.normalize_advantage_exclude_dims),
        "entropy_coeff mapping": loss._entropy_coeff_map is not None,
        "asymmetric clip_epsilon": getattr(loss, "_asymmetric_clip", False),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise BatchUnsupported(f"loss option(s) {', '.join(bad)}")
    probe = distribution_class(torch.zeros(1, 1), torch.ones(1, 1))
    spec = dict(
        objective=kind,
        normalize_advantage=bool(loss.normalize_advantage),
        entropy_bonus=bool(loss.entropy_bonus),
        entropy_coeff=float(loss.entropy_coeff),
        critic_coeff=float(loss.critic_coeff) if loss._has_critic else None,
        loss_critic_type=loss.loss_critic_type,
    )
    if kind == "clip":
        spec["clip_epsilon"] = float(loss.clip_epsilon)
    if kind == "klpen":
        spec.update(dtarg=float(loss.dtarg), beta=float(loss.beta),
                    increment=float(loss.increment), decrement=float(loss.decrement),
                    samples_mc_kl=int(loss.samples_mc_kl),
                    analytic_kl=has_analytic_kl(probe, probe))
    return LossSpec(**spec)


def normal_log_prob(x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Joint diagonal-Gaussian log-density (torch's ``Normal.log_prob`` summed over the last dim)."""
    var = scale**2
    return (-((x - loc) ** 2) / (2 * var) - scale.log() - _LOG_SQRT_2PI).sum(-1)


def normal_kl(old_loc, old_scale, loc, scale) -> torch.Tensor:
    """Closed-form joint KL(old || new) (torch's ``_kl_normal_normal`` summed over the last dim)."""
    var_ratio = (old_scale / scale).pow(2)
    t1 = ((old_loc - loc) / scale).pow(2)
    return (0.5 * (var_ratio + t1 - 1 - var_ratio.log())).sum(-1)


def normal_entropy(scale: torch.Tensor) -> torch.Tensor:
    return (0.5 + 0.5 * math.log(2 * math.pi) + torch.log(scale)).sum(-1)


def _distance(target: torch.Tensor, value: torch.Tensor, kind: str) -> torch.Tensor:
    fn = {"l2": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss}[kind]
    return fn(target, value, reduction="none")


def kl_per_sample(spec: LossSpec, old_loc, old_scale, loc, scale,
                  mc_noise: torch.Tensor | None) -> torch.Tensor:
    """KL(old || new) per sample ``[S, B]`` as the loss estimates it.

    ``mc_noise``: standard-normal draws ``[S, samples_mc_kl, B, A]`` (Monte-Carlo path only).
    """
    if spec.analytic_kl:
        return normal_kl(old_loc, old_scale, loc, scale)
    if mc_noise is None:
        raise ValueError("the Monte-Carlo KL needs mc_noise [S, samples_mc_kl, B, A]")
    old_loc, old_scale = old_loc.unsqueeze(1), old_scale.unsqueeze(1)
    x = old_loc + old_scale * mc_noise  # = torch.normal(old_loc, old_scale), same draws
    previous = normal_log_prob(x, old_loc, old_scale)
    current = normal_log_prob(x, loc.unsqueeze(1), scale.unsqueeze(1))
    return (previous - current).mean(1)


def batched_loss(spec: LossSpec, nets: StackedActorCritic, batch: dict[str, torch.Tensor],
                 beta: torch.Tensor | None = None,
                 mc_noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One loss call for S seeds.

    Args:
        batch: ``observation [S,B,D]``, ``action [S,B,A]``, ``log_prob [S,B]`` (behaviour
            policy), ``loc``/``scale [S,B,A]`` (behaviour policy), ``advantage`` and
            ``value_target [S,B,1]``.
        beta: ``[S]`` KL coefficients (KL penalty); updated *in place* like torchrl's buffer.
        mc_noise: see :func:`kl_per_sample`.

    Returns:
        Per-seed ``[S]`` tensors: ``total`` (the sum of the ``loss_*`` terms, what the harness
        backpropagates), ``loss_objective``, ``loss_critic``, ``loss_entropy``, ``kl``
        (mean), ``kl_approx``, ``clip_fraction``, ``explained_variance``, ``entropy`` --
        each only where torchrl's module outputs it.
    """
    adv = batch["advantage"]
    if spec.normalize_advantage and adv[0].numel() > 1:
        mean = adv.mean(dim=(1, 2), keepdim=True)
        std = adv.std(dim=(1, 2), keepdim=True)
        adv = (adv - mean) / std.clamp_min(_ADV_EPS)
    loc = nets.loc(batch["observation"])
    scale = nets.scale().expand_as(loc)
    log_prob = normal_log_prob(batch["action"], loc, scale)
    log_weight = (log_prob - batch["log_prob"]).unsqueeze(-1)
    out = {"kl_approx": (-log_weight).detach().mean(dim=(1, 2))}
    gain = log_weight.exp() * adv
    if spec.objective == "clip":
        eps = torch.tensor(spec.clip_epsilon, device=adv.device)
        clipped = log_weight.clamp((-eps).log1p(), eps.log1p())
        out["clip_fraction"] = (clipped != log_weight).to(adv.dtype).mean(dim=(1, 2))
        gain = torch.stack([gain, clipped.exp() * adv], -1).min(dim=-1).values
    elif spec.objective == "klpen":
        kl = kl_per_sample(spec, batch["loc"], batch["scale"], loc, scale, mc_noise).unsqueeze(-1)
        kl_mean = kl.detach().mean(dim=(1, 2))
        old_beta = beta.clone()
        grow, shrink = kl_mean > spec.dtarg * 1.5, kl_mean < spec.dtarg / 1.5
        beta.copy_(torch.where(grow, beta * spec.increment,
                               torch.where(shrink, beta * spec.decrement, beta)))
        # value with the old beta, gradient with the new one (torchrl mutates beta.data
        # after the product is in the graph)
        b_old, b_new = old_beta.view(-1, 1, 1), beta.view(-1, 1, 1)
        gain = gain - (b_old * kl + (b_new - b_old) * (kl - kl.detach()))
        out["kl"] = kl_mean
    out["loss_objective"] = (-gain).mean(dim=(1, 2))
    total = out["loss_objective"]
    if spec.entropy_bonus:
        entropy = normal_entropy(scale)
        out["entropy"] = entropy.detach().mean(1)
        out["loss_entropy"] = (-spec.entropy_coeff * entropy).mean(1)
        total = total + out["loss_entropy"]
    if spec.critic_coeff is not None:
        target = batch["value_target"]
        value = nets.value(batch["observation"])
        loss_value = _distance(target, value, spec.loss_critic_type)
        out["loss_critic"] = (spec.critic_coeff * loss_value).mean(dim=(1, 2))
        total = total + out["loss_critic"]
        with torch.no_grad():
            resid = torch.var(target - value, correction=0, dim=1)
            var = torch.var(target, correction=0, dim=1)
            out["explained_variance"] = (1.0 - resid / (var + torch.finfo(target.dtype).eps))[:, 0]
    out["total"] = total
    return out

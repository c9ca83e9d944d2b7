"""Beta schedules of the KL-penalty objective: the one place where beta moves, in both engines.

torchrl's ``KLPENPPOLoss.forward`` has its own rule (multiply its ``beta`` buffer by
``increment`` when the minibatch KL exceeds ``1.5 * dtarg``, by ``decrement`` when it is below
``dtarg / 1.5``). A KL-penalty loss is built with that rule switched off (``dtarg = nan``:
neither comparison is ever true; ``increment = decrement = 1``) and the schedule applies the
rule with the run's own ``dtarg``, ``increment`` and ``decrement``. Both engines call the same
hooks on a beta tensor: the loss's ``beta`` buffer (reference engine) or one lane's entry of
the stacked buffer (batched engine, which can then vectorize the loss: torchrl's rule is a
data-dependent Python ``if`` that ``vmap`` cannot run).

* ``minibatch`` -- torchrl's rule on every loss call, from that minibatch's mean KL.
  :meth:`MinibatchBeta.after_loss` runs after the forward pass and before the backward pass
  and writes ``beta.data`` in place, exactly as torchrl does, so the *value* of the loss uses
  the old beta and its *gradient* the new one (tested).
* ``iteration`` -- the PPO paper's rule: beta changes once per policy update, from the mean KL
  of the whole batch after the epochs, as estimated by the loss itself (so a Monte-Carlo
  variant adapts on its Monte-Carlo estimate).
* ``fixed`` -- beta never moves.
* ``none`` -- the loss has no beta.
"""

from __future__ import annotations

import math

import torch

RULE_OFF = {"dtarg": math.nan, "increment": 1.0, "decrement": 1.0}
"""Loss keywords that switch torchrl's in-forward beta rule off."""


def _adapt(beta: torch.Tensor, kl: float, params) -> None:
    dtarg = float(params["dtarg"])
    if kl > 1.5 * dtarg:
        beta.data.mul_(float(params["increment"]))
    elif kl < dtarg / 1.5:
        beta.data.mul_(float(params["decrement"]))


class BetaSchedule:
    """How beta moves. ``buffer`` names the loss buffer holding it (``None``: no beta)."""

    name = "none"
    buffer: str | None = None

    def loss_overrides(self) -> dict:
        """Keywords forced on the loss constructor by this schedule."""
        return {}

    def after_loss(self, beta: torch.Tensor, kl_mean: float, params) -> None:
        """Hook after each loss call, before its backward pass.

        Args:
            beta: the beta tensor (updated in place through ``.data``).
            kl_mean: the call's mean KL(old || new), by the loss's estimator (its ``kl``).
            params: the run's resolved variant parameters.
        """

    def after_iteration(self, beta: torch.Tensor, batch_kl: float, params) -> None:
        """Hook after the epochs of an iteration; ``batch_kl`` is the whole batch's mean KL."""


class FixedBeta(BetaSchedule):
    name = "fixed"
    buffer = "beta"

    def loss_overrides(self) -> dict:
        return dict(RULE_OFF)


class MinibatchBeta(FixedBeta):
    name = "minibatch"

    def after_loss(self, beta: torch.Tensor, kl_mean: float, params) -> None:
        _adapt(beta, kl_mean, params)


class IterationBeta(FixedBeta):
    name = "iteration"

    def after_iteration(self, beta: torch.Tensor, batch_kl: float, params) -> None:
        _adapt(beta, batch_kl, params)


_SCHEDULES = {s.name: s for s in (BetaSchedule, FixedBeta, MinibatchBeta, IterationBeta)}


def make_beta_schedule(name: str) -> BetaSchedule:
    return _SCHEDULES[name]()

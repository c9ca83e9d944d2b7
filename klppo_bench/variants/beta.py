"""Beta schedules of the KL-penalty objective.

* ``minibatch`` -- torchrl's own rule: ``KLPENPPOLoss.forward`` multiplies its ``beta``
  buffer by ``increment`` when the minibatch KL exceeds ``1.5 * dtarg`` and by ``decrement``
  when it is below ``dtarg / 1.5``, on *every* call (eval mode too). Because the update is
  in place, the gradient of the minibatch in which beta changes is taken with the new beta.
* ``iteration`` -- the PPO paper's rule: beta changes once per policy update, from the mean
  KL of the whole batch after the epochs. The loss is built with ``increment = decrement =
  1`` (torchrl's per-call update becomes a no-op) and :meth:`IterationBeta.after_iteration`
  applies the same thresholds to the full-batch KL after the epochs, as estimated by the
  loss itself (so a Monte-Carlo variant adapts on its Monte-Carlo estimate).
* ``fixed`` -- ``increment = decrement = 1``: beta never moves.
* ``none`` -- the loss has no beta.
"""

from __future__ import annotations

import torch


class BetaSchedule:
    """How beta moves; the harness calls :meth:`after_iteration` once per iteration."""

    name = "none"

    def loss_overrides(self) -> dict:
        """Keywords forced on the loss constructor by this schedule."""
        return {}

    def after_iteration(self, loss, batch_kl: float, params) -> None:
        """Hook after the epochs of an iteration.

        Args:
            loss: the loss module (its ``beta`` buffer is updated in place).
            batch_kl: mean KL(old || new) over the whole batch, by the loss's estimator.
            params: the variant's resolved parameters.
        """


class FixedBeta(BetaSchedule):
    name = "fixed"

    def loss_overrides(self) -> dict:
        return {"increment": 1.0, "decrement": 1.0}


class MinibatchBeta(BetaSchedule):
    name = "minibatch"


class IterationBeta(BetaSchedule):
    name = "iteration"

    def loss_overrides(self) -> dict:
        return {"increment": 1.0, "decrement": 1.0}

    def after_iteration(self, loss, batch_kl: float, params) -> None:
        dtarg = float(params["dtarg"])
        with torch.no_grad():
            if batch_kl > 1.5 * dtarg:
                loss.beta.mul_(float(params["increment"]))
            elif batch_kl < dtarg / 1.5:
                loss.beta.mul_(float(params["decrement"]))


_SCHEDULES = {s.name: s for s in (BetaSchedule, FixedBeta, MinibatchBeta, IterationBeta)}


def make_beta_schedule(name: str) -> BetaSchedule:
    return _SCHEDULES[name]()

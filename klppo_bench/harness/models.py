"""Actor and critic built from torchrl modules.

The PPO paper's MuJoCo policy: an MLP (64-64 tanh) maps observations to the action mean,
a state-independent log standard deviation is a free parameter, and the critic is a
separate MLP of the same shape. The distribution class comes from the variant (it decides
the KL path; see :mod:`klppo_bench.variants.distributions`).

With ``trunk=shared`` one MLP trunk feeds a linear actor head and a linear value head, wired
as torchrl's ``KLPENPPOLoss`` documentation describes:

* ``operator`` -- ``ActorValueOperator(common, actor_head, value_head)``; the loss gets
  ``get_policy_operator()`` and ``get_value_operator()``, so the critic reruns the trunk;
* ``single-call`` -- the loss gets the same policy operator and the bare value head, which
  reads the ``hidden`` the actor just wrote on the loss's own copy of the batch (torchrl
  losses evaluate the actor before the critic), so the critic adds no trunk pass.

``ActorValueOperator``, not ``ActorCriticOperator``: the latter is for Q(s, a) critics and
refuses a ``state_value`` head. With ``separate_losses=True`` torchrl keeps critic gradients
out of the trunk in both wirings: the operator critic gets detached copies of the shared
parameters, and the loss detaches the batch (``hidden`` included) before the critic reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tensordict.nn import ProbabilisticTensorDictSequential, TensorDictModule
from torch import nn
from torchrl.envs.utils import ExplorationType
from tensordict.nn.distributions.continuous import AddStateIndependentNormalScale
from torchrl.modules import ActorValueOperator, ProbabilisticActor, ValueOperator

from klppo_bench.config import ModelConfig

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}


@dataclass
class Models:
    """What the harness needs from the model builder.

    Attributes:
        policy: the module the collector and the evaluator call (writes action, log-prob,
            loc and scale).
        loss_actor / loss_critic: what the loss receives.
        value: a full value network (observation -> state_value), for GAE.
        modules: every module holding parameters (for the optimizer and checkpoints).
    """

    policy: ProbabilisticTensorDictSequential
    loss_actor: ProbabilisticTensorDictSequential
    loss_critic: TensorDictModule
    value: TensorDictModule
    modules: nn.ModuleList


def _linear(n_in: int, n_out: int, gain: float) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def _mlp(n_in: int, hidden: tuple[int, ...], activation: str) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [_linear(n_in, width, math.sqrt(2)), _ACTIVATIONS[activation]()]
        n_in = width
    return nn.Sequential(*layers), n_in


def _actor_head(n_in: int, action_dim: int, cfg: ModelConfig) -> nn.Sequential:
    return nn.Sequential(
        _linear(n_in, action_dim, 0.01),
        AddStateIndependentNormalScale(
            action_dim, scale_mapping="exp", init_value=cfg.log_std_init
        ),
    )


def _probabilistic(module: TensorDictModule, distribution_class) -> ProbabilisticActor:
    return ProbabilisticActor(
        module,
        in_keys=["loc", "scale"],
        distribution_class=distribution_class,
        return_log_prob=True,
        default_interaction_type=ExplorationType.RANDOM,
    )


def build_models(obs_dim: int, action_dim: int, cfg: ModelConfig, distribution_class,
                 device: torch.device | str = "cpu") -> Models:
    """Build the policy and value networks on ``device`` (seed torch first)."""
    if cfg.trunk == "separate":
        body, width = _mlp(obs_dim, cfg.hidden, cfg.activation)
        actor_net = nn.Sequential(body, _actor_head(width, action_dim, cfg))
        policy = _probabilistic(
            TensorDictModule(actor_net, in_keys=["observation"], out_keys=["loc", "scale"]),
            distribution_class,
        )
        vbody, vwidth = _mlp(obs_dim, cfg.hidden, cfg.activation)
        value = ValueOperator(nn.Sequential(vbody, _linear(vwidth, 1, 1.0)),
                              in_keys=["observation"])
        models = Models(policy, policy, value, value, nn.ModuleList([policy, value]))
    else:
        body, width = _mlp(obs_dim, cfg.hidden, cfg.activation)
        common = TensorDictModule(body, in_keys=["observation"], out_keys=["hidden"])
        actor_head = _probabilistic(
            TensorDictModule(_actor_head(width, action_dim, cfg), in_keys=["hidden"],
                             out_keys=["loc", "scale"]),
            distribution_class,
        )
        value_head = ValueOperator(_linear(width, 1, 1.0), in_keys=["hidden"])
        operator = ActorValueOperator(common, actor_head, value_head)
        policy = operator.get_policy_operator()
        value = operator.get_value_operator()
        loss_critic = value if cfg.wiring == "operator" else value_head
        models = Models(policy, policy, loss_critic, value, nn.ModuleList([operator]))
    models.modules.to(device)
    return models

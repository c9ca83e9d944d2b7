"""The actor and critic of S seeds, stacked along a leading seed dimension.

Every parameter of :func:`klppo_bench.harness.models.build_models` (separate trunks: an MLP
to the action mean plus a state-independent log-std, and an MLP critic) becomes one tensor
of shape ``[S, *shape]``; a layer is one ``baddbmm`` over all seeds, so one call evaluates
the S policies on their own observations (``[S, B, obs_dim] -> [S, B, action_dim]``). No
operation mixes seeds, so each seed's outputs and gradients are its own.

Each seed is initialised by the reference builder itself (``torch.manual_seed(seed)`` then
``build_models``), so seed ``s`` starts from exactly the reference engine's weights.
:func:`build_lanes` builds a job's lanes: these networks and, on the same parameters, the
variant's loss module for every lane (:class:`~.lanes.LaneLoss`).
"""

from __future__ import annotations

import torch
from tensordict.nn.distributions.continuous import AddStateIndependentNormalScale
from torch import nn

from klppo_bench.config import ModelConfig, RunConfig
from klppo_bench.harness.batched.lanes import LaneLoss
from klppo_bench.harness.models import Models, build_models
from klppo_bench.variants import get_variant

_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "elu": nn.functional.elu}
SCALE_LB = 1e-4
"""``AddStateIndependentNormalScale``'s default lower bound on the scale (torchrl/tensordict)."""


def reference_parameters(models: Models) -> list[nn.Parameter]:
    """A separate-trunk model's parameters in a fixed order: actor linears (weight, bias),
    the log-std, then critic linears. :class:`StackedActorCritic` uses the same order."""
    actor = [m for m in models.policy.modules() if isinstance(m, nn.Linear)]
    scale = [m for m in models.policy.modules() if isinstance(m, AddStateIndependentNormalScale)]
    critic = [m for m in models.value.modules() if isinstance(m, nn.Linear)]
    if len(scale) != 1 or not actor or not critic:
        raise ValueError("expected separate-trunk models from build_models")
    out = [p for m in actor for p in (m.weight, m.bias)]
    out.append(scale[0].state_independent_scale)
    out += [p for m in critic for p in (m.weight, m.bias)]
    return out


def init_seed_models(obs_dim: int, action_dim: int, cfg: ModelConfig, distribution_class,
                     seed: int) -> tuple[Models, torch.Tensor]:
    """The reference engine's initial models for ``seed`` and torch's RNG state right after
    building them (the reference samples actions from that state onwards)."""
    torch.manual_seed(seed)
    models = build_models(obs_dim, action_dim, cfg, distribution_class, "cpu")
    return models, torch.get_rng_state()


class StackedActorCritic(nn.Module):
    """S separate-trunk actor-critics as stacked parameters (built on their device; do not
    move it afterwards).

    Attributes:
        actor_w / actor_b: per layer, ``[S, out, in]`` and ``[S, out]``.
        log_std: ``[S, action_dim]`` (scale = ``exp(log_std).clamp_min(1e-4)`` as torchrl's).
        critic_w / critic_b: per layer; the last layer has one output (the state value).
    """

    def __init__(self, per_seed: list[list[torch.Tensor]], n_actor_layers: int,
                 activation: str, device: torch.device | str = "cpu"):
        super().__init__()
        stacked = [torch.stack([p[i].detach() for p in per_seed]).to(device).clone()
                   for i in range(len(per_seed[0]))]
        k = 2 * n_actor_layers
        self.actor_w = nn.ParameterList(stacked[0:k:2])
        self.actor_b = nn.ParameterList(stacked[1:k:2])
        self.log_std = nn.Parameter(stacked[k])
        self.critic_w = nn.ParameterList(stacked[k + 1::2])
        self.critic_b = nn.ParameterList(stacked[k + 2::2])
        self.act = _ACTIVATIONS[activation]
        # plain tuples of the same Parameter objects: ParameterList indexing costs ~us per layer
        self._actor = tuple(zip(self.actor_w, self.actor_b))
        self._critic = tuple(zip(self.critic_w, self.critic_b))

    @classmethod
    def from_models(cls, models: list[Models], cfg: ModelConfig,
                    device: torch.device | str = "cpu") -> "StackedActorCritic":
        per_seed = [reference_parameters(m) for m in models]
        n_actor = sum(1 for m in models[0].policy.modules() if isinstance(m, nn.Linear))
        return cls(per_seed, n_actor, cfg.activation, device)

    @property
    def seeds(self) -> int:
        return self.log_std.shape[0]

    def ordered_parameters(self) -> list[nn.Parameter]:
        """Stacked counterparts of :func:`reference_parameters`, in the same order."""
        out = [p for w, b in zip(self.actor_w, self.actor_b) for p in (w, b)]
        out.append(self.log_std)
        out += [p for w, b in zip(self.critic_w, self.critic_b) for p in (w, b)]
        return out

    def _mlp(self, layers, x: torch.Tensor) -> torch.Tensor:
        last = len(layers) - 1
        for i, (w, b) in enumerate(layers):
            x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
            if i < last:
                x = self.act(x)
        return x

    def loc(self, obs: torch.Tensor) -> torch.Tensor:
        """Action means, ``[S, B, obs_dim] -> [S, B, action_dim]``."""
        return self._mlp(self._actor, obs)

    def scale(self) -> torch.Tensor:
        """Standard deviations, ``[S, 1, action_dim]`` (state-independent)."""
        return self.log_std.exp().clamp_min(SCALE_LB).unsqueeze(1)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """State values, ``[S, B, obs_dim] -> [S, B, 1]``."""
        return self._mlp(self._critic, obs)


def build_lanes(cfgs: list[RunConfig], obs_dim: int, action_dim: int, device: torch.device,
                generators: list[torch.Generator] | None = None):
    """The lanes' stacked networks and their vectorized loss, from each run's own models.

    Returns ``(nets, lane_loss, init_states)``; ``init_states[s]`` is torch's RNG state right
    after lane ``s``'s models were built (where its reference run starts sampling).

    Raises:
        LaneUnsupported: the lanes' loss modules cannot share one vmapped call.
    """
    variant = get_variant(cfgs[0].variant)
    inits = [init_seed_models(obs_dim, action_dim, c.model, variant.distribution_class, c.seed)
             for c in cfgs]
    models = [m for m, _ in inits]
    losses = [variant.build_loss(m.loss_actor, m.loss_critic, c.loss)
              for m, c in zip(models, cfgs)]
    nets = StackedActorCritic.from_models(models, cfgs[0].model, device)
    if generators is None:
        generators = [torch.Generator().manual_seed(c.seed) for c in cfgs]
    shared = {id(p): q for p, q in zip(reference_parameters(models[0]), nets.ordered_parameters())}
    return nets, LaneLoss(losses, shared, generators), [state for _, state in inits]

"""Environments: gymnasium tasks through torchrl's wrapper and transforms.

Transforms, in order: double observations are cast to float32; observations are normalized
by running statistics (``VecNorm``, equal weight on every sample like the PPO paper's
running filter) and clipped; episode return and length are tracked (``RewardSum``,
``StepCounter``). Actions are clipped to the action box inside the simulator only
(gymnasium's ``ClipAction``, which handles per-dimension bounds; torchrl's ``ClipTransform``
takes scalars only), so the stored action and its log-probability stay those of the
unbounded Gaussian policy.
"""

from __future__ import annotations

import warnings

import torch
from torchrl.envs import (
    ClipTransform,
    Compose,
    DoubleToFloat,
    GymWrapper,
    RewardSum,
    StepCounter,
    TransformedEnv,
    VecNormV2,
)


def make_env(env_id: str, seed: int, num_envs: int = 1, obs_norm: bool = True,
             obs_clip: float = 10.0) -> TransformedEnv:
    """A seeded torchrl env for ``env_id``; ``num_envs > 1`` uses a gymnasium vector env."""
    import gymnasium as gym

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if num_envs > 1:
            raw = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync",
                               wrappers=[gym.wrappers.ClipAction])
        else:
            raw = gym.wrappers.ClipAction(gym.make(env_id))
        base = GymWrapper(raw)
    transforms = [DoubleToFloat()]
    if obs_norm:
        transforms.append(VecNormV2(in_keys=["observation"], decay=1.0, eps=1e-8,
                                    reduce_batch_dims=num_envs > 1))
    if obs_clip > 0:
        transforms.append(ClipTransform(in_keys=["observation"], low=-obs_clip, high=obs_clip))
    transforms += [
        RewardSum(),
        StepCounter(),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = TransformedEnv(base, Compose(*transforms))
    env.set_seed(seed)
    return env


def obs_normalizer(env: TransformedEnv) -> VecNormV2 | None:
    for t in env.transform:
        if isinstance(t, VecNormV2):
            return t
    return None


def sync_obs_stats(src: TransformedEnv, dst: TransformedEnv) -> None:
    """Copy ``src``'s normalization statistics into ``dst`` and freeze ``dst``'s."""
    a, b = obs_normalizer(src), obs_normalizer(dst)
    if a is None or b is None:
        return
    with torch.no_grad():
        b._loc.copy_(a._loc)
        b._var.copy_(a._var)
        b._count.copy_(a._count)
    b.freeze()

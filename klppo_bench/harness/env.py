"""Environments: gymnasium tasks through torchrl's wrapper and transforms.

Transforms, in order: double observations are cast to float32; observations are normalized
by running statistics (:class:`RunningObsNorm`, the PPO paper's running filter) and
clipped; episode return and length are tracked (``RewardSum``,
``StepCounter``). Actions are clipped to the action box inside the simulator only
(gymnasium's ``ClipAction``, which handles per-dimension bounds; torchrl's ``ClipTransform``
takes scalars only), so the stored action and its log-probability stay those of the
unbounded Gaussian policy.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torchrl.data import Unbounded
from torchrl.envs import (
    ClipTransform,
    Compose,
    DoubleToFloat,
    GymWrapper,
    RewardSum,
    StepCounter,
    Transform,
    TransformedEnv,
)


class RunningObsNorm(Transform):
    """Observation normalization by running mean and variance (baselines' RunningMeanStd).

    Not torchrl's ``VecNormV2``, for a measured reason: it keeps ``E[x^2]`` and ``E[x]`` in
    float32 and takes ``var = E[x^2] - E[x]^2``, which rounding makes negative; ``sqrt``
    then gives NaN observations (seen on Hopper-v5, seed 3, within the first 256 steps).
    Here the statistics are merged with Chan et al.'s parallel update in float64, starting
    from mean 0, var 1, count 1e-4 as in OpenAI baselines; output is clipped to
    ``[-clip, clip]`` (``clip = 0`` disables). ``frozen`` stops the updates (evaluation).
    """

    def __init__(self, shape: torch.Size, clip: float = 10.0, eps: float = 1e-8,
                 in_keys=("observation",)):
        super().__init__(in_keys=list(in_keys), out_keys=list(in_keys))
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))
        self.clip, self.eps, self.frozen = clip, eps, False

    def update(self, obs: torch.Tensor) -> None:
        x = obs.detach().to(torch.float64).reshape(-1, *self.mean.shape)
        n = x.shape[0]
        batch_mean, batch_var = x.mean(0), x.var(0, unbiased=False)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.var.copy_((self.var * self.count + batch_var * n
                        + delta.pow(2) * self.count * n / total) / total)
        self.count.copy_(total)

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        out = (obs.to(torch.float64) - self.mean) / torch.sqrt(self.var + self.eps)
        if self.clip > 0:
            out = out.clamp(-self.clip, self.clip)
        return out.to(obs.dtype)

    def _apply_transform(self, obs: torch.Tensor) -> torch.Tensor:
        if not self.frozen:
            self.update(obs)
        return self.normalize(obs)

    def _reset(self, tensordict, tensordict_reset):
        # Only the sub-envs that were reset bring new observations into the statistics.
        mask = None if tensordict is None else tensordict.get("_reset", None)
        for key in self.in_keys:
            obs = tensordict_reset.get(key)
            if not self.frozen:
                self.update(obs if mask is None else obs[mask.reshape(obs.shape[:-1])])
            tensordict_reset.set(key, self.normalize(obs))
        return tensordict_reset

    def transform_observation_spec(self, observation_spec):
        for key in self.in_keys:
            spec = observation_spec[key]
            observation_spec[key] = Unbounded(spec.shape, device=spec.device, dtype=spec.dtype)
        return observation_spec


def env_problem(env_id: str) -> str | None:
    """Why ``env_id`` cannot be trained here, in one line, or ``None``.

    The policy is a Gaussian over a flat vector and the models are MLPs, so the env must have
    a continuous action space (a float ``Box`` of shape ``(n,)``) and a flat ``Box``
    observation; an env that cannot be made (a missing package) is refused too.
    """
    return _env_problem(env_id)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence what C code prints on file descriptor 2 (MuJoCo warns about HalfCheetah's
    model on every load): validating a spec should print nothing but its verdict."""
    import os
    import sys

    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@functools.lru_cache(maxsize=64)
def _env_problem(env_id: str) -> str | None:
    import gymnasium as gym
    import numpy as np

    try:
        with warnings.catch_warnings(), _quiet_stderr():
            warnings.simplefilter("ignore")
            env = gym.make(env_id)
    except Exception as err:  # noqa: BLE001 -- a missing dependency, a broken registration
        first = (str(err).strip().splitlines() or [""])[0][:200]
        return f"cannot be made here ({type(err).__name__}: {first})"
    try:
        act, obs = env.action_space, env.observation_space
    finally:
        with contextlib.suppress(Exception):
            env.close()
    if not isinstance(act, gym.spaces.Box) or not np.issubdtype(act.dtype, np.floating) \
            or len(act.shape) != 1:
        return (f"its action space is {act}; allowed: envs with continuous actions (a float "
                "Box of shape (n,)), e.g. the MuJoCo tasks")
    if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1:
        return (f"its observation space is {obs}; allowed: envs with flat vector observations "
                "(a Box of shape (n,)), e.g. the MuJoCo tasks")
    return None


def make_env(env_id: str, seed: int, num_envs: int = 1, obs_norm: bool = True,
             obs_clip: float = 10.0) -> TransformedEnv:
    """A seeded torchrl env for ``env_id``; ``num_envs > 1`` uses a gymnasium vector env."""
    import gymnasium as gym

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if num_envs > 1:
            raw = gym.vector.SyncVectorEnv(
                [lambda: gym.wrappers.ClipAction(gym.make(env_id))] * num_envs,
                autoreset_mode=gym.vector.AutoresetMode.DISABLED,  # torchrl resets sub-envs
            )
        else:
            raw = gym.wrappers.ClipAction(gym.make(env_id))
        base = GymWrapper(raw)
    transforms = [DoubleToFloat()]
    if obs_norm:
        obs_shape = base.observation_spec["observation"].shape[len(base.batch_size):]
        transforms.append(RunningObsNorm(obs_shape, clip=obs_clip))
    elif obs_clip > 0:
        transforms.append(ClipTransform(in_keys=["observation"], low=-obs_clip, high=obs_clip))
    transforms += [
        RewardSum(),
        StepCounter(),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = TransformedEnv(base, Compose(*transforms))
    # sub-env i gets seed * num_envs + i (torchrl seeds a vector env seed, seed+1, ...):
    # runs of different seeds never share an environment seed.
    env.set_seed(seed * num_envs)
    return env


def obs_normalizer(env: TransformedEnv) -> RunningObsNorm | None:
    for t in env.transform:
        if isinstance(t, RunningObsNorm):
            return t
    return None


def sync_obs_stats(src: TransformedEnv, dst: TransformedEnv) -> None:
    """Copy ``src``'s normalization statistics into ``dst`` and freeze ``dst``'s."""
    a, b = obs_normalizer(src), obs_normalizer(dst)
    if a is None or b is None:
        return
    b.load_state_dict(a.state_dict())
    b.frozen = True

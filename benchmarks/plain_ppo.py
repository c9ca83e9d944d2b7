"""A minimal plain-torch PPO loop: the yardstick the throughput benchmarks compare against.

Same hyperparameters as the harness defaults (:mod:`klppo_bench.config`): 2048 steps per
iteration, 10 epochs, minibatch 64, Adam 3e-4 annealed to 0, gamma 0.99, lambda 0.95, 64-64
tanh actor and critic (orthogonal init), state-independent log-std, running observation
normalization (equal weights, clipped to +-10), gradient-norm clip 0.5, clipped surrogate
(epsilon 0.2), squared-error critic loss. The raw gymnasium env is stepped directly (actions
clipped to the box in the simulator only). It is not part of the package and has no
diagnostics: it exists only to measure how fast a straightforward PPO loop can run here.

    python benchmarks/plain_ppo.py --env Hopper-v5 --frames 4096
"""

from __future__ import annotations

import argparse
import math
import time

import gymnasium as gym
import numpy as np
import torch
from torch import nn


def _layer(n_in: int, n_out: int, gain: float) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def _mlp(n_in: int, n_out: int, out_gain: float) -> nn.Sequential:
    return nn.Sequential(_layer(n_in, 64, math.sqrt(2)), nn.Tanh(), _layer(64, 64, math.sqrt(2)),
                         nn.Tanh(), _layer(64, n_out, out_gain))


class RunningNorm:
    """Running mean of x and x^2 with equal weights (torchrl VecNormV2, decay=1)."""

    def __init__(self, dim: int, clip: float = 10.0, eps: float = 1e-8):
        self.count, self.mean, self.sq = 0, np.zeros(dim), np.zeros(dim)
        self.clip, self.eps = clip, eps

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        self.count += 1
        w = 1.0 / self.count
        self.mean += w * (obs - self.mean)
        self.sq += w * (obs * obs - self.sq)
        scale = np.sqrt(np.maximum(self.sq - self.mean**2, 0.0)).clip(min=self.eps)
        return np.clip((obs - self.mean) / scale, -self.clip, self.clip)


def run_plain_ppo(env_id: str = "Hopper-v5", frames: int = 4096, seed: int = 0,
                  steps_per_iter: int = 2048, epochs: int = 10, minibatch: int = 64,
                  lr: float = 3e-4, gamma: float = 0.99, lmbda: float = 0.95,
                  clip_eps: float = 0.2, max_grad_norm: float = 0.5) -> dict:
    """Train for ``frames`` env steps; return frames, seconds, env-steps/s and mean return."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    env = gym.wrappers.ClipAction(gym.make(env_id))
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    actor, critic = _mlp(obs_dim, act_dim, 0.01), _mlp(obs_dim, 1, 1.0)
    log_std = nn.Parameter(torch.zeros(act_dim))
    params = [*actor.parameters(), *critic.parameters(), log_std]
    optim = torch.optim.Adam(params, lr=lr)
    norm = RunningNorm(obs_dim)
    T = steps_per_iter
    buf_obs, buf_act = torch.zeros(T, obs_dim), torch.zeros(T, act_dim)
    buf_logp, buf_rew = torch.zeros(T), torch.zeros(T)
    buf_term, buf_done, buf_val = torch.zeros(T), torch.zeros(T), torch.zeros(T + 1)
    iterations = math.ceil(frames / T)
    obs = torch.as_tensor(norm(env.reset(seed=seed)[0]), dtype=torch.float32)
    returns, ep_ret = [], 0.0
    start = time.perf_counter()
    for it in range(iterations):
        for group in optim.param_groups:
            group["lr"] = lr * (1.0 - it / iterations)
        last_val = torch.zeros(())
        with torch.no_grad():
            for t in range(T):
                mean = actor(obs)
                dist = torch.distributions.Normal(mean, log_std.exp())
                action = dist.sample()
                buf_obs[t], buf_act[t] = obs, action
                buf_logp[t], buf_val[t] = dist.log_prob(action).sum(), critic(obs)[0]
                raw, rew, term, trunc, _ = env.step(action.numpy())
                ep_ret += rew
                buf_rew[t], buf_term[t], buf_done[t] = rew, float(term), float(term or trunc)
                next_obs = torch.as_tensor(norm(raw), dtype=torch.float32)
                if term or trunc:
                    # bootstrap a truncated episode from its last state, not from the reset one
                    last_val = critic(next_obs)[0] if trunc and not term else torch.zeros(())
                    buf_rew[t] += gamma * last_val
                    returns.append(ep_ret)
                    ep_ret = 0.0
                    next_obs = torch.as_tensor(norm(env.reset()[0]), dtype=torch.float32)
                obs = next_obs
            buf_val[T] = critic(obs)[0]
            adv, gae = torch.zeros(T), 0.0
            for t in reversed(range(T)):
                nonterminal = 1.0 - buf_done[t]
                delta = buf_rew[t] + gamma * buf_val[t + 1] * nonterminal - buf_val[t]
                gae = delta + gamma * lmbda * nonterminal * gae
                adv[t] = gae
            ret = adv + buf_val[:T]
        for _ in range(epochs):
            for idx in torch.randperm(T).split(minibatch):
                mean = actor(buf_obs[idx])
                dist = torch.distributions.Normal(mean, log_std.exp())
                ratio = (dist.log_prob(buf_act[idx]).sum(-1) - buf_logp[idx]).exp()
                a = adv[idx]
                a = (a - a.mean()) / a.std().clamp_min(1e-6)
                surrogate = torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
                value_loss = (critic(buf_obs[idx]).squeeze(-1) - ret[idx]).pow(2).mean()
                loss = -surrogate.mean() + value_loss
                optim.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, max_grad_norm)
                optim.step()
    seconds = time.perf_counter() - start
    env.close()
    done = iterations * T
    return {"frames": done, "seconds": seconds, "sps": done / seconds,
            "mean_return": float(np.mean(returns)) if returns else math.nan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="Hopper-v5")
    parser.add_argument("--frames", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(run_plain_ppo(args.env, args.frames, args.seed))


if __name__ == "__main__":
    main()

"""The random-policy score of an environment, measured by the suite itself and cached.

The one place the statistics layer runs an environment: min-max and reference normalization
need the score of a uniform-random policy (random = 0), and no published number is measured
the way this suite measures (gymnasium version, episode rules). The score is the mean
undiscounted return of ``episodes`` episodes of actions drawn uniformly from the action space,
seeded, through gymnasium directly. Results are cached in
``<results root>/.cache/random_scores.json`` keyed by env id, episodes and seed, written
atomically so concurrent reports never leave a truncated cache.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np

from klppo_bench.store import atomic_write_json

CACHE_NAME = "random_scores.json"


def cache_key(env_id: str, episodes: int, seed: int) -> str:
    return f"{env_id}|episodes={episodes}|seed={seed}"


def measure_random_score(env_id: str, episodes: int = 100, seed: int = 0) -> dict:
    """Mean return of a uniform-random policy over ``episodes`` seeded episodes.

    The first reset is seeded with ``seed`` (later resets continue its generator) and the
    action space is seeded with ``seed``, so the number is reproducible.

    Returns:
        ``{"env": env_id, "mean": float, "std": float, "episodes": int, "seed": int,
        "gymnasium": version}``.
    """
    import gymnasium as gym

    if episodes < 1:
        raise ValueError(f"episodes={episodes}; allowed: >= 1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make(env_id)
    env.action_space.seed(seed)
    returns = []
    try:
        for k in range(episodes):
            env.reset(seed=seed if k == 0 else None)
            total, done = 0.0, False
            while not done:
                _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    return {"env": env_id, "mean": float(np.mean(returns)), "std": float(np.std(returns)),
            "episodes": episodes, "seed": seed, "gymnasium": gym.__version__}


def random_scores(env_ids: Iterable[str], cache_dir: Path | str, episodes: int = 100,
                  seed: int = 0) -> dict[str, dict]:
    """``{env_id: record}`` for every env, measuring (and caching) only what is missing."""
    path = Path(cache_dir) / CACHE_NAME
    try:
        cache = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        cache = {}
    out, changed = {}, False
    for env_id in sorted(set(env_ids)):
        key = cache_key(env_id, episodes, seed)
        if key not in cache:
            cache[key] = measure_random_score(env_id, episodes, seed)
            changed = True
        out[env_id] = cache[key]
    if changed:
        atomic_write_json(path, cache)
    return out

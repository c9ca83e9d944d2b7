"""Per-iteration metrics resampled onto a common frame grid, ready for rliable.

Input: ``load_experiment(exp_dir, "metrics")`` (long format). Each run's series is
(1) gap-filled by linear interpolation (an iteration in which no episode ended has no
``episode_return``), (2) smoothed by a trailing mean over ``max(1, iterations // 20)``
iterations, (3) linearly interpolated onto a grid of evenly spaced frame counts spanning the
frames every run reached. The result is ``{setting: {env: (runs, points) array}}`` plus the
grid, the shape :mod:`klppo_bench.stats.aggregate` takes.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import pandas as pd

SMOOTH_FRACTION = 20


def _run_series(long: pd.DataFrame, metric: str) -> dict[str, pd.DataFrame]:
    sub = long[long["metric"] == metric]
    return {run_id: g.sort_values("frames") for run_id, g in sub.groupby("run_id", sort=True)}


def smooth(values: np.ndarray) -> np.ndarray | None:
    """Gap-fill and trailing-mean smooth one run's series; ``None`` if it has no value."""
    s = pd.Series(np.asarray(values, float))
    if s.notna().sum() == 0:
        return None
    s = s.interpolate(limit_direction="both")
    window = max(1, len(s) // SMOOTH_FRACTION)
    return s.rolling(window, min_periods=1).mean().to_numpy()


def frame_grid(long: pd.DataFrame, points: int = 50) -> np.ndarray:
    """Evenly spaced frames from the latest first iteration to the earliest last iteration."""
    per_run = long.groupby("run_id")["frames"].agg(["min", "max"])
    lo, hi = float(per_run["min"].max()), float(per_run["max"].min())
    if hi <= lo:
        return np.array([hi])
    return np.linspace(lo, hi, points)


def curve_sets(long: pd.DataFrame, metric: str, grid: np.ndarray,
               transform: Callable[[pd.Series, np.ndarray], np.ndarray] | None = None,
               ) -> dict[str, dict[str, np.ndarray]]:
    """``{setting: {env: (runs, len(grid)) array}}`` of ``metric``.

    ``transform(run_row, values)`` rescales a run's raw values before smoothing (e.g. divide
    KL by the run's dtarg, or min-max normalize returns by the run's env); it gets the run's
    identifying columns (run_id, env, setting, params, seed). Runs without any value of the
    metric (``kl_estimate`` of a clipped variant) are left out of that metric's curves.
    """
    out: dict[str, dict[str, list]] = {}
    for run_id, g in _run_series(long, metric).items():
        first = g.iloc[0]
        values = g["value"].to_numpy(float)
        if transform is not None:
            values = transform(first, values)
        values = smooth(values)
        if values is None:
            continue
        curve = np.interp(grid, g["frames"].to_numpy(float), values)
        out.setdefault(first["setting"], {}).setdefault(first["env"], []).append(curve)
    return {s: {e: np.vstack(c) for e, c in sorted(envs.items())}
            for s, envs in sorted(out.items())}


def restrict(sets: Mapping[str, Mapping[str, np.ndarray]], env: str) -> dict[str, dict]:
    """Only ``env``'s curves (for per-environment learning curves)."""
    return {s: {env: envs[env]} for s, envs in sets.items() if env in envs}

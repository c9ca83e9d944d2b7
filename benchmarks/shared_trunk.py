"""Cost of one loss update with separate networks and with a shared trunk in both wirings.

One update = the variant's loss forward on a 64-sample minibatch, backward of the summed
``loss_*`` terms, and an Adam step -- the inner step of the train loop. The minibatches come
from one real batch (``--batch`` Hopper steps collected by a freshly initialised policy,
GAE computed), and every model configuration sees the same minibatch sequence. One torch
thread. Configurations are interleaved in ``--rounds`` rounds of ``--updates`` timed
updates each, so slow phases of a shared machine hit all of them alike; the table reports
the median time per update (and the 10th / 90th percentiles) and its ratio to ``separate``.

    python benchmarks/shared_trunk.py [--variant klpen-adaptive] [--env Hopper]
        [--rounds 20] [--updates 100] [--out results/perf/shared_trunk.csv]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchrl.collectors import Collector
from torchrl.envs.utils import ExplorationType
from torchrl.objectives.value import GAE

from klppo_bench.config import ModelConfig, resolve_env_id
from klppo_bench.harness.env import make_env
from klppo_bench.harness.models import build_models
from klppo_bench.variants import get_variant

CONFIGS = {
    "separate": ModelConfig(),
    "shared-operator": ModelConfig(trunk="shared", wiring="operator"),
    "shared-single-call": ModelConfig(trunk="shared", wiring="single-call"),
}


def real_batch(env_id: str, variant, steps: int, seed: int):
    """``steps`` env steps of a fresh separate-network policy, with GAE (no ``hidden`` key)."""
    torch.manual_seed(seed)
    env = make_env(env_id, seed)
    obs_dim = env.observation_spec["observation"].shape[-1]
    action_dim = env.action_spec.shape[-1]
    models = build_models(obs_dim, action_dim, ModelConfig(), variant.distribution_class)
    collector = Collector(env, models.policy, frames_per_batch=steps, total_frames=steps,
                          exploration_type=ExplorationType.RANDOM,
                          auto_register_policy_transforms=False)
    data = next(iter(collector))
    collector.shutdown()
    with torch.no_grad():
        GAE(gamma=0.99, lmbda=0.95, value_network=models.value, average_gae=False)(data)
    return data.reshape(-1), obs_dim, action_dim


def make_update(cfg: ModelConfig, variant, obs_dim: int, action_dim: int, seed: int):
    """A closure doing one loss update on a minibatch; also returns the parameter count."""
    torch.manual_seed(seed)
    models = build_models(obs_dim, action_dim, cfg, variant.distribution_class)
    loss = variant.build_loss(models.loss_actor, models.loss_critic, variant.resolve({}))
    params = list(models.modules.parameters())
    optim = torch.optim.Adam(params, lr=3e-4)

    def update(minibatch):
        out = loss(minibatch)
        total = sum(v for k, v in out.items() if k.startswith("loss_"))
        optim.zero_grad(set_to_none=True)
        total.backward()
        optim.step()

    return update, sum(p.numel() for p in params)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="klpen-adaptive")
    parser.add_argument("--env", default="Hopper")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--minibatch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--updates", type=int, default=100, help="timed updates per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/perf/shared_trunk.csv")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    variant = get_variant(args.variant)
    env_id = resolve_env_id(args.env)
    flat, obs_dim, action_dim = real_batch(env_id, variant, args.batch, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    idx = [torch.randperm(flat.numel(), generator=gen)[: args.minibatch]
           for _ in range(args.updates)]
    minibatches = [flat[i].clone() for i in idx]

    updates, n_params = {}, {}
    for name, cfg in CONFIGS.items():
        updates[name], n_params[name] = make_update(cfg, variant, obs_dim, action_dim, args.seed)
        for mb in minibatches[:20]:  # warm-up: allocator, lazy init
            updates[name](mb)
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, update in updates.items():
            for mb in minibatches:
                start = time.perf_counter()
                update(mb)
                times[name].append(time.perf_counter() - start)

    rows = []
    for name, ts in times.items():
        ms = np.array(ts) * 1e3
        rows.append({"model": name, "variant": args.variant, "env": env_id,
                     "minibatch": args.minibatch, "params": n_params[name],
                     "median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
                     "p90_ms": float(np.percentile(ms, 90)), "updates": len(ms)})
    table = pd.DataFrame(rows)
    base = table.loc[table.model == "separate", "median_ms"].iloc[0]
    table["ratio_to_separate"] = table["median_ms"] / base
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    print(f"wrote {out}")
    return table


if __name__ == "__main__":
    main()

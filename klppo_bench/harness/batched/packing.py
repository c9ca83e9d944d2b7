"""Which runs may share one batched job, and why a run cannot be batched.

Lanes of one job share everything but the seed, the variant's parameters and ``train.lr``, and
their loss modules must agree in everything that is not a tensor (:func:`lane_key`): so the
seeds of one setting, and the settings of a ``dtarg x increment`` grid or of the PPO paper's
Table 1 rows that use one loss class, pack into full jobs. A variant whose loss module cannot
run under ``torch.func.vmap`` is found by trying it on a tiny synthetic batch
(:func:`batch_unsupported_reason`); the planner then sends its runs to the reference engine.
"""

from __future__ import annotations

import functools
import json
import os

import torch
from tensordict import TensorDict

from klppo_bench.config import ModelConfig, RunConfig
from klppo_bench.harness.batched.lanes import distribution_validation_off
from klppo_bench.harness.batched.nets import build_lanes, init_seed_models
from klppo_bench.harness.batched.structure import loss_structure
from klppo_bench.variants import get_variant, load_plugins
from klppo_bench.variants.distributions import JointNormal, JointNormalMC

__all__ = ["batch_unsupported_reason", "check_batch", "lane_key"]

_LANE_FREE = ("seed", "loss")
"""Config keys lanes of one job may differ in (and ``train.lr``)."""


def _shared_part(cfg: RunConfig) -> dict:
    d = {k: v for k, v in cfg.to_dict().items() if k not in _LANE_FREE}
    d["train"] = {k: v for k, v in d["train"].items() if k != "lr"}
    return d


def _frozen(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


@functools.lru_cache(maxsize=512)
def _loss_structure(variant: str, plugins: tuple, params: str, model: str) -> str:
    load_plugins(plugins)
    v = get_variant(variant)
    with torch.random.fork_rng(devices=[]):
        models, _ = init_seed_models(3, 2, ModelConfig(**json.loads(model)),
                                     v.distribution_class, 0)
    return loss_structure(v.build_loss(models.loss_actor, models.loss_critic, json.loads(params)))


def _model_json(cfg: RunConfig) -> str:
    return _frozen(cfg.to_dict()["model"])


def lane_key(cfg: RunConfig) -> str:
    """Runs with equal keys can be lanes of one batched job."""
    structure = _loss_structure(cfg.variant, tuple(cfg.plugins), _frozen(cfg.loss),
                                _model_json(cfg))
    schedule = get_variant(cfg.variant).beta_schedule(cfg.loss).name
    return _frozen([_shared_part(cfg), schedule, structure])


def check_batch(cfgs: list[RunConfig]) -> None:
    """Raise ``ValueError`` unless ``cfgs`` is non-empty, its runs distinct, and they differ
    only in the seed, the variant's parameters and ``train.lr``."""
    if not cfgs:
        raise ValueError("a batch needs at least one run config")
    ref = _shared_part(cfgs[0])
    for cfg in cfgs[1:]:
        other = _shared_part(cfg)
        if other != ref:
            diff = sorted(k for k in ref if ref[k] != other.get(k))
            raise ValueError(f"lanes of a batched job must differ only in seed, loss "
                             f"parameters and train.lr; {diff} differ")
    ids = [c.run_id() for c in cfgs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"batched runs need distinct configs (seeds {[c.seed for c in cfgs]})")


@functools.lru_cache(maxsize=512)
def _probe(variant: str, plugins: tuple, params: str, model: str) -> str | None:
    """Run two lanes of the variant's loss under vmap on a tiny synthetic batch, in a forked
    child where the platform has ``fork``: the probe runs the user's loss code, and a loss that
    crashes or kills its process must not take the planning sweep (or ``run``) down with it."""
    import multiprocessing as mp

    # fork only a process whose torch runs one thread: a forked child of a process whose
    # OpenMP pool has started deadlocks in its first parallel op (seen here: the child of a
    # multi-threaded CLI hung). Otherwise a fresh interpreter (slower: it imports torch).
    method = "fork" if torch.get_num_threads() == 1 else "spawn"
    if method not in mp.get_all_start_methods():
        return _probe_here(variant, plugins, params, model)
    ctx = mp.get_context(method)
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_probe_child, args=(send, variant, plugins, params, model),
                        daemon=True)
    child.start()
    send.close()
    reason = "no answer"
    if recv.poll(300):
        try:
            reason = recv.recv()
        except EOFError:  # the child died before it could answer
            reason = "no answer"
    child.join(10)
    if child.is_alive():  # hung: end it, and say so
        child.kill()
        child.join()
        return (f"variant {variant}: trying its loss module under torch.func.vmap did not "
                "finish within 300 s")
    if reason == "no answer":
        code = child.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return (f"variant {variant}: its loss module ended the process that tried it under "
                f"torch.func.vmap ({how})")
    return reason


def _probe_child(send, *args) -> None:
    try:
        send.send(_probe_here(*args))
    finally:
        send.close()
        os._exit(0)


def _probe_here(variant: str, plugins: tuple, params: str, model: str) -> str | None:
    load_plugins(plugins)
    v = get_variant(variant)
    cfg = RunConfig(variant=variant, env="Hopper-v5", seed=0, loss=json.loads(params),
                    plugins=plugins, model=ModelConfig(**json.loads(model)))
    cfgs = [cfg, RunConfig.from_dict({**cfg.to_dict(), "seed": 1})]
    S, B, D, A = 2, 8, 3, 2
    try:
        with torch.random.fork_rng(devices=[]):
            nets, lane_loss, _ = build_lanes(cfgs, D, A, torch.device("cpu"))
            gen = torch.Generator().manual_seed(0)
            obs = torch.randn(S, B, D, generator=gen)
            with torch.no_grad():
                loc = nets.loc(obs) + 0.1 * torch.randn(S, B, A, generator=gen)
                scale = nets.scale().expand(S, B, A)
                action = loc + scale * torch.randn(S, B, A, generator=gen)
                with distribution_validation_off():
                    log_prob = v.distribution_class(loc, scale).log_prob(action)
            batch = TensorDict({"observation": obs, "action": action, "loc": loc, "scale": scale,
                                lane_loss.module.tensor_keys.sample_log_prob: log_prob,
                                "advantage": torch.randn(S, B, 1, generator=gen),
                                "value_target": torch.randn(S, B, 1, generator=gen)}, [S, B])
            rng, structure = torch.get_rng_state(), loss_structure(lane_loss.module)
            out = lane_loss(batch)
            sum(out[k].sum() for k in out.keys()
                if isinstance(k, str) and k.startswith("loss_")).backward()
            if not torch.equal(rng, torch.get_rng_state()):
                return (f"variant {variant}: its loss module ({v.loss_class.__name__}) draws "
                        "from torch's global generator (an op without a generator argument, "
                        "e.g. dropout), which cannot give each lane its own stream")
            if loss_structure(lane_loss.module) != structure:
                return (f"variant {variant}: its loss module ({v.loss_class.__name__}) changes "
                        "its own Python attributes in forward, which lanes would share")
    except Exception as err:  # noqa: BLE001 -- any failure means: not vectorizable as it is
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return (f"variant {variant}: its loss module ({v.loss_class.__name__}) cannot run "
                f"under torch.func.vmap ({type(err).__name__}: {first[:160]})")
    return None


def batch_unsupported_reason(cfg: RunConfig) -> str | None:
    """``None`` if ``cfg`` can run on the batched engine, else why not (one line)."""
    load_plugins(cfg.plugins)
    variant = get_variant(cfg.variant)
    if cfg.model.trunk != "separate":
        return f"model.trunk={cfg.model.trunk} (batched engine: separate trunks only)"
    if not issubclass(variant.distribution_class, (JointNormal, JointNormalMC)):
        return (f"variant {cfg.variant}: distribution {variant.distribution_class.__name__} "
                "(the batched engine samples actions as loc + scale * N(0, 1): JointNormal, "
                "JointNormalMC)")
    return _probe(cfg.variant, tuple(cfg.plugins), _frozen(cfg.loss), _model_json(cfg))

"""Planning checks of a run's loss module, made before anything is written.

``klppo-bench run`` (:func:`klppo_bench.plan.choose_engine`), ``sweep`` and ``sweep --dry-run``
(:func:`klppo_bench.spec.expand`, for every setting before any run starts) call
:func:`check_loss`; each setting is checked once per process.

* **The loss builds with the run's parameters.** The variant's loss class is built with the
  resolved parameters on small networks of the run's model config. An exception from its
  constructor -- a ``ValueError`` or ``TypeError`` rejecting a value, or any other -- is a
  :class:`~klppo_bench.errors.ConfigError`: one line naming the variant, its parameters
  and the loss's message (exit 2, nothing written). It is not a reason to fall back to the
  reference engine: only a genuine ``torch.func.vmap`` limitation is
  (:func:`klppo_bench.harness.batched.batch_unsupported_reason`).
* **Its output keeps the contract** (:mod:`klppo_bench.variants.outputs`): one forward pass on a
  synthetic batch, in a forked child where the platform allows (a plugin's forward may crash
  its process); an output without ``loss_objective`` is a ``ConfigError``. A forward that
  raises, hangs or ends its process is left to the engines, which report it for the run.
"""

from __future__ import annotations

import functools
import json
import os

import torch

from klppo_bench.config import ModelConfig, RunConfig
from klppo_bench.errors import ConfigError
from klppo_bench.variants import get_variant, load_plugins
from klppo_bench.variants.outputs import output_problem
from klppo_bench.variants.registry import error_line

__all__ = ["check_loss"]

_OBS, _ACT, _BATCH = 3, 2, 8
_CHILD_SECONDS = 120


def check_loss(cfg: RunConfig, where: str = "") -> None:
    """Raise :class:`ConfigError` (``where`` + one line) if ``cfg``'s loss cannot be built
    with its parameters or its output lacks ``loss_objective`` (module docstring)."""
    problem = _loss_problem(cfg.variant, tuple(cfg.plugins), cfg.code,
                            json.dumps(cfg.loss, sort_keys=True),
                            json.dumps(cfg.to_dict()["model"], sort_keys=True))
    if problem:
        raise ConfigError(f"{where}{problem}")


def _describe(variant, params: dict) -> str:
    """``with k=v, ...`` for the parameters that differ from the variant's defaults."""
    changed = [f"{k}={v!r}" for k, v in params.items() if v != variant.params[k].default]
    return f"with {', '.join(changed)}" if changed else "at its default parameters"


@functools.lru_cache(maxsize=512)
def _loss_problem(name: str, plugins: tuple, code: str | None, params: str,
                  model: str) -> str | None:
    from tensordict import TensorDict
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    from klppo_bench.harness.models import build_models

    load_plugins(plugins)
    variant = get_variant(name)
    loss_params = json.loads(params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        models = build_models(_OBS, _ACT, ModelConfig(**json.loads(model)),
                              variant.distribution_class)
        try:
            loss = variant.build_loss(models.loss_actor, models.loss_critic, loss_params)
        except Exception as err:  # noqa: BLE001 -- the user's constructor: one line, not a trace
            return (f"variant {name} {_describe(variant, loss_params)}: its loss class "
                    f"{variant.loss_class.__name__} rejected them ({error_line(err)}); "
                    "allowed: values the loss class accepts")
        with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
            batch = models.policy(TensorDict({"observation": torch.randn(_BATCH, _OBS)},
                                             [_BATCH]))
        batch["advantage"] = torch.randn(_BATCH, 1)
        batch["value_target"] = torch.randn(_BATCH, 1)
    problem = _in_child(_output_problem, loss, batch)
    return f"variant {name}: {problem}" if problem else None


def _output_problem(loss, batch) -> str | None:
    try:
        with torch.no_grad():
            out = loss(batch)
    except Exception:  # noqa: BLE001 -- left to the engines (see the module docstring)
        return None
    return output_problem(out)


def _in_child(fn, *args) -> str | None:
    """``fn(*args)`` in a forked child (its answer; ``None`` if it dies or hangs), or here
    where forking is unsafe: a forked child of a process whose OpenMP pool has started
    deadlocks (see :func:`klppo_bench.harness.batched.job`'s probe)."""
    import multiprocessing as mp

    if torch.get_num_threads() != 1 or "fork" not in mp.get_all_start_methods():
        return fn(*args)
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, fn, args), daemon=True)
    child.start()
    send.close()
    answer = None
    try:
        if recv.poll(_CHILD_SECONDS):
            answer = recv.recv()
    except EOFError:  # the child died before it could answer
        answer = None
    child.join(10)
    if child.is_alive():
        child.kill()
        child.join()
    return answer


def _child(send, fn, args) -> None:
    try:
        send.send(fn(*args))
    finally:
        send.close()
        os._exit(0)

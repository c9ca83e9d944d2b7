"""The batched engine: S lanes (runs that differ in seed and in per-lane hyperparameters) trained
together in one process, each through its variant's own loss module.

Read top to bottom like :mod:`klppo_bench.harness.reference` (the torchrl yardstick): the same
loop, with a leading lane dimension on everything. Per iteration the ``S x num_envs`` sub-envs
step together with one stacked policy call per step (:mod:`.envs`, :mod:`.nets`), GAE runs once
over all lanes (torchrl's ``vec_generalized_advantage_estimate``), and ``epochs`` passes of
per-lane shuffled minibatches go through the variant's loss module called for all lanes at once
(:class:`~.lanes.LaneLoss`, ``torch.func.vmap``; calls with gradients are replayed from a
recording of the module's ops, :mod:`.replay`).

Nothing couples lanes. Each keeps, as in the reference engine: its initial weights
(``build_models`` under ``torch.manual_seed(seed)``), its env seeds, its observation statistics,
its action noise and the loss's random draws (a generator that continues torch's RNG state
after that seed's model init, drawing what the reference draws), its minibatch permutation
(``Generator().manual_seed(seed)``), the loss's own per-minibatch advantage normalization, its
Adam state (Adam is elementwise: one Adam on one flat buffer is S independent Adams; lanes with
different ``train.lr`` get one parameter group each), global grad-norm clipping, beta and the
variant's beta schedule (the same hooks the reference engine calls). A lane that diverges is
recorded as failed and the others go on.

What differs from the reference: float rounding (batched matmuls, the replay's merged and
fused ops), and for ``num_envs > 1`` the order of observation-statistics merges (see
:mod:`.envs`). Networks and updates run on
``cfg.device``; envs always on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import operator
import time
from typing import Callable

import numpy as np
import torch
from tensordict import TensorDict
from torchrl.objectives.value.functional import vec_generalized_advantage_estimate

from klppo_bench.config import RunConfig
from klppo_bench.errors import DivergenceError
from klppo_bench.harness.batched.checkpoint import (Checkpointing, envs_state, set_envs_state,
                                                   versions)
from klppo_bench.harness.batched.envs import BatchedEnvs, BatchedEvaluator
from klppo_bench.harness.batched.job import check_batch
from klppo_bench.harness.batched.lanes import (LaneLoss, LaneUnsupported,
                                              distribution_validation_off)
from klppo_bench.harness.batched.nets import (StackedActorCritic, init_seed_models,
                                              reference_parameters)
from klppo_bench.harness.batched.optim import LaneAdam, clip_grad_norm_per_lane
from klppo_bench.harness.common import (EVAL_SEED_OFFSET, RunResult, iteration_row,
                                        max_episode_steps, next_eval_frame, set_lr)
from klppo_bench.variants import get_variant, load_plugins
from klppo_bench.variants.beta import BetaSchedule
from klppo_bench.variants.distributions import joint_normal_kl
from klppo_bench.variants.outputs import recorded_columns

__all__ = ["LaneUnsupported", "build_lanes", "train_batched"]

_LOGGED = frozenset({"loss_objective", "loss_critic", "kl", "kl_approx", "clip_fraction",
                     "explained_variance"})


def _noise(gens: list[torch.Generator], shape: tuple, device: torch.device) -> torch.Tensor:
    """One standard-normal draw of ``shape`` per lane from its own generator -> ``[S, *shape]``."""
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)


def _gae(nets, obs, next_obs, reward, done, terminated, gamma, lmbda, S, E, T):
    """GAE per sub-env trajectory; inputs ``[S, E*T, ...]`` in lane, env, time order."""
    with torch.no_grad():
        value = nets.value(obs).reshape(S * E, T, 1)
        next_value = nets.value(next_obs).reshape(S * E, T, 1)
    shape = (S * E, T, 1)
    adv, target = vec_generalized_advantage_estimate(
        gamma, lmbda, value, next_value, reward.reshape(shape), done.reshape(shape),
        terminated.reshape(shape), time_dim=-2)
    return adv.reshape(S, E * T, 1), target.reshape(S, E * T, 1)


def _lane_means(out: dict[str, torch.Tensor], S: int) -> dict[str, torch.Tensor]:
    """Each recorded loss output's per-lane mean, by metrics column (as the reference's
    ``out[key].mean()``; a lane with one value, the usual reduced loss output, is that value).
    Extra outputs of the module are ``extra/<key>`` (:mod:`klppo_bench.variants.outputs`)."""
    means = {}
    for key, column in sorted(recorded_columns(out).items()):
        value = out[key].detach().reshape(S, -1)
        means[column] = value[:, 0] if value.shape[1] == 1 else value.mean(1)
    return means


def _total(out: dict[str, torch.Tensor]) -> torch.Tensor:
    terms = [v for k, v in out.items() if isinstance(k, str) and k.startswith("loss_")]
    return functools.reduce(operator.add, terms)


@contextlib.contextmanager
def _fewer_gc_passes():
    """The loss call allocates many short-lived Python objects (tensordict, vmap wrappers), so
    the cyclic collector's generation-0 passes run constantly. A higher threshold during
    training was measured ~4% faster (S=5, clip, Hopper, 2 of 2 pairs); restored after."""
    previous = gc.get_threshold()
    gc.set_threshold(50_000, *previous[1:])
    try:
        yield
    finally:
        gc.set_threshold(*previous)


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


def train_batched(cfgs: list[RunConfig], progress: bool | None = None,
                  on_iteration: Callable[[int, dict], None] | None = None,
                  checkpoint: Checkpointing | None = None, loss_calls: dict | None = None
                  ) -> list[RunResult | DivergenceError]:
    """Train the lanes of ``cfgs`` together (see :func:`~.job.check_batch` for what may differ).

    Returns, per config in order, a :class:`~klppo_bench.harness.common.RunResult` with the
    reference engine's schema, or the :class:`DivergenceError` that ended that lane (the
    others go on). ``on_iteration(index, row)`` is called with each lane's metrics row.
    With ``checkpoint``, the job resumes from its checkpoint if there is one and writes new
    ones as it goes (:mod:`.checkpoint`). ``loss_calls``, if given, receives
    :meth:`~.lanes.LaneLoss.call_counts` at the end (replayed vs eager loss calls).

    Raises:
        ValueError: the configs cannot share a job.
        LaneUnsupported: the configuration cannot be batched.
    """
    check_batch(cfgs)
    cfg = cfgs[0]
    load_plugins(cfg.plugins)
    variant = get_variant(cfg.variant)
    torch.set_num_threads(1)
    tc, device = cfg.train, torch.device(cfg.device)
    seeds = [c.seed for c in cfgs]
    S, E = len(cfgs), tc.num_envs
    T = tc.steps_per_iter // E  # steps per sub-env per iteration

    envs = BatchedEnvs(cfg.env, seeds, E, tc.obs_norm, tc.obs_clip)
    evaluator = BatchedEvaluator(cfg.env, seeds, EVAL_SEED_OFFSET, tc.obs_clip, tc.obs_norm)
    D, A = envs.obs_dim, envs.action_dim
    noise_gens = [torch.Generator().manual_seed(0) for _ in seeds]
    nets, lane_loss, init_states = build_lanes(cfgs, D, A, device, noise_gens)
    noise_shape = (A,) if E == 1 else (E, A)  # what the reference's policy draws per step
    for gen, state in zip(noise_gens, init_states):
        gen.set_state(state)  # continue each lane's stream where the reference's would be
        # torchrl's Collector runs the policy once when it is built: one discarded draw
        torch.randn(noise_shape, generator=gen)
    perm_gens = [torch.Generator().manual_seed(s) for s in seeds]
    params = list(nets.parameters())
    optim = LaneAdam(params, [c.train.lr for c in cfgs])
    schedule = variant.beta_schedule(cfg.loss)
    beta = lane_loss.buffer(schedule.buffer) if schedule.buffer else None
    per_minibatch_beta = (beta is not None
                          and type(schedule).after_loss is not BetaSchedule.after_loss)
    log_prob_key = lane_loss.module.tensor_keys.sample_log_prob
    gamma = torch.tensor(tc.gamma, device=device)
    lmbda = torch.tensor(tc.lmbda, device=device)
    lane_ar = torch.arange(S, device=device)[:, None]

    iterations = math.ceil(cfg.frames / tc.steps_per_iter)
    eval_max_steps = max_episode_steps(cfg.env)
    failed: dict[int, DivergenceError] = {}
    rows = [[] for _ in seeds]
    episodes = [[] for _ in seeds]
    evals = [[] for _ in seeds]
    frames, next_eval = 0, next_eval_frame(0, cfg.eval.every)
    start = time.perf_counter()
    obs = envs.reset()
    run_ids = [c.run_id() for c in cfgs]

    def snapshot(next_iteration: int) -> dict:
        return {"run_ids": run_ids, "versions": versions(), "iteration": next_iteration,
                "frames": frames, "next_eval": next_eval, "obs": obs, "rows": rows,
                "episodes": episodes, "evals": evals,
                "failed": {s: str(e) for s, e in failed.items()},
                "wall": time.perf_counter() - start, "params": optim.flat.detach().clone(),
                "optim": optim.state_dict(),
                "buffers": {k: lane_loss.state.get(k).clone() for k in lane_loss.own_keys},
                "noise_gens": [g.get_state() for g in noise_gens],
                "perm_gens": [g.get_state() for g in perm_gens],
                "envs": envs_state(envs, evaluator)}

    first_it = 0
    if checkpoint is not None:
        try:
            envs_state(envs, evaluator)
        except TypeError as err:
            checkpoint.say(f"{cfg.env}: no checkpoints for this job ({err})")
            checkpoint = None
    state = checkpoint.load(run_ids) if checkpoint is not None else None
    if state is not None:  # resume: every stream and accumulator as it was
        with torch.no_grad():
            optim.flat.copy_(state["params"])
            for k, value in state["buffers"].items():
                lane_loss.state.get(k).copy_(value)
        optim.load_state_dict(state["optim"])
        for gens, saved in ((noise_gens, state["noise_gens"]), (perm_gens, state["perm_gens"])):
            for g, st in zip(gens, saved):
                g.set_state(st)
        set_envs_state(envs, evaluator, state["envs"])
        obs, rows, episodes, evals = state["obs"], state["rows"], state["episodes"], state["evals"]
        failed = {s: DivergenceError(m) for s, m in state["failed"].items()}
        frames, next_eval, first_it = state["frames"], state["next_eval"], state["iteration"]
        start -= state["wall"]
        checkpoint.resumed_iteration = first_it
        checkpoint.say(f"resumed {cfg.variant} x{S} lanes from {checkpoint.path.name} at "
                       f"iteration {first_it} of {iterations} ({frames:,} frames per lane)")

    from tqdm.auto import tqdm

    bar = tqdm(total=iterations * tc.steps_per_iter * S, initial=first_it * tc.steps_per_iter * S,
               unit="frame", dynamic_ncols=True,
               disable=None if progress is None else not progress,
               desc=f"{cfg.variant} {cfg.env} x{S} lanes", leave=False)

    def fail(s: int, message: str) -> None:
        if s not in failed:
            failed[s] = DivergenceError(message)

    def alive() -> list[int]:
        return [s for s in range(S) if s not in failed]

    gc_context = _fewer_gc_passes()
    gc_context.__enter__()
    try:
        for it in range(first_it, iterations):
            # ---- collect T steps of every sub-env ----
            buf_obs = np.zeros((T, S, E, D), np.float32)
            buf_next = np.zeros((T, S, E, D), np.float32)
            buf_act = np.zeros((T, S, E, A), np.float32)
            buf_loc = np.zeros((T, S, E, A), np.float32)
            buf_rew = np.zeros((T, S, E), np.float32)
            buf_term = np.zeros((T, S, E), bool)
            buf_done = np.zeros((T, S, E), bool)
            with torch.no_grad():
                scale = nets.scale()  # [S, 1, A], constant during collection
                for t in range(T):
                    loc = nets.loc(torch.from_numpy(obs).to(device))
                    action = loc + scale * _noise(noise_gens, noise_shape, device).view(S, E, A)
                    act_np = action.cpu().numpy()
                    if failed:
                        act_np[list(failed)] = 0.0  # a diverged lane's NaN never reaches MuJoCo
                    step = envs.step(act_np)
                    buf_obs[t], buf_act[t], buf_loc[t] = obs, act_np, loc.cpu().numpy()
                    buf_next[t], buf_rew[t] = step.next_obs, step.reward
                    buf_term[t], buf_done[t] = step.terminated, step.done
                    for s, _, ret, length in step.finished:
                        episodes[s].append((frames + (t + 1) * E, ret, length))
                    obs = step.obs
            t_iter = time.perf_counter()
            frames += tc.steps_per_iter
            N = E * T

            def flat(x: np.ndarray) -> torch.Tensor:  # [T, S, E, ...] -> [S, E*T, ...]
                x = np.moveaxis(x, 0, 2)
                return torch.from_numpy(np.ascontiguousarray(x)).reshape(S, N, *x.shape[3:]).to(device)

            data = TensorDict({"observation": flat(buf_obs), "action": flat(buf_act),
                               "loc": flat(buf_loc), "scale": scale.expand(S, N, A)},
                              batch_size=[S, N])
            with torch.no_grad(), distribution_validation_off():
                # the behaviour policy's log-prob, as the collector stores it
                data[log_prob_key] = variant.distribution_class(
                    data["loc"], data["scale"]).log_prob(data["action"])
            data["advantage"], data["value_target"] = _gae(
                nets, data["observation"], flat(buf_next), flat(buf_rew), flat(buf_done),
                flat(buf_term), gamma, lmbda, S, E, T)
            set_lr(optim, tc, it, iterations)

            # ---- epochs of per-lane shuffled minibatches ----
            stats: dict[str, list[torch.Tensor]] = {}
            for _ in range(tc.epochs):
                perms = torch.stack([torch.randperm(N, generator=g) for g in perm_gens]).to(device)
                shuffled = data[lane_ar, perms]  # one gather per epoch
                for minibatch in shuffled.split(tc.minibatch_size, 1):
                    out = dict(lane_loss(minibatch, _LOGGED).items())
                    total = _total(out)
                    finite = torch.isfinite(total)
                    if not bool(finite.all()):
                        for s in torch.nonzero(~finite).flatten().tolist():
                            bad = {k: float(out[k][s]) for k in out
                                   if isinstance(k, str) and k.startswith("loss_")}
                            fail(s, f"non-finite loss at iteration {it} (frames {frames}): {bad}")
                    means = _lane_means(out, S)
                    if per_minibatch_beta:  # before backward: see MinibatchBeta
                        kl = means["kl"].tolist()
                        for s in alive():
                            schedule.after_loss(beta[s], kl[s], cfgs[s].loss)
                    optim.zero_grad()
                    torch.where(finite, total, torch.zeros_like(total)).sum().backward()
                    grad_norm = clip_grad_norm_per_lane(params, tc.max_grad_norm, S)
                    gfinite = torch.isfinite(grad_norm)
                    if not bool(gfinite.all()):
                        for s in torch.nonzero(~gfinite).flatten().tolist():
                            fail(s, f"non-finite gradient at iteration {it} (frames {frames})")
                    optim.step()
                    for key, value in means.items():
                        stats.setdefault(key, []).append(value)
                    stats.setdefault("grad_norm", []).append(grad_norm)

            # ---- per-lane diagnostics, beta schedule, rows ----
            with torch.no_grad(), distribution_validation_off():
                new_loc, new_scale = nets.loc(data["observation"]), nets.scale().expand(S, N, A)
                kl_batch = joint_normal_kl(data["loc"], data["scale"], new_loc, new_scale)
                entropy = variant.distribution_class(new_loc, new_scale).entropy().mean(1)
                kl_estimate = kl_err = torch.full((S,), math.nan, device=device)
                if variant.kl_estimator != "none":
                    kl_samples = lane_loss(data)["kl"].reshape(S, N)
                    kl_estimate = kl_samples.mean(1)
                    kl_err = (kl_samples - kl_batch).std(1)
            means = {k: torch.stack(v).double().mean(0).cpu().numpy() for k, v in stats.items()}
            kl_estimate, kl_err = kl_estimate.cpu().numpy(), kl_err.cpu().numpy()
            if beta is not None:
                for s in alive():
                    schedule.after_iteration(beta[s], float(kl_estimate[s]), cfgs[s].loss)
            betas = beta.cpu().numpy() if beta is not None else None
            kl_batch_mean, entropy = kl_batch.mean(1).cpu().numpy(), entropy.cpu().numpy()
            now = time.perf_counter()
            lrs = optim.lane_lrs()
            for s in alive():
                rows[s].append(iteration_row(
                    it, frames, tc.steps_per_iter, episodes[s],
                    {k: float(v[s]) for k, v in means.items()},
                    kl_batch=float(kl_batch_mean[s]), kl_estimate=float(kl_estimate[s]),
                    kl_estimate_err_std=float(kl_err[s]),
                    beta=float(betas[s]) if betas is not None else math.nan,
                    entropy=float(entropy[s]), lr=lrs[s], update_seconds=now - t_iter,
                    wall_seconds=now - start))
            if (frames >= next_eval or it == iterations - 1) and alive():
                def policy_mean(o: np.ndarray) -> np.ndarray:
                    with torch.no_grad():
                        return nets.loc(torch.from_numpy(o).to(device)).cpu().numpy()

                results = evaluator.run(policy_mean, envs.norm, cfg.eval.episodes,
                                        eval_max_steps, alive())
                for s, eps in results.items():
                    for k, (ret, length) in enumerate(eps):
                        evals[s].append((frames, k, ret, length))
                    rows[s][-1]["eval_return"] = float(np.mean([r for r, _ in eps]))
                next_eval = next_eval_frame(frames, cfg.eval.every)
            bar.update(tc.steps_per_iter * S)
            if on_iteration is not None:
                for s in alive():
                    on_iteration(s, rows[s][-1])
            if not alive():
                break
            if checkpoint is not None and it < iterations - 1 and checkpoint.due(it):
                checkpoint.save(snapshot(it + 1))
    finally:
        gc_context.__exit__(None, None, None)
        bar.close()
        envs.close()
        evaluator.close()

    wall = time.perf_counter() - start
    if loss_calls is not None:
        loss_calls.update(lane_loss.call_counts())
    out: list[RunResult | DivergenceError] = []
    for s in range(S):
        if s in failed:
            out.append(failed[s])
            continue
        out.append(RunResult.build(cfgs[s], rows[s], episodes[s], evals[s], iterations, wall,
                                   float(beta[s]) if beta is not None else None))
    return out


"""The seed-batched engine: S seeds of one run configuration trained together in one process.

Read top to bottom like :mod:`klppo_bench.harness.train` (the torchrl reference engine): the
same loop, with a leading seed dimension on everything. Per iteration the ``S x num_envs``
sub-envs step together with one batched policy call per step
(:mod:`~klppo_bench.harness.batched_env`), GAE runs once over all seeds (torchrl's
``vec_generalized_advantage_estimate``), and ``epochs`` passes of per-seed shuffled
minibatches go through the variant's loss math on stacked networks
(:mod:`~klppo_bench.harness.batched_loss`, :mod:`~klppo_bench.harness.batched_nets`).

Nothing couples seeds. Each seed keeps, as in the reference engine: its initial weights
(``build_models`` under ``torch.manual_seed(seed)``), its env seeds, its observation
statistics, its action and Monte-Carlo noise (a generator that continues torch's RNG state
after that seed's model init, drawing the same shapes the reference draws), its minibatch
permutation (``Generator().manual_seed(seed)``), advantage normalization per minibatch, Adam
state (Adam is elementwise, so one Adam on one flat buffer of all stacked parameters is S
independent Adams with the same annealed step size), global grad-norm clipping, beta and
beta schedule. A seed that diverges is recorded as failed and the others go on.

What differs from the reference: float rounding (batched matmuls), and for
``num_envs > 1`` the order of observation-statistics merges (see ``batched_env``). Networks
and updates run on ``cfg.device``; envs always on CPU.

Only separate-trunk models and torchrl's three PPO losses are batched
(:func:`batch_unsupported_reason` says why a config is not); the sweep sends such configs
to the reference engine.
"""

from __future__ import annotations

import math
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torchrl.objectives.value.functional import vec_generalized_advantage_estimate

from klppo_bench.config import RunConfig
from klppo_bench.errors import DivergenceError
from klppo_bench.harness.batched_env import BatchedEnvs, BatchedEvaluator
from klppo_bench.harness.batched_loss import (
    BatchUnsupported,
    batched_loss,
    kl_per_sample,
    loss_spec,
    normal_entropy,
    normal_kl,
    normal_log_prob,
)
from klppo_bench.harness.batched_nets import StackedActorCritic, init_seed_models
from klppo_bench.harness.provenance import provenance
from klppo_bench.harness.vector_step import stepper_name
from klppo_bench.harness.train import (EVAL_SEED_OFFSET, RunResult, iteration_row,
                                       max_episode_steps, next_eval_frame, set_lr)
from klppo_bench.store import RunDir
from klppo_bench.variants import get_variant, load_plugins

__all__ = ["BatchUnsupported", "batch_unsupported_reason", "check_batch", "execute_batch",
           "train_batched"]


def check_batch(cfgs: list[RunConfig]) -> None:
    """Raise ``ValueError`` unless ``cfgs`` is non-empty, differs only by seed, seeds distinct."""
    if not cfgs:
        raise ValueError("a batch needs at least one run config")
    ref = {k: v for k, v in cfgs[0].to_dict().items() if k != "seed"}
    for cfg in cfgs[1:]:
        other = {k: v for k, v in cfg.to_dict().items() if k != "seed"}
        if other != ref:
            diff = sorted(k for k in ref if ref[k] != other.get(k))
            raise ValueError(f"batched runs must differ only by seed; {diff} differ")
    seeds = [c.seed for c in cfgs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"batched runs need distinct seeds, got {seeds}")


def batch_unsupported_reason(cfg: RunConfig) -> str | None:
    """``None`` if ``cfg`` can run on the batched engine, else why not (one line)."""
    load_plugins(cfg.plugins)
    variant = get_variant(cfg.variant)
    if cfg.model.trunk != "separate":
        return f"model.trunk={cfg.model.trunk} (batched engine: separate trunks only)"
    with torch.random.fork_rng(devices=[]):  # probing must not move torch's global RNG
        models, _ = init_seed_models(3, 2, cfg.model, variant.distribution_class, 0)
    try:
        loss_spec(variant.build_loss(models.loss_actor, models.loss_critic, cfg.loss),
                  variant.distribution_class)
    except BatchUnsupported as err:
        return f"variant {cfg.variant}: {err}"
    return None


class _BetaView:
    """What a :class:`~klppo_bench.variants.beta.BetaSchedule` needs from a loss: ``beta``
    (here a view of one seed's entry, so in-place updates land in the stacked tensor)."""

    def __init__(self, beta: torch.Tensor):
        self.beta = beta


def after_iteration(schedule, beta: torch.Tensor, batch_kl, params: dict,
                    seeds: list[int]) -> None:
    """Let the variant's beta schedule act on each seed's entry of ``beta`` (in place), from
    that seed's full-batch KL estimate ``batch_kl[s]``."""
    for s in seeds:
        schedule.after_iteration(_BetaView(beta[s]), float(batch_kl[s]), params)


def _noise(gens: list[torch.Generator], shape: tuple, device: torch.device) -> torch.Tensor:
    """One standard-normal draw of ``shape`` per seed from its own generator -> ``[S, *shape]``."""
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)


def _gae(nets, obs, next_obs, reward, done, terminated, gamma, lmbda, S, E, T):
    """GAE per sub-env trajectory; inputs ``[S, E*T, ...]`` in seed, env, time order."""
    with torch.no_grad():
        value = nets.value(obs).reshape(S * E, T, 1)
        next_value = nets.value(next_obs).reshape(S * E, T, 1)
    shape = (S * E, T, 1)
    adv, target = vec_generalized_advantage_estimate(
        gamma, lmbda, value, next_value, reward.reshape(shape), done.reshape(shape),
        terminated.reshape(shape), time_dim=-2)
    return adv.reshape(S, E * T, 1), target.reshape(S, E * T, 1)


def train_batched(cfgs: list[RunConfig], progress: bool | None = None,
                  on_iteration: Callable[[int, dict], None] | None = None
                  ) -> list[RunResult | DivergenceError]:
    """Train the seeds of ``cfgs`` (identical but for the seed) together.

    Returns, per config in order, a :class:`~klppo_bench.harness.train.RunResult` with the
    reference engine's schema, or the :class:`DivergenceError` that ended that seed (the
    other seeds go on). ``on_iteration(index, row)`` is called with each seed's metrics row.

    Raises:
        ValueError: the configs differ by more than the seed.
        BatchUnsupported: the configuration cannot be batched.
    """
    check_batch(cfgs)
    cfg = cfgs[0]
    load_plugins(cfg.plugins)
    variant = get_variant(cfg.variant)
    reason = batch_unsupported_reason(cfg)
    if reason:
        raise BatchUnsupported(reason)
    torch.set_num_threads(1)
    tc, device = cfg.train, torch.device(cfg.device)
    seeds = [c.seed for c in cfgs]
    S, E = len(seeds), tc.num_envs
    T = tc.steps_per_iter // E  # steps per sub-env per iteration

    envs = BatchedEnvs(cfg.env, seeds, E, tc.obs_norm, tc.obs_clip)
    evaluator = BatchedEvaluator(cfg.env, seeds, EVAL_SEED_OFFSET, tc.obs_clip, tc.obs_norm)
    D, A = envs.obs_dim, envs.action_dim
    inits = [init_seed_models(D, A, cfg.model, variant.distribution_class, s) for s in seeds]
    spec = loss_spec(variant.build_loss(inits[0][0].loss_actor, inits[0][0].loss_critic, cfg.loss),
                     variant.distribution_class)
    schedule = variant.beta_schedule(cfg.loss)
    nets = StackedActorCritic.from_models([m for m, _ in inits], cfg.model, device)
    noise_shape = (A,) if E == 1 else (E, A)  # what the reference's policy draws per step
    noise_gens = [torch.Generator().manual_seed(0) for _ in seeds]
    for gen, (_, state) in zip(noise_gens, inits):
        gen.set_state(state)  # continue each seed's stream where the reference's would be
        # torchrl's Collector runs the policy once when it is built: one discarded draw
        torch.randn(noise_shape, generator=gen)
    perm_gens = [torch.Generator().manual_seed(s) for s in seeds]
    params = list(nets.parameters())
    flat_params = _flatten_parameters(params)
    optim = torch.optim.Adam([flat_params], lr=tc.lr)
    beta = torch.full((S,), spec.beta if spec.beta is not None else math.nan, device=device)
    gamma = torch.tensor(tc.gamma, device=device)
    lmbda = torch.tensor(tc.lmbda, device=device)
    seed_ar = torch.arange(S, device=device)[:, None]
    mc = spec.objective == "klpen" and not spec.analytic_kl

    iterations = math.ceil(cfg.frames / tc.steps_per_iter)
    eval_max_steps = max_episode_steps(cfg.env)
    failed: dict[int, DivergenceError] = {}
    rows = [[] for _ in seeds]
    episodes = [[] for _ in seeds]
    evals = [[] for _ in seeds]
    frames, next_eval = 0, next_eval_frame(0, cfg.eval.every)
    start = time.perf_counter()

    from tqdm.auto import tqdm

    bar = tqdm(total=iterations * tc.steps_per_iter * S, unit="frame", dynamic_ncols=True,
               disable=None if progress is None else not progress,
               desc=f"{cfg.variant} {cfg.env} s{seeds[0]}..{seeds[-1]} (x{S})", leave=False)

    def fail(s: int, message: str) -> None:
        if s not in failed:
            failed[s] = DivergenceError(message)

    def alive() -> list[int]:
        return [s for s in range(S) if s not in failed]

    try:
        obs = envs.reset()
        for it in range(iterations):
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
                        act_np[list(failed)] = 0.0  # a diverged seed's NaN never reaches MuJoCo
                    step = envs.step(act_np)
                    buf_obs[t], buf_act[t], buf_loc[t] = obs, act_np, loc.cpu().numpy()
                    buf_next[t], buf_rew[t] = step.next_obs, step.reward
                    buf_term[t], buf_done[t] = step.terminated, step.done
                    for s, _, ret, length in step.finished:
                        episodes[s].append((frames + (t + 1) * E, ret, length))
                    obs = step.obs
            t_iter = time.perf_counter()
            frames += tc.steps_per_iter

            def flat(x: np.ndarray) -> torch.Tensor:  # [T, S, E, ...] -> [S, E*T, ...]
                x = np.moveaxis(x, 0, 2)
                return torch.from_numpy(np.ascontiguousarray(x)).reshape(S, E * T, *x.shape[3:]).to(device)

            data = {"observation": flat(buf_obs), "action": flat(buf_act), "loc": flat(buf_loc)}
            data["scale"] = scale.expand(S, E * T, A)
            data["log_prob"] = normal_log_prob(data["action"], data["loc"], data["scale"])
            next_obs = flat(buf_next)
            data["advantage"], data["value_target"] = _gae(
                nets, data["observation"], next_obs, flat(buf_rew), flat(buf_done),
                flat(buf_term), gamma, lmbda, S, E, T)
            set_lr(optim, tc, it, iterations)

            # ---- epochs of per-seed shuffled minibatches ----
            stats: dict[str, list[torch.Tensor]] = {}
            N = E * T
            for _ in range(tc.epochs):
                perms = torch.stack([torch.randperm(N, generator=g) for g in perm_gens]).to(device)
                shuffled = {k: v[seed_ar, perms] for k, v in data.items()}  # one gather per epoch
                for lo in range(0, N, tc.minibatch_size):
                    size = min(tc.minibatch_size, N - lo)
                    mb = {k: v.narrow(1, lo, size) for k, v in shuffled.items()}
                    noise = (_noise(noise_gens, (spec.samples_mc_kl, size, A), device)
                             if mc else None)
                    out = batched_loss(spec, nets, mb, beta if spec.objective == "klpen" else None,
                                       noise)
                    total = out["total"]
                    finite = torch.isfinite(total)
                    if not bool(finite.all()):
                        for s in torch.nonzero(~finite).flatten().tolist():
                            bad = {k: float(v[s]) for k, v in out.items() if k.startswith("loss_")}
                            fail(s, f"non-finite loss at iteration {it} (frames {frames}): {bad}")
                    flat_params.grad.zero_()  # the parameters' grads are views of it
                    torch.where(finite, total, torch.zeros_like(total)).sum().backward()
                    grad_norm = _clip_grad_norm_per_seed(params, tc.max_grad_norm, S)
                    gfinite = torch.isfinite(grad_norm)
                    if not bool(gfinite.all()):
                        for s in torch.nonzero(~gfinite).flatten().tolist():
                            fail(s, f"non-finite gradient at iteration {it} (frames {frames})")
                    optim.step()
                    for key in ("loss_objective", "loss_critic", "kl", "kl_approx",
                                "clip_fraction", "explained_variance"):
                        if key in out:
                            stats.setdefault(key, []).append(out[key].detach())
                    stats.setdefault("grad_norm", []).append(grad_norm)

            # ---- per-seed diagnostics, beta schedule, rows ----
            with torch.no_grad():
                new_loc, new_scale = nets.loc(data["observation"]), nets.scale().expand(S, N, A)
                kl_batch = normal_kl(data["loc"], data["scale"], new_loc, new_scale)
                entropy = normal_entropy(new_scale).mean(1)
                kl_estimate = kl_err = torch.full((S,), math.nan, device=device)
                if variant.kl_estimator != "none":
                    noise = _noise(noise_gens, (spec.samples_mc_kl, N, A), device) if mc else None
                    kl_samples = kl_per_sample(spec, data["loc"], data["scale"], new_loc,
                                               new_scale, noise)
                    kl_estimate = kl_samples.mean(1)
                    kl_err = (kl_samples - kl_batch).std(1)
            means = {k: torch.stack(v).double().mean(0).cpu().numpy() for k, v in stats.items()}
            kl_estimate, kl_err = kl_estimate.cpu().numpy(), kl_err.cpu().numpy()
            if spec.objective == "klpen":
                after_iteration(schedule, beta, kl_estimate, cfg.loss, alive())
            betas = beta.cpu().numpy()
            kl_batch_mean, entropy = kl_batch.mean(1).cpu().numpy(), entropy.cpu().numpy()
            now = time.perf_counter()
            lr = optim.param_groups[0]["lr"]
            for s in alive():
                rows[s].append(iteration_row(
                    it, frames, tc.steps_per_iter, episodes[s],
                    {k: float(v[s]) for k, v in means.items()},
                    kl_batch=float(kl_batch_mean[s]), kl_estimate=float(kl_estimate[s]),
                    kl_estimate_err_std=float(kl_err[s]),
                    beta=float(betas[s]) if spec.objective == "klpen" else math.nan,
                    entropy=float(entropy[s]), lr=lr, update_seconds=now - t_iter,
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
    finally:
        bar.close()
        envs.close()
        evaluator.close()

    wall = time.perf_counter() - start
    out: list[RunResult | DivergenceError] = []
    for s in range(S):
        if s in failed:
            out.append(failed[s])
            continue
        out.append(RunResult.build(cfg, rows[s], episodes[s], evals[s], iterations, wall,
                                   float(beta[s]) if spec.objective == "klpen" else None))
    return out


def _flatten_parameters(params: list[torch.Tensor]) -> torch.Tensor:
    """Move ``params`` and their gradients into one buffer each; return the flat parameter.

    Each parameter becomes a view of the flat one and its ``.grad`` a view of the flat
    gradient (autograd accumulates into an existing ``.grad`` in place), so Adam and zeroing
    are one op each on one tensor instead of ~10 per parameter tensor: foreach Adam over the
    13 stacked tensors cost ~550 us per minibatch here (S=5, cProfile), a single-tensor Adam
    ~100 us. Adam is elementwise, so the values are bit-identical to Adam over the separate
    tensors. A parameter that gets no gradient keeps a zero one, which leaves it exactly
    unchanged (Adam's update is ``0 / (0 + eps)``), as torch skipping it would.
    """
    align = 16  # elements (64 bytes for float32): matmul kernels round differently with the
    # alignment of their operands, and the engine must stay bit-identical to separate tensors
    starts, total = [], 0
    for p in params:
        starts.append(total)
        total += -(-p.numel() // align) * align
    flat = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
    grad = torch.zeros_like(flat)  # padding gets zero gradients: Adam leaves it at zero
    for p, start in zip(params, starts):
        n = p.numel()
        flat[start:start + n].copy_(p.detach().reshape(-1))
        p.data = flat[start:start + n].view_as(p)
        p.grad = grad[start:start + n].view_as(p)
    flat.requires_grad_(True)
    flat.grad = grad
    return flat


def _clip_grad_norm_per_seed(params: list[torch.Tensor], max_norm: float, S: int) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` applied to each seed's slice; returns ``[S]`` norms.

    Parameters without a gradient are skipped, as torch does (e.g. the critic when the loss
    has no critic term).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(S, device=params[0].device)
    total = torch.linalg.vector_norm(torch.cat([g.reshape(S, -1) for g in grads], 1), 2, dim=1)
    limit = max_norm if max_norm > 0 else math.inf
    coef = torch.clamp(limit / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, [coef.view(S, *([1] * (g.ndim - 1))) for g in grads])
    return total


def execute_batch(cfgs: list[RunConfig], exp_dir: Path | str, progress: bool | None = None,
                  settings: list[str | None] | None = None, raise_errors: bool = False,
                  on_iteration: Callable[[RunConfig, dict], None] | None = None,
                  write: list[bool] | None = None) -> list[RunDir]:
    """Train the seeds of ``cfgs`` together; store each as :func:`execute_run` would.

    Each seed gets ``exp_dir/runs/<run_id>/`` (``RunDir.start`` / ``finish`` / ``fail``).
    A seed whose run is already ``done`` is not written again, so a killed batched job
    resumes at seed granularity. With ``write`` (one flag per config) exactly the flagged,
    not-done seeds are written but *every* seed is trained: the sweep uses it to resume a
    partly finished job with its original composition, since the batch size S changes float
    rounding. Without it, done seeds are left out of the batch. A seed that diverges is
    recorded ``failed`` and the others go on; an error that ends the whole batch is recorded
    on every seed being written (re-raised only when ``raise_errors``). Returns the run
    directories in the order of ``cfgs``.
    """
    torch.set_num_threads(1)
    check_batch(cfgs)
    settings = settings or [None] * len(cfgs)
    runs = [RunDir(Path(exp_dir) / "runs" / c.run_id()) for c in cfgs]
    flags = write or [True] * len(cfgs)
    writing = [i for i, run in enumerate(runs) if flags[i] and run.state() != "done"]
    if not writing:
        return runs
    trained = list(range(len(cfgs))) if write is not None else writing
    batch = [cfgs[i] for i in trained]
    prov = provenance(cfgs[0].device)
    prov.update(engine="batched", batch_seeds=[c.seed for c in batch],
                env_stepper=stepper_name(cfgs[0].env))
    for i in writing:
        runs[i].start(cfgs[i].to_dict(), setting=settings[i], provenance=prov)
    t0 = time.time()
    hook = None
    if on_iteration is not None:
        def hook(k: int, row: dict) -> None:
            if trained[k] in writing:
                on_iteration(batch[k], row)
    try:
        results = train_batched(batch, progress=progress, on_iteration=hook)
    except Exception as err:  # recorded on every seed being written, not lost
        for i in writing:
            runs[i].fail(f"{type(err).__name__}: {err}", traceback=traceback.format_exc(limit=8),
                         seconds=time.time() - t0)
        if raise_errors:
            raise
        return runs
    # `seconds` is each seed's share of the process time, so wall-clock cost per run compares
    # across engines; the whole batch's time is kept as `batch_seconds`.
    batch_seconds = time.time() - t0
    timing = {"seconds": batch_seconds / len(batch), "batch_seconds": batch_seconds}
    result_of = dict(zip(trained, results))
    for i in writing:
        result = result_of[i]
        if isinstance(result, Exception):
            runs[i].fail(f"{type(result).__name__}: {result}", traceback=None, **timing)
        else:
            runs[i].finish({"metrics": result.metrics, "episodes": result.episodes,
                            "evals": result.evals}, result.summary, **timing)
    if raise_errors:
        failures = [result_of[i] for i in writing if isinstance(result_of[i], Exception)]
        if failures:
            raise failures[0]
    return runs

"""The batched engine: S lanes (runs that differ in seed and in per-lane hyperparameters) trained
together in one process, each through its variant's own loss module.

Read top to bottom like :mod:`klppo_bench.harness.reference` (the torchrl yardstick): the same
loop, with a leading lane dimension on everything. :func:`train_batched` is that loop; each
phase is a method of :class:`BatchedTraining`, the job's state between iterations. Per
iteration the ``S x num_envs`` sub-envs step together with one stacked policy call per step
(:meth:`~BatchedTraining.collect`; :mod:`.envs`, :mod:`.nets`), GAE runs once over all lanes
(:meth:`~BatchedTraining.advantages`, torchrl's ``vec_generalized_advantage_estimate``), and
``epochs`` passes of per-lane shuffled minibatches go through the variant's loss module called
for all lanes at once (:meth:`~BatchedTraining.update`; :class:`~.lanes.LaneLoss`,
``torch.func.vmap``; calls with gradients are replayed from a recording of the module's ops,
:mod:`.replay`). Then come each lane's diagnostics and beta schedule, its metrics row, the
evaluation when it is due, and the checkpoint.

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
:mod:`.envs`). Networks and updates run on ``cfg.device``; envs always on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import operator
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tensordict import TensorDict
from torchrl.objectives.value.functional import vec_generalized_advantage_estimate

from klppo_bench.config import RunConfig
from klppo_bench.errors import DivergenceError
from klppo_bench.harness.batched.checkpoint import Checkpointing
from klppo_bench.harness.batched.lanes import LaneUnsupported, distribution_validation_off
from klppo_bench.harness.batched.nets import build_lanes
from klppo_bench.harness.batched.optim import clip_grad_norm_per_lane
from klppo_bench.harness.batched.packing import check_batch
from klppo_bench.harness.batched.state import JobState
from klppo_bench.harness.common import RunResult, iteration_row, next_eval_frame, set_lr
from klppo_bench.variants.distributions import joint_normal_kl
from klppo_bench.variants.outputs import recorded_columns

__all__ = ["BatchedTraining", "LaneUnsupported", "build_lanes", "train_batched"]

_LOGGED = frozenset({"loss_objective", "loss_critic", "kl", "kl_approx", "clip_fraction",
                     "explained_variance"})


def train_batched(cfgs: list[RunConfig], progress: bool | None = None,
                  on_iteration: Callable[[int, dict], None] | None = None,
                  checkpoint: Checkpointing | None = None, loss_calls: dict | None = None
                  ) -> list[RunResult | DivergenceError]:
    """Train the lanes of ``cfgs`` together (see :func:`~.packing.check_batch` for what may
    differ).

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
    job = BatchedTraining(cfgs)
    checkpoint = job.resume(checkpoint)
    bar = job.progress_bar(progress)
    try:
        with _fewer_gc_passes():
            for it in range(job.first_iteration, job.iterations):
                rollout = job.collect()  # T steps of every lane's sub-envs
                update_started = time.perf_counter()
                data = job.advantages(rollout)  # behaviour log-probs, GAE
                set_lr(job.optim, job.tc, it, job.iterations)  # the lr schedule
                stats = job.update(data, it)  # epochs of per-lane shuffled minibatches
                diagnostics = job.diagnostics(data)  # KL and entropy of the updated policy
                job.adapt_beta(diagnostics)  # the beta schedule, once per iteration
                job.record(it, stats, diagnostics, update_started)  # each lane's metrics row
                if job.evaluation_due(it):
                    job.evaluate()  # deterministic episodes; their mean goes into the row
                bar.update(job.tc.steps_per_iter * job.S)
                job.report(on_iteration)
                if not job.alive():
                    break
                if checkpoint is not None and it < job.iterations - 1 and checkpoint.due(it):
                    checkpoint.save(job.snapshot(it + 1))
    finally:
        bar.close()
        job.close()
    if loss_calls is not None:
        loss_calls.update(job.lane_loss.call_counts())
    return job.results()


@dataclass
class Rollout:
    """One iteration's steps of every sub-env, as collected: ``[T, S, E, ...]`` arrays."""

    obs: np.ndarray
    next_obs: np.ndarray
    action: np.ndarray
    loc: np.ndarray
    """The policy's mean at each step (the behaviour policy is ``N(loc, scale)``)."""
    reward: np.ndarray
    terminated: np.ndarray
    done: np.ndarray
    scale: torch.Tensor | None = None
    """``[S, 1, A]``: the policy's scale, constant during collection."""

    @classmethod
    def empty(cls, T: int, S: int, E: int, D: int, A: int) -> "Rollout":
        return cls(np.zeros((T, S, E, D), np.float32), np.zeros((T, S, E, D), np.float32),
                   np.zeros((T, S, E, A), np.float32), np.zeros((T, S, E, A), np.float32),
                   np.zeros((T, S, E), np.float32), np.zeros((T, S, E), bool),
                   np.zeros((T, S, E), bool))


@dataclass
class Diagnostics:
    """Each lane's policy change over an iteration's update (``[S]`` arrays)."""

    kl_batch: np.ndarray
    """Mean analytic KL(old || new) over the batch."""
    kl_estimate: np.ndarray
    """The loss's own KL (its estimator) over the batch; NaN for a loss without one."""
    kl_err: np.ndarray
    """Standard deviation of the loss's KL minus the analytic KL, per sample."""
    entropy: np.ndarray


class BatchedTraining(JobState):
    """The phases of an iteration, each changing the job's state (:class:`~.state.JobState`:
    built once per job, saved and resumed there); :func:`train_batched` calls them in order.
    """

    def collect(self) -> Rollout:
        """``T`` steps of every sub-env with one stacked policy call per step."""
        S, E, A, device = self.S, self.E, self.A, self.device
        r = Rollout.empty(self.T, S, E, self.D, A)
        with torch.no_grad():
            r.scale = self.nets.scale()  # [S, 1, A], constant during collection
            for t in range(self.T):
                loc = self.nets.loc(torch.from_numpy(self.obs).to(device))
                noise = _noise(self.noise_gens, self.noise_shape, device).view(S, E, A)
                act_np = (loc + r.scale * noise).cpu().numpy()
                if self.failed:
                    act_np[list(self.failed)] = 0.0  # a diverged lane's NaN never reaches MuJoCo
                step = self.envs.step(act_np)
                r.obs[t], r.action[t], r.loc[t] = self.obs, act_np, loc.cpu().numpy()
                r.next_obs[t], r.reward[t] = step.next_obs, step.reward
                r.terminated[t], r.done[t] = step.terminated, step.done
                for s, _, ret, length in step.finished:
                    self.episodes[s].append((self.frames + (t + 1) * E, ret, length))
                self.obs = step.obs
        self.frames += self.tc.steps_per_iter
        return r

    def advantages(self, r: Rollout) -> TensorDict:
        """The training batch ``[S, N]`` of each lane's steps: the behaviour policy's
        log-probs (as torchrl's collector stores them), advantages and value targets (GAE)."""
        S, N, device = self.S, self.E * self.T, self.device
        data = TensorDict({"observation": _lane_major(r.obs, device),
                           "action": _lane_major(r.action, device),
                           "loc": _lane_major(r.loc, device),
                           "scale": r.scale.expand(S, N, self.A)}, batch_size=[S, N])
        with torch.no_grad(), distribution_validation_off():
            data[self.log_prob_key] = self.variant.distribution_class(
                data["loc"], data["scale"]).log_prob(data["action"])
        data["advantage"], data["value_target"] = _gae(
            self.nets, data["observation"], _lane_major(r.next_obs, device),
            _lane_major(r.reward, device), _lane_major(r.done, device),
            _lane_major(r.terminated, device), self.gamma, self.lmbda, S, self.E, self.T)
        return data

    def update(self, data: TensorDict, it: int) -> dict[str, list[torch.Tensor]]:
        """``epochs`` passes of per-lane shuffled minibatches; returns each logged output's
        per-lane means, one entry per minibatch."""
        N = self.E * self.T
        lane_ar = torch.arange(self.S, device=self.device)[:, None]
        stats: dict[str, list[torch.Tensor]] = {}
        for _ in range(self.tc.epochs):
            perms = torch.stack([torch.randperm(N, generator=g)
                                 for g in self.perm_gens]).to(self.device)
            shuffled = data[lane_ar, perms]  # one gather per epoch
            for minibatch in shuffled.split(self.tc.minibatch_size, 1):
                self._minibatch_step(minibatch, it, stats)
        return stats

    def _minibatch_step(self, minibatch: TensorDict, it: int,
                        stats: dict[str, list[torch.Tensor]]) -> None:
        """One loss call for all lanes, then each lane's backward, clipping and Adam step; a
        lane whose loss or gradient is not finite is recorded as failed (its loss counts 0)."""
        S = self.S
        out = dict(self.lane_loss(minibatch, _LOGGED).items())
        total = _total(out)
        finite = torch.isfinite(total)
        if not bool(finite.all()):
            for s in torch.nonzero(~finite).flatten().tolist():
                bad = {k: float(out[k][s]) for k in out
                       if isinstance(k, str) and k.startswith("loss_")}
                self.fail(s, f"non-finite loss at iteration {it} (frames {self.frames}): {bad}")
        means = _lane_means(out, S)
        if self.per_minibatch_beta:  # before backward: see MinibatchBeta
            kl = means["kl"].tolist()
            for s in self.alive():
                self.schedule.after_loss(self.beta[s], kl[s], self.cfgs[s].loss)
        self.optim.zero_grad()
        torch.where(finite, total, torch.zeros_like(total)).sum().backward()
        grad_norm = clip_grad_norm_per_lane(self.params, self.tc.max_grad_norm, S)
        gfinite = torch.isfinite(grad_norm)
        if not bool(gfinite.all()):
            for s in torch.nonzero(~gfinite).flatten().tolist():
                self.fail(s, f"non-finite gradient at iteration {it} (frames {self.frames})")
        self.optim.step()
        for key, value in means.items():
            stats.setdefault(key, []).append(value)
        stats.setdefault("grad_norm", []).append(grad_norm)

    def diagnostics(self, data: TensorDict) -> Diagnostics:
        """Each lane's KL from the batch's behaviour policy to the updated one (analytic, and
        the loss's own estimate), and the updated policy's entropy."""
        S, N, A, variant = self.S, self.E * self.T, self.A, self.variant
        with torch.no_grad(), distribution_validation_off():
            new_loc = self.nets.loc(data["observation"])
            new_scale = self.nets.scale().expand(S, N, A)
            kl_batch = joint_normal_kl(data["loc"], data["scale"], new_loc, new_scale)
            entropy = variant.distribution_class(new_loc, new_scale).entropy().mean(1)
            kl_estimate = kl_err = torch.full((S,), math.nan, device=self.device)
            if variant.kl_estimator != "none":
                kl_samples = self.lane_loss(data)["kl"].reshape(S, N)
                kl_estimate = kl_samples.mean(1)
                kl_err = (kl_samples - kl_batch).std(1)
        return Diagnostics(kl_batch.mean(1).cpu().numpy(), kl_estimate.cpu().numpy(),
                           kl_err.cpu().numpy(), entropy.cpu().numpy())

    def adapt_beta(self, d: Diagnostics) -> None:
        """The variant's beta schedule, once per iteration, from each lane's KL estimate."""
        if self.beta is not None:
            for s in self.alive():
                self.schedule.after_iteration(self.beta[s], float(d.kl_estimate[s]),
                                              self.cfgs[s].loss)

    def record(self, it: int, stats: dict[str, list[torch.Tensor]], d: Diagnostics,
               update_started: float) -> None:
        """Each live lane's metrics row for iteration ``it`` (the reference engine's schema)."""
        means = {k: torch.stack(v).double().mean(0).cpu().numpy() for k, v in stats.items()}
        betas = self.beta.cpu().numpy() if self.beta is not None else None
        now = time.perf_counter()
        lrs = self.optim.lane_lrs()
        for s in self.alive():
            self.rows[s].append(iteration_row(
                it, self.frames, self.tc.steps_per_iter, self.episodes[s],
                {k: float(v[s]) for k, v in means.items()},
                kl_batch=float(d.kl_batch[s]), kl_estimate=float(d.kl_estimate[s]),
                kl_estimate_err_std=float(d.kl_err[s]),
                beta=float(betas[s]) if betas is not None else math.nan,
                entropy=float(d.entropy[s]), lr=lrs[s], update_seconds=now - update_started,
                wall_seconds=now - self.start))

    def evaluation_due(self, it: int) -> bool:
        """An evaluation follows every ``eval.every`` frames and the last iteration."""
        last = it == self.iterations - 1
        return (self.frames >= self.next_eval or last) and bool(self.alive())

    def evaluate(self) -> None:
        """Deterministic-policy episodes of every live lane, in its own evaluation envs; their
        mean return goes into the lane's latest row."""
        def policy_mean(o: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return self.nets.loc(torch.from_numpy(o).to(self.device)).cpu().numpy()

        results = self.evaluator.run(policy_mean, self.envs.norm, self.cfg.eval.episodes,
                                     self.eval_max_steps, self.alive())
        for s, eps in results.items():
            for k, (ret, length) in enumerate(eps):
                self.evals[s].append((self.frames, k, ret, length))
            self.rows[s][-1]["eval_return"] = float(np.mean([r for r, _ in eps]))
        self.next_eval = next_eval_frame(self.frames, self.cfg.eval.every)

    def report(self, on_iteration: Callable[[int, dict], None] | None) -> None:
        """Hand each live lane's latest row to ``on_iteration``."""
        if on_iteration is not None:
            for s in self.alive():
                on_iteration(s, self.rows[s][-1])


# -------------------------------------------------------------------- helpers of the phases

def _noise(gens: list[torch.Generator], shape: tuple, device: torch.device) -> torch.Tensor:
    """One standard-normal draw of ``shape`` per lane from its own generator -> ``[S, *shape]``."""
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)


def _lane_major(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """``[T, S, E, ...]`` (as collected) -> ``[S, E*T, ...]``: each lane's steps in env, time
    order."""
    T, S, E = x.shape[:3]
    x = np.moveaxis(x, 0, 2)
    return torch.from_numpy(np.ascontiguousarray(x)).reshape(S, E * T, *x.shape[3:]).to(device)


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



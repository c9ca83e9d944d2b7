"""A batched job's state between iterations, and how it is set up, saved and resumed.

:class:`JobState` holds what one iteration hands to the next: the lanes' envs and evaluator,
their stacked networks and loss (:func:`~.nets.build_lanes`), each lane's random streams,
the optimizer and the beta schedule, the frames done and each lane's records. It can be
saved whole (:meth:`JobState.snapshot`, what a :mod:`.checkpoint` holds) and restored
(:meth:`JobState.resume`). The phases of an iteration that change it are
:class:`~.engine.BatchedTraining`'s methods.
"""

from __future__ import annotations

import math
import time

import torch

from klppo_bench.config import RunConfig
from klppo_bench.errors import DivergenceError
from klppo_bench.harness.batched.checkpoint import (Checkpointing, envs_state, set_envs_state,
                                                   versions)
from klppo_bench.harness.batched.envs import BatchedEnvs, BatchedEvaluator
from klppo_bench.harness.batched.nets import build_lanes
from klppo_bench.harness.batched.optim import LaneAdam
from klppo_bench.harness.common import (EVAL_SEED_OFFSET, RunResult, max_episode_steps,
                                        next_eval_frame)
from klppo_bench.variants import get_variant, load_plugins
from klppo_bench.variants.beta import BetaSchedule

__all__ = ["JobState"]


class JobState:
    """One batched job's state between iterations (see the module docstring)."""

    def __init__(self, cfgs: list[RunConfig]):
        cfg = self.cfg = cfgs[0]
        load_plugins(cfg.plugins)
        self.cfgs, self.variant = cfgs, get_variant(cfg.variant)
        torch.set_num_threads(1)
        tc = self.tc = cfg.train
        self.device = torch.device(cfg.device)
        seeds = [c.seed for c in cfgs]
        self.S, self.E = len(cfgs), tc.num_envs
        self.T = tc.steps_per_iter // self.E  # steps per sub-env per iteration
        self.envs = BatchedEnvs(cfg.env, seeds, self.E, tc.obs_norm, tc.obs_clip)
        self.evaluator = BatchedEvaluator(cfg.env, seeds, EVAL_SEED_OFFSET, tc.obs_clip,
                                          tc.obs_norm)
        self.D, self.A = self.envs.obs_dim, self.envs.action_dim
        self._build_lanes(seeds)
        self.params = list(self.nets.parameters())
        self.optim = LaneAdam(self.params, [c.train.lr for c in cfgs])
        self.schedule = self.variant.beta_schedule(cfg.loss)
        self.beta = self.lane_loss.buffer(self.schedule.buffer) if self.schedule.buffer else None
        self.per_minibatch_beta = (self.beta is not None and type(self.schedule).after_loss
                                   is not BetaSchedule.after_loss)
        self.log_prob_key = self.lane_loss.module.tensor_keys.sample_log_prob
        self.gamma = torch.tensor(tc.gamma, device=self.device)
        self.lmbda = torch.tensor(tc.lmbda, device=self.device)
        self.iterations = math.ceil(cfg.frames / tc.steps_per_iter)
        self.eval_max_steps = max_episode_steps(cfg.env)
        self.failed: dict[int, DivergenceError] = {}
        self.rows: list[list[dict]] = [[] for _ in seeds]
        self.episodes: list[list[tuple]] = [[] for _ in seeds]
        self.evals: list[list[tuple]] = [[] for _ in seeds]
        self.frames, self.next_eval = 0, next_eval_frame(0, cfg.eval.every)
        self.first_iteration = 0
        self.start = time.perf_counter()
        self.obs = self.envs.reset()
        self.run_ids = [c.run_id() for c in cfgs]

    def _build_lanes(self, seeds: list[int]) -> None:
        """Networks, loss and each lane's random streams, continued where its reference run's
        would be: the action noise from torch's state after that seed's model init."""
        self.noise_gens = [torch.Generator().manual_seed(0) for _ in seeds]
        self.nets, self.lane_loss, init_states = build_lanes(self.cfgs, self.D, self.A,
                                                             self.device, self.noise_gens)
        self.noise_shape = (self.A,) if self.E == 1 else (self.E, self.A)  # the reference's draw
        for gen, state in zip(self.noise_gens, init_states):
            gen.set_state(state)
            # torchrl's Collector runs the policy once when it is built: one discarded draw
            torch.randn(self.noise_shape, generator=gen)
        self.perm_gens = [torch.Generator().manual_seed(s) for s in seeds]

    def fail(self, s: int, message: str) -> None:
        """Record lane ``s`` as diverged (its first reason is kept); the others go on."""
        if s not in self.failed:
            self.failed[s] = DivergenceError(message)

    def alive(self) -> list[int]:
        return [s for s in range(self.S) if s not in self.failed]

    def progress_bar(self, progress: bool | None):
        from tqdm.auto import tqdm

        per_iteration = self.tc.steps_per_iter * self.S
        return tqdm(total=self.iterations * per_iteration,
                    initial=self.first_iteration * per_iteration, unit="frame",
                    dynamic_ncols=True, disable=None if progress is None else not progress,
                    desc=f"{self.cfg.variant} {self.cfg.env} x{self.S} lanes", leave=False)

    def snapshot(self, next_iteration: int) -> dict:
        """Everything the next iteration depends on (what a checkpoint holds)."""
        return {"run_ids": self.run_ids, "versions": versions(), "iteration": next_iteration,
                "frames": self.frames, "next_eval": self.next_eval, "obs": self.obs,
                "rows": self.rows, "episodes": self.episodes, "evals": self.evals,
                "failed": {s: str(e) for s, e in self.failed.items()},
                "wall": time.perf_counter() - self.start,
                "params": self.optim.flat.detach().clone(), "optim": self.optim.state_dict(),
                "buffers": {k: self.lane_loss.state.get(k).clone()
                            for k in self.lane_loss.own_keys},
                "noise_gens": [g.get_state() for g in self.noise_gens],
                "perm_gens": [g.get_state() for g in self.perm_gens],
                "envs": envs_state(self.envs, self.evaluator)}

    def resume(self, checkpoint: Checkpointing | None) -> Checkpointing | None:
        """Continue from ``checkpoint``'s file if it holds this job, with every stream and
        accumulator as it was. Returns the checkpointing to use: ``None`` for envs that
        cannot be checkpointed (said once)."""
        if checkpoint is None:
            return None
        try:
            envs_state(self.envs, self.evaluator)
        except TypeError as err:
            checkpoint.say(f"{self.cfg.env}: no checkpoints for this job ({err})")
            return None
        state = checkpoint.load(self.run_ids)
        if state is None:
            return checkpoint
        with torch.no_grad():
            self.optim.flat.copy_(state["params"])
            for k, value in state["buffers"].items():
                self.lane_loss.state.get(k).copy_(value)
        self.optim.load_state_dict(state["optim"])
        for gens, saved in ((self.noise_gens, state["noise_gens"]),
                            (self.perm_gens, state["perm_gens"])):
            for g, st in zip(gens, saved):
                g.set_state(st)
        set_envs_state(self.envs, self.evaluator, state["envs"])
        self.obs, self.rows = state["obs"], state["rows"]
        self.episodes, self.evals = state["episodes"], state["evals"]
        self.failed = {s: DivergenceError(m) for s, m in state["failed"].items()}
        self.frames, self.next_eval = state["frames"], state["next_eval"]
        self.first_iteration = checkpoint.resumed_iteration = state["iteration"]
        self.start -= state["wall"]
        checkpoint.say(f"resumed {self.cfg.variant} x{self.S} lanes from {checkpoint.path.name} "
                       f"at iteration {self.first_iteration} of {self.iterations} "
                       f"({self.frames:,} frames per lane)")
        return checkpoint

    def close(self) -> None:
        self.envs.close()
        self.evaluator.close()

    def results(self) -> list[RunResult | DivergenceError]:
        """Per lane in order: its records and summary, or the error that ended it."""
        wall = time.perf_counter() - self.start
        out: list[RunResult | DivergenceError] = []
        for s in range(self.S):
            if s in self.failed:
                out.append(self.failed[s])
                continue
            out.append(RunResult.build(self.cfgs[s], self.rows[s], self.episodes[s],
                                       self.evals[s], self.iterations, wall,
                                       float(self.beta[s]) if self.beta is not None else None))
        return out

"""Checkpoints of a batched job: everything the next iteration depends on, for every lane.

A checkpoint is written after an iteration (its rows, episodes and evaluation recorded),
atomically (temporary file + rename), every ``every`` iterations, or, without ``every``, once
at least ``seconds`` (default 300: about 5 minutes of work on 2 cores) have passed since the
last one. It holds:

* the stacked network parameters, Adam's state, the loss modules' per-lane buffers (beta);
* each lane's random streams (action and loss noise, minibatch permutations);
* the environments: observation statistics, episode accumulators, the current observation,
  and per sub-env (training and evaluation) a copy of MuJoCo's whole ``MjData`` (not only the
  integration state: Ant and Humanoid read derived quantities such as ``xpos`` that are left
  from the previous step, and a restored ``mjSTATE_INTEGRATION`` alone changed their next
  reward), the time-limit counter and gymnasium's own generator (reset noise);
* the loop: iteration, frames, next evaluation, the rows, episodes and evaluations so far,
  lanes that failed.

A job resumed from it continues exactly as the uninterrupted job would (tested bit for bit,
timing columns aside). A checkpoint of other runs or of another version of the packages is
refused with one line, and the job starts over. Environments that are not MuJoCo environments
cannot be checkpointed; such a job runs without checkpoints and says so once.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_SECONDS = 300.0


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """What a checkpoint must match (the bits depend on it): the package versions, and a hash
    of the harness's own source (an edited harness keeps ``klppo_bench.__version__``)."""
    import gymnasium
    import mujoco
    import torchrl

    import klppo_bench

    root = Path(klppo_bench.__file__).parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("harness/**/*.py"), root / "variants" / "beta.py"]):
        digest.update(path.read_bytes())
    return {"klppo_bench": klppo_bench.__version__, "harness": digest.hexdigest()[:16],
            "torch": torch.__version__, "torchrl": torchrl.__version__,
            "gymnasium": gymnasium.__version__, "mujoco": mujoco.__version__}


def job_checkpoint_path(exp_dir: Path | str, run_ids: list[str]) -> Path:
    """Where the job of these runs (in this order) keeps its checkpoint."""
    digest = hashlib.sha256(",".join(run_ids).encode()).hexdigest()[:16]
    return Path(exp_dir) / "checkpoints" / f"job-{digest}.pt"


@dataclass
class Checkpointing:
    """Where and how often a job checkpoints; ``every`` iterations, or ``seconds`` apart."""

    path: Path
    every: int | None = None
    seconds: float = DEFAULT_SECONDS
    keep: bool = False
    say: callable = print
    resumed_iteration: int | None = None
    """The iteration the job resumed at (``None``: it started from scratch)."""
    _last: float = field(default_factory=time.monotonic)

    def due(self, iteration: int) -> bool:
        if self.every:
            return (iteration + 1) % self.every == 0
        return time.monotonic() - self._last >= self.seconds

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._last = time.monotonic()

    def load(self, run_ids: list[str]) -> dict | None:
        """The checkpoint of exactly these runs made with these package versions, or ``None``
        (a mismatching or unreadable one is refused in one line and removed)."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, weights_only=False)
            if state.get("run_ids") != run_ids:
                why = "it belongs to other runs"
            elif state.get("versions") != versions():
                why = f"it was written with {state.get('versions')}"
            else:
                return state
        except Exception as err:  # noqa: BLE001 -- any unreadable file is refused the same way
            why = f"it cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
        kept = self.path.with_name(self.path.name + ".refused")
        os.replace(self.path, kept)  # kept aside, never silently lost
        self.say(f"checkpoint {self.path} refused: {why}; the job starts over (the file is "
                 f"kept as {kept.name})")
        return None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# ---- environments -------------------------------------------------------------------------

def _time_limit(env):
    while env is not None:
        if hasattr(env, "_elapsed_steps"):
            return env
        env = getattr(env, "env", None)
    return None


def sub_env_state(env) -> dict:
    """One gymnasium MuJoCo env's state (raises ``TypeError`` for other envs)."""
    import copy

    u = env.unwrapped
    if not hasattr(u, "model") or not hasattr(u, "data"):
        raise TypeError(f"{type(u).__name__} is not a MuJoCo environment")
    limit = _time_limit(env)
    return {"mujoco": copy.copy(u.data), "np_random": u.np_random.bit_generator.state,
            "elapsed": None if limit is None else limit._elapsed_steps}


def set_sub_env_state(env, state: dict) -> None:
    import mujoco

    u = env.unwrapped
    # into the env's own MjData: the stepper's numpy views of ctrl/qpos/qvel stay valid
    mujoco.mj_copyData(u.data, u.model, state["mujoco"])
    u.np_random.bit_generator.state = state["np_random"]
    limit = _time_limit(env)
    if limit is not None:
        limit._elapsed_steps = state["elapsed"]


def _stepper_envs(stepper) -> list:
    return stepper.envs if hasattr(stepper, "envs") else list(stepper.venv.envs)


def envs_state(envs, evaluator) -> dict:
    """The training envs' and the evaluator's state (see the module docstring)."""
    train = _stepper_envs(envs.stepper)
    evals = _stepper_envs(evaluator.stepper) if evaluator.fast else evaluator.envs
    return {
        "train": [sub_env_state(e) for e in train],
        "eval": [sub_env_state(e) for e in evals],
        "elapsed": getattr(envs.stepper, "elapsed", None),
        "eval_elapsed": getattr(evaluator.stepper, "elapsed", None) if evaluator.fast else None,
        "norm": (envs.norm.mean, envs.norm.var, envs.norm.count),
        "ep_return": envs.ep_return, "ep_length": envs.ep_length,
    }


def set_envs_state(envs, evaluator, state: dict) -> None:
    train = _stepper_envs(envs.stepper)
    evals = _stepper_envs(evaluator.stepper) if evaluator.fast else evaluator.envs
    for env, st in zip(train, state["train"]):
        set_sub_env_state(env, st)
    for env, st in zip(evals, state["eval"]):
        set_sub_env_state(env, st)
    if state["elapsed"] is not None:
        envs.stepper.elapsed[:] = state["elapsed"]
    if state["eval_elapsed"] is not None:
        evaluator.stepper.elapsed[:] = state["eval_elapsed"]
    envs.norm.mean[:], envs.norm.var[:], envs.norm.count[:] = state["norm"]
    envs.ep_return[:], envs.ep_length[:] = state["ep_return"], state["ep_length"]

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

A checkpoint cannot carry code: it is read with ``torch.load(weights_only=True)``, which
unpickles only tensors, numbers, strings, bytes and plain containers, and refuses anything
else (a planted pickle payload is refused in one line, never run). What is not a tensor is
stored as plain data and decoded explicitly, only after the file's identity (its format, runs
and versions) matched: numpy arrays as ``{"__ndarray__": bytes, "dtype", "shape"}``, MuJoCo's
``MjData`` as the bytes of its own serialization (``MjData.__getstate__``), generator states as
the dicts numpy and torch give. A save that fails (disk full) leaves no temporary file behind
and keeps the previous checkpoint; a job's stale temporaries are removed when it starts.
"""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from klppo_bench.store import RunDir, atomic_write_bytes

DEFAULT_SECONDS = 300.0
FORMAT = "klppo-bench checkpoint 2"
"""Written into every checkpoint; a file without it is not one of this version's."""
_ARRAY = "__ndarray__"


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
    run_ids: list[str] = field(default_factory=list)
    """The job's runs (set by :meth:`load`)."""
    _last: float = field(default_factory=time.monotonic)

    def due(self, iteration: int) -> bool:
        if self.every:
            return (iteration + 1) % self.every == 0
        return time.monotonic() - self._last >= self.seconds

    def save(self, state: dict) -> None:
        """Write ``state`` (see :func:`encode`) atomically; raises :class:`~klppo_bench.store.
        WriteError` (no temporary file left, the previous checkpoint kept) if it cannot."""
        buf = io.BytesIO()
        torch.save({"format": FORMAT, **encode(state)}, buf)
        atomic_write_bytes(self.path, buf.getvalue())
        self._last = time.monotonic()

    def load(self, run_ids: list[str]) -> dict | None:
        """The checkpoint of exactly these runs made with these package versions, or ``None``
        (a mismatching, unreadable or unsafe one is refused in one line and kept aside)."""
        self.run_ids = list(run_ids)
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            stale.unlink(missing_ok=True)  # of a save that was killed: only this job writes it
        if not self.path.is_file():
            return None
        state, why = _read(self.path, run_ids)
        if state is not None:
            return state
        kept = self.path.with_name(self.path.name + ".refused")
        self.path.replace(kept)  # kept aside, never silently lost
        self.say(f"checkpoint {self.path} refused: {why}; the job starts over (the file is "
                 f"kept as {kept.name})")
        return None

    def remove(self) -> None:
        """Delete the checkpoint, unless a run of the job could not store its record (a
        :class:`~klppo_bench.store.WriteError`, e.g. disk full): its rerun resumes from it."""
        runs = self.path.parent.parent / "runs"
        for run_id in self.run_ids:
            status = RunDir(runs / run_id).status()
            if isinstance(status, dict) and status.get("retry"):
                return
        self.path.unlink(missing_ok=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:120] if text else ''}"


def _read(path: Path, run_ids: list[str]) -> tuple[dict | None, str]:
    """``(state, '')``, or ``(None, why it is refused)``. Only tensors, numbers, strings,
    bytes and plain containers are unpickled; identity is checked before anything is
    decoded."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols
            warnings.simplefilter("ignore")
            raw = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:  # torch's restricted unpickler said no
        detail = str(err).partition("WeightsUnpickler error:")[2].strip()
        detail = (detail.splitlines() or [""])[0].partition(" was not an allowed")[0][:120]
        if detail.startswith("Unsupported global"):
            return None, (f"it holds code or classes a checkpoint never holds ({detail}; not "
                          "loaded): a file planted there, or a checkpoint of an older version")
        return None, f"it cannot be read (UnpicklingError: {detail or _first_line(err)})"
    except Exception as err:  # noqa: BLE001 -- any unreadable file is refused the same way
        return None, f"it cannot be read ({_first_line(err)})"
    if not isinstance(raw, dict):
        return None, f"it is not a klppo-bench checkpoint (a {type(raw).__name__})"
    if raw.get("run_ids") != run_ids:
        return None, "it belongs to other runs"
    if raw.get("versions") != versions():
        return None, f"it was written with {raw.get('versions')}"
    if raw.get("format") != FORMAT:
        return None, f"its format is {raw.get('format')!r}, not {FORMAT!r}"
    try:
        return decode({k: v for k, v in raw.items() if k != "format"}), ""
    except Exception as err:  # noqa: BLE001 -- a damaged payload is refused, not fatal
        return None, f"it cannot be decoded ({_first_line(err)})"


def encode(obj, where: str = "checkpoint"):
    """``obj`` as what ``torch.load(weights_only=True)`` reads back: tensors, numbers,
    strings, bytes, ``None`` and plain containers as they are (``str`` subclasses as their
    text); numpy arrays and scalars tagged (their bytes, dtype and shape). Anything else is
    a bug of the caller: ``TypeError`` naming it."""
    if obj is None or type(obj) in (bool, int, float, str, bytes):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (np.ndarray, np.generic)) and not obj.dtype.hasobject:
        return {_ARRAY: obj.tobytes(), "dtype": obj.dtype.str, "shape": list(np.shape(obj)),
                "scalar": isinstance(obj, np.generic)}
    if isinstance(obj, str):  # a subclass (torch.__version__ is a TorchVersion): its text
        return str(obj)
    if isinstance(obj, dict) and all(isinstance(k, (str, int)) for k in obj):
        return {k: encode(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(encode(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__name__} cannot be "
                    "stored in a checkpoint (tensors, numbers, strings, bytes, numpy arrays "
                    "and plain containers only)")


def decode(obj):
    """The inverse of :func:`encode` (arrays rebuilt from their bytes, writable)."""
    if isinstance(obj, dict):
        if _ARRAY in obj:
            dtype = np.dtype(obj["dtype"])
            if dtype.hasobject:
                raise ValueError(f"array of dtype {dtype} (objects)")
            array = np.frombuffer(obj[_ARRAY], dtype).reshape(obj["shape"]).copy()
            return array[()] if obj.get("scalar") else array
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(decode(v) for v in obj)
    return obj


# ---- environments -------------------------------------------------------------------------

def _time_limit(env):
    while env is not None:
        if hasattr(env, "_elapsed_steps"):
            return env
        env = getattr(env, "env", None)
    return None


def sub_env_state(env) -> dict:
    """One gymnasium MuJoCo env's state (raises ``TypeError`` for other envs)."""
    u = env.unwrapped
    if not hasattr(u, "model") or not hasattr(u, "data"):
        raise TypeError(f"{type(u).__name__} is not a MuJoCo environment")
    limit = _time_limit(env)
    # MuJoCo's own serialization of the whole MjData (bytes, decoded by MuJoCo on resume)
    return {"mujoco": u.data.__getstate__(), "np_random": u.np_random.bit_generator.state,
            "elapsed": None if limit is None else limit._elapsed_steps}


def set_sub_env_state(env, state: dict) -> None:
    import mujoco

    u = env.unwrapped
    if not isinstance(state["mujoco"], bytes):
        raise TypeError(f"MjData state is a {type(state['mujoco']).__name__}, not bytes")
    data = mujoco.MjData.__new__(mujoco.MjData)
    data.__setstate__(state["mujoco"])
    # into the env's own MjData: the stepper's numpy views of ctrl/qpos/qvel stay valid
    mujoco.mj_copyData(u.data, u.model, data)
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

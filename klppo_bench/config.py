"""Typed run configuration: what one seeded run of one variant on one env is.

Defaults are the PPO paper's MuJoCo setup (Schulman et al. 2017, Table 3 and section 6.1).
YAML is how configs are saved and loaded; derived values (iterations, minibatches) are
computed where needed, never written back. ``--set KEY=VALUE`` addresses loss parameters by
their plain name (``dtarg``) and harness fields with a section prefix (``train.epochs``,
``model.trunk``, ``eval.every``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from klppo_bench.errors import ConfigError
from klppo_bench.variants import get_variant, load_plugins
from klppo_bench.variants.identity import variant_code_hash
from klppo_bench.variants.registry import Param


@dataclass
class TrainConfig:
    steps_per_iter: int = 2048
    """Environment steps collected per policy update (the paper's horizon T), over all envs."""
    epochs: int = 10
    """Passes over each batch (K)."""
    minibatch_size: int = 64
    """Samples per gradient step (M)."""
    lr: float = 3e-4
    """Adam step size."""
    anneal_lr: bool = True
    """Linearly anneal the step size to 0 over the run."""
    gamma: float = 0.99
    """Discount."""
    lmbda: float = 0.95
    """GAE lambda."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip (0 disables). Not in the paper: see README's deviations."""
    num_envs: int = 1
    """Environments stepped together (gymnasium vector env); the paper uses 1."""
    obs_norm: bool = True
    """Running observation normalization (mean/variance of every observation so far)."""
    obs_clip: float = 10.0
    """Clip normalized observations to [-obs_clip, obs_clip] (0 disables)."""


@dataclass
class ModelConfig:
    hidden: tuple[int, ...] = (64, 64)
    """Hidden layer sizes of the actor and the critic MLPs."""
    activation: str = "tanh"
    """Hidden activation: tanh, relu or elu."""
    log_std_init: float = 0.0
    """Initial value of the state-independent log standard deviation."""
    trunk: str = "separate"
    """separate: actor and critic networks share nothing (the paper); shared: one trunk."""
    wiring: str = "operator"
    """For a shared trunk: operator (ActorCriticOperator, trunk runs twice) or single-call."""


@dataclass
class EvalConfig:
    every: int = 50_000
    """Frames between deterministic evaluations (0: only at the end)."""
    episodes: int = 5
    """Episodes per deterministic evaluation."""
    final_window: int = 100
    """Final score = mean return of the last this-many training episodes (the paper: 100)."""


SECTIONS = {"train": TrainConfig, "model": ModelConfig, "eval": EvalConfig}

_CHOICES = {
    ("model", "activation"): ("tanh", "relu", "elu"),
    ("model", "trunk"): ("separate", "shared"),
    ("model", "wiring"): ("operator", "single-call"),
}
MAX_SEED = 2**32 - 1
"""The largest seed: numpy's seed range (``np.random.seed``), so no two seeds share numpy's
global stream; torch and gymnasium accept it too, with room for the env and evaluation seeds
derived from it (``seed * num_envs + i``, ``seed + EVAL_SEED_OFFSET``)."""
MAX_FRAMES = 10**10
"""The most environment steps a run may ask for (10 billion: about four months at 1,000
steps/s); more is a typo, not an experiment."""
SEED_RANGE = f"int >= 0 and <= {MAX_SEED} (2**32 - 1, numpy's seed range)"
FRAMES_RANGE = f"int >= 1 and <= {MAX_FRAMES} (10**10)"

_UNIT_INTERVAL = {("train", "gamma"), ("train", "lmbda")}
_POSITIVE_FLOAT = {("train", "lr")}
_POSITIVE_INT = {("train", "steps_per_iter"), ("train", "epochs"), ("train", "minibatch_size"),
                 ("train", "num_envs"), ("eval", "episodes"), ("eval", "final_window")}


@dataclass
class RunConfig:
    variant: str
    """Registry name of the loss variant."""
    env: str
    """Resolved gymnasium id (``Hopper`` -> ``Hopper-v5``)."""
    seed: int
    """The one seed that fixes networks, environments and minibatch order."""
    frames: int = 1_000_000
    """Total environment steps requested; a run takes whole iterations, so it really takes
    :func:`actual_frames` (``frames`` rounded up to a multiple of ``train.steps_per_iter``)."""
    device: str = "cpu"
    """Torch device of networks and updates (resolved: cpu, cuda, cuda:N)."""
    loss: dict = field(default_factory=dict)
    """Resolved variant parameters (every key present)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plugins: tuple[str, ...] = ()
    """Modules imported to register user variants (not part of the run id)."""
    code: str | None = None
    """Hash of the variant's definition and loss code
    (:func:`~klppo_bench.variants.identity.variant_code_hash`, set by
    :func:`build_run_config`); part of the run id, so changed loss code gives a new run.
    ``None`` in configs stored before it existed (their run id is then unchanged)."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"]["hidden"] = list(self.model.hidden)
        d["plugins"] = list(self.plugins)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        """The inverse of :meth:`to_dict`; a config stored before ``code`` existed loads with
        ``code=None`` (and its run id)."""
        d = dict(d)
        model = dict(d.pop("model", {}))
        if "hidden" in model:
            model["hidden"] = tuple(model["hidden"])
        return cls(
            train=TrainConfig(**d.pop("train", {})),
            model=ModelConfig(**model),
            eval=EvalConfig(**d.pop("eval", {})),
            plugins=tuple(d.pop("plugins", ())),
            **d,
        )

    def run_id(self) -> str:
        """Stable id: readable prefix + hash of everything that changes the result, the
        variant's code hash (``code``) included: a run whose loss code changed is a new run,
        never a reuse of the old record (see :mod:`klppo_bench.variants.identity`)."""
        d = self.to_dict()
        d.pop("plugins")
        if d["code"] is None:  # a config stored before ``code`` existed keeps its id
            d.pop("code")
        digest = hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
        env = re.sub(r"[^A-Za-z0-9]+", "", self.env.split("/")[-1])
        return f"{self.variant}-{env}-s{self.seed}-{digest}"

    def validate(self) -> None:
        t = self.train
        if t.steps_per_iter % t.num_envs:
            raise ConfigError(
                f"train.steps_per_iter={t.steps_per_iter} must be a multiple of "
                f"train.num_envs={t.num_envs}"
            )
        if t.minibatch_size > t.steps_per_iter:
            raise ConfigError(
                f"train.minibatch_size={t.minibatch_size} exceeds "
                f"train.steps_per_iter={t.steps_per_iter}; allowed: <= steps_per_iter"
            )
        if self.frames < t.steps_per_iter:
            raise ConfigError(
                f"frames={self.frames} is less than one iteration "
                f"(train.steps_per_iter={t.steps_per_iter}); allowed: >= {t.steps_per_iter}"
            )
        if self.model.trunk == "separate" and self.model.wiring != "operator":
            raise ConfigError("model.wiring applies to model.trunk=shared only")


def actual_frames(cfg: RunConfig) -> int:
    """The environment steps a run really takes: ``frames`` rounded up to whole iterations
    of ``train.steps_per_iter`` (20000 at 2048 per iteration -> 20480).

    ``cfg.frames`` stays as requested (the run id hashes it); this is computed, never stored
    in the config. The run's ``summary.json`` records both (``frames_requested``,
    ``frames_actual``).
    """
    steps = cfg.train.steps_per_iter
    return -(-cfg.frames // steps) * steps


def frames_note(cfg: RunConfig) -> str | None:
    """``frames 20000 (runs 20480: whole iterations of 2048)``, or ``None`` when they agree."""
    actual = actual_frames(cfg)
    if actual == cfg.frames:
        return None
    return (f"frames {cfg.frames} (runs {actual}: whole iterations of "
            f"{cfg.train.steps_per_iter})")


def _field_param(section: str, f: dataclasses.Field, current: Any) -> Param:
    kind = type(current)
    if section == "model" and f.name == "hidden":
        kind = tuple
    low = 1 if (section, f.name) in _POSITIVE_INT else None
    if kind in (int, float) and low is None and f.name not in ("log_std_init",):
        low = 0
    high = 1.0 if (section, f.name) in _UNIT_INTERVAL else None
    return Param(current, kind, "", choices=_CHOICES.get((section, f.name)), low=low, high=high,
                 low_open=(section, f.name) in _POSITIVE_FLOAT, loss_kwarg=None)


def _parse_hidden(raw: Any, key: str, where: str) -> tuple[int, ...]:
    try:
        if isinstance(raw, str):
            raw = [s for s in re.split(r"[,\s\[\]()]+", raw) if s]
        value = tuple(int(x) for x in raw)
        if not value or min(value) < 1:
            raise ValueError
        return value
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: {key}={raw!r} is invalid; allowed: a list of positive ints, e.g. 64,64"
        ) from None


def set_section_value(obj: Any, section: str, name: str, raw: Any, where: str) -> None:
    names = {f.name: f for f in fields(obj)}
    key = f"{section}.{name}"
    if name not in names:
        raise ConfigError(
            f"{where}: unknown key {key!r}; allowed: "
            + ", ".join(f"{section}.{n}" for n in names)
        )
    current = getattr(obj, name)
    if section == "model" and name == "hidden":
        setattr(obj, name, _parse_hidden(raw, key, where))
        return
    setattr(obj, name, _field_param(section, names[name], current).parse(raw, key, where))


def parse_set_args(items: list[str] | None) -> dict[str, str]:
    """``["dtarg=0.03", "train.epochs=5"]`` -> dict; malformed items are errors."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def resolve_env_id(name: str, where: str = "--env") -> str:
    """``Hopper`` -> the newest registered version (``Hopper-v5``); full ids pass through."""
    import gymnasium as gym

    registry = gym.envs.registry
    if name in registry:
        return name
    versions = []
    for env_id in registry:
        m = re.fullmatch(re.escape(name) + r"-v(\d+)", env_id)
        if m:
            versions.append((int(m.group(1)), env_id))
    if versions:
        return max(versions)[1]
    import difflib

    close = difflib.get_close_matches(name, list(registry), n=5, cutoff=0.5)
    raise ConfigError(
        f"{where}: unknown gymnasium environment {name!r}; "
        + (f"did you mean: {', '.join(close)}" if close else "allowed: any registered gymnasium id")
        + " (MuJoCo tasks: HalfCheetah, Hopper, InvertedDoublePendulum, InvertedPendulum, "
        "Reacher, Swimmer, Walker2d, Ant, Humanoid)"
    )


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device}: CUDA is not available in this torch build "
                f"({torch.__version__}); allowed: cpu, auto (README: installing a CUDA torch)"
            )
        return device
    if device == "cpu":
        return device
    raise ConfigError(f"--device {device!r}: allowed: cpu, cuda, cuda:N, auto")


def build_run_config(
    variant: str,
    env: str,
    seed: int,
    frames: int | None = None,
    device: str = "cpu",
    overrides: Mapping[str, Any] | None = None,
    plugins: tuple[str, ...] = (),
    where: str = "--set",
    resolve_env: bool = True,
) -> RunConfig:
    """Validate everything and return a fully resolved :class:`RunConfig`.

    Raises:
        ConfigError: naming the bad key/value and the allowed values.
    """
    load_plugins(plugins)
    v = get_variant(variant)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed={seed!r} is invalid; allowed: {SEED_RANGE}")
    cfg = RunConfig(
        variant=variant,
        env=resolve_env_id(env) if resolve_env else env,
        seed=seed,
        device=resolve_device(device),
        plugins=tuple(plugins),
        code=variant_code_hash(variant),
    )
    if frames is not None:
        if isinstance(frames, bool) or not isinstance(frames, int) \
                or not 1 <= frames <= MAX_FRAMES:
            raise ConfigError(f"frames={frames!r} is invalid; allowed: {FRAMES_RANGE}")
        cfg.frames = frames
    loss_overrides = {}
    for key, raw in (overrides or {}).items():
        section, _, name = key.partition(".")
        if name and section in SECTIONS:
            set_section_value(getattr(cfg, section), section, name, raw, where)
        elif name:
            raise ConfigError(
                f"{where}: unknown section in {key!r}; allowed: "
                + ", ".join(f"{s}.<field>" for s in SECTIONS)
                + " or a loss parameter"
            )
        else:
            loss_overrides[key] = raw
    cfg.loss = v.resolve(loss_overrides, where)
    cfg.validate()
    return cfg

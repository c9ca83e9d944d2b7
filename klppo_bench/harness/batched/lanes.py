"""A variant's own loss module, called for S lanes at once with ``torch.func.vmap``.

A lane is one run (a seed, possibly with its own hyperparameters) of a batched job. Each lane
builds the loss module the variant builds for it (``Variant.build_loss``); their parameters
and buffers are stacked along a leading lane dimension (the model parameters *are* the
engine's stacked parameters, so optimizer steps show at once) and one module is called under
``vmap`` with each lane's state swapped in (tensordict's ``to_module``). Inside the call the
module sees exactly what the reference engine gives it: one lane's parameters and a ``[B]``
minibatch. Every reduction, advantage normalization, branch and random draw is per lane.

What the plain ``vmap`` cannot do, and what :class:`_LaneMode` (a ``TorchFunctionMode`` active
during the call) does instead:

* **Data-dependent Python branches** (``if x.isfinite().all():``, ``if kl.mean() > ...``).
  ``bool()`` of a lane-batched tensor is answered when every lane gives the same answer;
  when lanes differ, :class:`LanesDisagree` is raised and :meth:`LaneLoss.__call__` reruns
  that call lane by lane (``vmap`` over one lane), so each lane takes its own branch. The
  KL-penalty beta rule is not such a branch: the variant's beta schedule owns it (both
  engines), and the loss is built with thresholds that never fire
  (:mod:`klppo_bench.variants.beta`).
* **Per-lane random streams.** A random op inside the loss (the Monte-Carlo KL's draws from
  the old policy, a sampled entropy) draws, for lane ``s``, from ``generators[s]`` with the
  same call the reference engine makes on its global generator, so a lane's draws are those
  of its reference run and never depend on which other lanes share the job.
* ``squeeze(dim)`` of a 0-d tensor (torchrl's ``_reduce_loss(...).squeeze(-1)``) fails under
  ``vmap`` in torch 2.13 ("Dimension is out of range ... [-1, 0], but got [-1]") although it
  is the identity in eager mode; it is answered with the tensor itself.

``torch.distributions`` argument validation calls ``bool()`` on whole tensors and is switched
off during the call (the values are the same; the reference engine's validation still runs).

A call with gradients does not run this module each time: :mod:`.replay` records the ops it
runs once per call signature and replays them (with guards on the ``bool()``/``item()`` reads
above); calls that draw random numbers, or run without gradients, stay eager.

A loss that cannot run this way (it writes ``.data`` of a buffer, calls ``.item()`` on
lane-dependent values that differ, uses an op without a batching rule, ...) is found by
:func:`~.packing.batch_unsupported_reason` on a tiny synthetic batch; the planner then sends
its runs to the reference engine and says why in one line.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from torch._C import _functorch as _ft
from torch.func import vmap
from torch.overrides import TorchFunctionMode

from klppo_bench.harness.batched.replay import (NotRecordable, Recording, read_while_recording,
                                                signature)
from klppo_bench.harness.batched.structure import (LanesDisagree, lane_state_differences,
                                                   lanes_equal, loss_structure)
from klppo_bench.variants.outputs import extra_outputs

__all__ = ["LaneLoss", "LanesDisagree", "LaneUnsupported", "distribution_validation_off",
           "lane_state_differences", "loss_structure"]


class LaneUnsupported(ValueError):
    """These runs cannot share one batched job (the message says what blocks it)."""


_RANDOM_OUT_OF_PLACE = {torch.normal, torch.randn, torch.rand, torch.randint, torch.bernoulli,
                        torch.multinomial, torch.poisson, torch.randn_like, torch.rand_like,
                        torch.randint_like, torch.randperm, torch.binomial,
                        torch._standard_gamma, torch.Tensor.bernoulli, torch.Tensor.multinomial}
"""Random ops that take a ``generator``; any other draw from torch's global generator inside a
loss (``F.dropout``, ...) is found by the probe (:mod:`klppo_bench.harness.batched.packing`),
which then sends the variant to the reference engine."""
_RANDOM_IN_PLACE = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.bernoulli_,
                    torch.Tensor.exponential_, torch.Tensor.random_, torch.Tensor.cauchy_,
                    torch.Tensor.log_normal_, torch.Tensor.geometric_}
_SCALAR_READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.__float__,
                 torch.Tensor.__int__}
_SQUEEZE = {torch.Tensor.squeeze, torch.squeeze}
_HANDLED = frozenset(_RANDOM_OUT_OF_PLACE | _RANDOM_IN_PLACE | _SCALAR_READS | _SQUEEZE)


def _is_batched(x) -> bool:
    return isinstance(x, torch.Tensor) and _ft.is_batchedtensor(x)


def _physical(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The lane-stacked tensor behind a batched tensor (lanes first) and its vmap level."""
    level = _ft.maybe_get_level(t)
    bdim = _ft.maybe_get_bdim(t)
    return _ft.get_unwrapped(t).movedim(bdim, 0), level


class _LaneMode(TorchFunctionMode):
    """See the module docstring; ``generators[i]`` is lane ``i``'s random stream."""

    def __init__(self, generators: Sequence[torch.Generator],
                 guards: list[torch.Tensor] | None = None):
        super().__init__()
        self.generators = generators
        self.guards = guards
        """While the call is recorded (:mod:`.replay`): the guards of its Python reads."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _HANDLED:  # the common case: every other op, unchanged
            return func(*args, **kwargs)
        if func in _SQUEEZE and (len(args) > 1 or "dim" in kwargs) and args[0].dim() == 0:
            return args[0]
        if func in _SCALAR_READS and self.guards is not None:
            lanes = _physical(args[0])[0] if _is_batched(args[0]) else None
            return read_while_recording(func, args, kwargs, lanes, self.guards)
        if func in _SCALAR_READS and _is_batched(args[0]):
            lanes, _ = _physical(args[0])
            if len(lanes) > 1 and not bool(lanes_equal(lanes).all()):
                raise LanesDisagree(f"lanes differ in a value read by Python ({func.__name__})")
            return func(lanes[0], *args[1:], **kwargs)
        if func in _RANDOM_OUT_OF_PLACE or func in _RANDOM_IN_PLACE:
            if self.guards is not None:
                raise NotRecordable("the loss draws random numbers")
            level = _ft.maybe_current_level()
            if level is not None and "generator" not in kwargs:
                return self._per_lane(func, args, kwargs, level)
        return func(*args, **kwargs)

    def _per_lane(self, func, args, kwargs, level):
        """Lane ``i`` makes ``func``'s draw with ``generators[i]``; result batched at ``level``."""
        phys = [(_physical(a)[0] if _is_batched(a) else a) for a in args]
        kw = {k: (_physical(v)[0] if _is_batched(v) else v) for k, v in kwargs.items()}
        # below vmap: a plain draw from the lane's generator (vmap's own random handling, the
        # FuncTorchVmapMode key, would otherwise batch each lane's draw over all lanes)
        with torch._C._ExcludeDispatchKeyGuard(
                torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchVmapMode)):
            outs = self._draws(func, args, kwargs, phys, kw)
        if func in _RANDOM_IN_PLACE and _is_batched(args[0]):
            return args[0]
        return _ft._add_batch_dim(torch.stack(outs), 0, level)

    def _draws(self, func, args, kwargs, phys, kw) -> list[torch.Tensor]:
        """Each lane's draw, made on the CPU with its (CPU) generator and moved to the tensors'
        device: the lanes' streams are CPU generators whatever ``--device`` is."""
        outs = []
        for i, gen in enumerate(self.generators):
            lane_args = [(a[i] if _is_batched(orig) else a) for a, orig in zip(phys, args)]
            lane_kw = {k: (v[i] if _is_batched(kwargs[k]) else v) for k, v in kw.items()}
            device = next((a.device for a in lane_args if isinstance(a, torch.Tensor)),
                          torch.device(lane_kw.pop("device", None) or "cpu"))
            lane_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in lane_args]
            if func in _RANDOM_IN_PLACE:
                target = lane_args[0].detach().clone()
                draw = func(target, *lane_args[1:], generator=gen, **lane_kw).to(device)
                if _is_batched(args[0]):  # in place, as asked: into the lane's own slice
                    phys[0][i].copy_(draw)
                # an unbatched target cannot hold per-lane draws: callers get them from the
                # return value (torch.distributions' ``torch.empty(shape).normal_()``)
                outs.append(draw)
            else:
                outs.append(func(*lane_args, generator=gen, **lane_kw).to(device))
        return outs


@contextlib.contextmanager
def distribution_validation_off():
    """``torch.distributions`` argument validation off inside the block (restored after)."""
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)


_UNSEEN = object()


class LaneLoss:
    """S lanes' loss modules as one vmapped call.

    Args:
        losses: one loss module per lane, as ``Variant.build_loss`` makes them.
        shared: for each parameter of lane 0's model (by identity), the engine's stacked
            ``[S, *shape]`` tensor; lane ``s``'s slice replaces lane ``s``'s own parameter.
        generators: lane ``s``'s random stream for draws made inside the loss.

    Raises:
        LaneUnsupported: the lanes' modules differ in something that is not a tensor.
    """

    def __init__(self, losses: Sequence[torch.nn.Module], shared: dict[int, torch.Tensor],
                 generators: Sequence[torch.Generator]):
        diff = lane_state_differences(losses)
        if diff:
            raise LaneUnsupported(f"lanes' loss modules differ in {', '.join(diff)}")
        self.module = losses[0]
        self.lanes = len(losses)
        self.generators = list(generators)
        per_lane = [TensorDict.from_module(l) for l in losses]
        state = TensorDict({}, batch_size=[self.lanes])
        self.own_keys = []
        """Keys of the loss's own per-lane tensors (buffers such as beta; not the model's)."""
        for key, leaf in per_lane[0].items(True, True):
            if id(leaf) in shared:
                state.set(key, shared[id(leaf)])
            else:  # buffers and the loss's own tensors: one copy per lane
                state.set(key, torch.stack([td.get(key).detach() for td in per_lane]).clone())
                self.own_keys.append(key)
        self.state = state
        self._swap = self._fast_swap_plan()
        self._vmapped = vmap(self._one_lane, in_dims=(0, 0), randomness="different")
        self._state_leaves = [state.get(k) for k in state.keys(True, True)]
        """The state's tensors (updated in place, never replaced), as a recording takes them."""
        self._own = {k: state.get(k) for k in self.own_keys}
        self._recordings: dict[tuple, Recording | None] = {}
        """Per call signature: its recording, or ``None`` (that call stays eager)."""
        self._not_recorded: dict[tuple, str] = {}
        self.calls = {"replayed": 0, "eager": 0}

    def _fast_swap_plan(self) -> list[tuple[str, str]] | None:
        """How to swap a lane's state in without ``TensorDict.to_module`` (~180 us a call here):
        each top-level entry is a tensordict parameter container (torchrl's
        ``*_network_params``: its ``_param_td`` is replaced, as ``to_module`` does) or a buffer
        or parameter of the loss itself. ``None``: another layout, use ``to_module``."""
        plan = []
        for key in self.state.keys():
            target = getattr(self.module, key, None)
            if isinstance(target, TensorDictBase) and hasattr(target, "_param_td"):
                plan.append((key, "params"))
            elif key in self.module._buffers:
                plan.append((key, "buffer"))
            elif key in self.module._parameters:
                plan.append((key, "parameter"))
            else:
                return None
        return plan

    def _one_lane(self, state: TensorDict, batch: TensorDict) -> TensorDict:
        if self._swap is None:
            with state.to_module(self.module):
                return self.module(batch)
        module, saved = self.module, []
        try:
            for key, kind in self._swap:
                if kind == "params":
                    container = getattr(module, key)
                    saved.append(container._param_td)
                    container._param_td = state.get(key)
                else:
                    slots = module._buffers if kind == "buffer" else module._parameters
                    saved.append(slots[key])
                    slots[key] = state.get(key)
            return module(batch)
        finally:
            for (key, kind), old in zip(self._swap, saved):
                if kind == "params":
                    getattr(module, key)._param_td = old
                else:
                    (module._buffers if kind == "buffer" else module._parameters)[key] = old

    def buffer(self, name: str) -> torch.Tensor | None:
        """The ``[S]`` stacked buffer ``name`` (e.g. ``beta``), or ``None``."""
        return self.state.get(name, None)

    def __call__(self, batch: TensorDict, outputs: frozenset[str] | None = None) -> TensorDict:
        """The loss output of every lane, ``[S]`` leading (``batch`` is ``[S, B]``).

        A call with gradients is replayed from its signature's recording (:mod:`.replay`),
        recorded on the signature's first call; the rest run the module eagerly. ``outputs``:
        the output keys the caller reads besides the ``loss_*`` terms (all if ``None``); a
        replay computes only those and the module's extra outputs (recorded as
        ``extra/<key>``: :mod:`klppo_bench.variants.outputs`)."""
        if not torch.is_grad_enabled():
            self.calls["eager"] += 1
            return self._eager(batch)
        key, batch_leaves = signature(self.module, self._state_leaves, batch)
        key = (key, outputs)
        recording = self._recordings.get(key, _UNSEEN)
        if recording is _UNSEEN:
            recording = self._recordings[key] = self._record(batch, outputs, key)
        if recording is not None:
            try:
                out = recording(self._state_leaves, batch_leaves)
            except Exception:  # noqa: BLE001 -- an op the eager call would not reach (a
                out = None     # recorded branch beyond a guard): the eager call decides
            if out is not None:
                self.calls["replayed"] += 1
                return out
        self.calls["eager"] += 1
        return self._eager(batch)

    def call_counts(self) -> dict:
        """How many calls were replayed and how many ran the module, and why a call signature
        with gradients was not recorded (the run records keep this as ``loss_calls``)."""
        return {**self.calls, "not_recorded": sorted(set(self._not_recorded.values()))}

    def _snapshot(self) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        return ([g.get_state() for g in self.generators],
                {k: v.clone() for k, v in self._own.items()})

    def _restore(self, snapshot: tuple[list[torch.Tensor], dict[str, torch.Tensor]]) -> None:
        rng, buffers = snapshot
        for g, st in zip(self.generators, rng):
            g.set_state(st)
        for k, value in buffers.items():
            # through .data: the version counter stays, so outputs computed from these values
            # can still be differentiated
            self._own[k].data.copy_(value)

    def _record(self, batch: TensorDict, outputs: frozenset[str] | None,
                key: tuple) -> Recording | None:
        """This call's recording, kept if its replay matches the eager call (see
        :mod:`.replay`), else ``None`` (why: ``_not_recorded[key]``). The module runs up to
        three times here (eager, recorded, replayed): the random streams, the loss's buffers,
        and, should the loss write them in place, the parameters and the batch are put back
        before each run and at the end."""
        before = self._snapshot()
        inputs = [t for t in [*self._state_leaves, *batch.values(True, True)]
                  if isinstance(t, torch.Tensor)]
        saved = [t.detach().clone() for t in inputs]

        def restore() -> None:
            self._restore(before)
            for t, value in zip(inputs, saved):
                if not torch.equal(t, value):
                    t.data.copy_(value)

        def call(state, lanes_batch, guards):
            with distribution_validation_off(), _LaneMode(self.generators, guards):
                return self._vmapped(state, lanes_batch)

        try:
            eager_out = self._eager(batch)
            eager_own = {k: v.clone() for k, v in self._own.items()}
            restore()
            if outputs is not None:  # the module's extra outputs are recorded too
                outputs = outputs | extra_outputs(eager_out)
            recording = Recording.record(call, self.state, batch, outputs)
            restore()
            replayed = recording(self._state_leaves,
                                 signature(self.module, self._state_leaves, batch)[1])
            same = recording.matches(eager_out, replayed, self._state_leaves) and all(
                torch.allclose(self._own[k], v, rtol=1e-5, atol=1e-7, equal_nan=True)
                for k, v in eager_own.items())
            if not same:
                self._not_recorded[key] = "its replay did not match the eager call"
            return recording if same else None
        except (NotRecordable, LanesDisagree) as err:
            self._not_recorded[key] = str(err)
            return None
        except Exception as err:  # noqa: BLE001 -- anything make_fx cannot record stays eager
            self._not_recorded[key] = f"recording failed ({type(err).__name__}: {err})"[:300]
            return None
        finally:
            restore()

    def _eager(self, batch: TensorDict) -> TensorDict:
        """The module called under ``vmap``; lane by lane where lanes take different
        branches (from the same random streams and buffers)."""
        before = self._snapshot()
        try:
            with distribution_validation_off(), _LaneMode(self.generators):
                return self._vmapped(self.state, batch)
        except LanesDisagree:
            self._restore(before)
        outs = []
        for s in range(self.lanes):
            with distribution_validation_off(), _LaneMode(self.generators[s:s + 1]):
                outs.append(self._vmapped(self.state[s:s + 1], batch[s:s + 1]))
        return torch.cat(outs)

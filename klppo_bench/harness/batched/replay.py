"""The lanes' vmapped loss call, recorded once as a graph of torch ops and replayed.

Why (measured, ``benchmarks/engine_generic.py``): calling a torchrl loss module costs about
1 ms of Python per call before any arithmetic (tensordict keys and wrappers, distribution
objects, ``vmap``'s own wrapping, :class:`~.lanes._LaneMode`), at 320 calls per Hopper
iteration; that made the generic engine 0.63-0.78x the speed of the hand-written losses it
replaced. ``torch.compile`` of the call fails in dynamo (tensordict's ``.data`` under
``vmap``). ``make_fx`` in ``"real"`` mode records the aten ops that the very same eager call
runs (``vmap``'s batching rules already applied); the replay runs them from one generated
function, with autograd as usual, and the loss module's own Python runs only when a call
signature is first seen.

Before the first replay the graph is simplified (:func:`simplify`): ops that return their
input (``x * 1``, a view or expand to the same shape, a detach of a detached tensor) are
dropped, identical ops on identical inputs are computed once (torchrl's KL-penalty loss runs
the actor network twice: for the new log-prob and for the KL), and a linear layer's ``bmm``
and bias ``add`` become one ``baddbmm``. The values are the eager call's up to rounding: the
fused layer may round differently, and the gradient of a shared subexpression is summed
before it flows back rather than after. Every call with gradients is therefore replayed, the
first one of a signature included, so a run's numbers never depend on which calls were
recorded (a resumed run records again and gets the same bits).

What makes a replay the eager call (else the call runs eagerly, as before):

* **One graph per call signature**: the module's training flag and each input's key, shape,
  dtype, device and ``requires_grad``. Calls without gradients (the engine's once-per-
  iteration KL diagnostic) stay eager: recording one costs more than replaying saves.
* **Python reads of tensor values are guarded.** While recording, ``bool()``/``item()``
  answers come from the real values and each read adds a guard to the graph: "this value is
  still what it was, in every lane". A replay stops at the first guard that fails (nothing
  recorded after that read runs) and that call runs eagerly, so a data-dependent branch
  always takes the path its values ask for.
* **No in-place writes to inputs.** A loss that writes its batch, parameters or buffers in
  place (a running statistic) is not recorded: a replay stopped by a guard would have to undo
  them. In-place ops on its own temporaries are fine.
* **No random draws.** A loss that draws (the Monte-Carlo KL) is never recorded: a replay
  would not draw from each lane's generator.
* **No no-grad leaks.** ``make_fx`` records below autograd; ops that ran under
  ``torch.no_grad()`` inside the loss get a recorded ``detach`` (:class:`_NoGradRegions`).
* **Checked once.** A recording is kept only if its replay of the first call matches the
  eager call: every output and buffer to ``rtol=1e-5`` with the same ``requires_grad``, and
  the gradient of the outputs' sum to a relative norm of ``1e-4``, NaN where the eager one is
  NaN (simplified graphs differ from the eager call in rounding only; a lost no-grad region
  or a baked-in value differs by far more).

Not bit for bit across an interruption: a loss whose Python branches flip during a run (the
built-in variants have none; the guards above handle them) records whichever branch its first
call takes, so a resumed run may replay where the original ran eagerly, or the reverse, and
the two then agree to rounding only.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from tensordict import TensorDict, TensorDictBase
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, make_fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from klppo_bench.harness.batched.graph import compile_graph, draws, simplify, writes_inputs
from klppo_bench.harness.batched.structure import LanesDisagree, lanes_equal

__all__ = ["NotRecordable", "Recording", "guard_for", "read_while_recording", "signature"]

aten = torch.ops.aten


class NotRecordable(RuntimeError):
    """This call cannot be replayed from a recording (the message says why)."""


def _leaf_keys(td: TensorDictBase) -> list:
    return list(td.keys(True, True))


def signature(module: torch.nn.Module, state_leaves: list[torch.Tensor],
              batch: TensorDictBase) -> tuple[tuple, list]:
    """``(key, batch leaves)``: what a recording is valid for (see the module docstring) and
    the batch's tensors in recording order. The state's shapes never change (its tensors are
    updated in place), so only its ``requires_grad`` flags are part of the key."""
    items = list(batch.items(True, True))
    key = (module.training, tuple(t.requires_grad for t in state_leaves),
           tuple((k, tuple(v.shape), v.dtype, v.device, v.requires_grad)
                 if isinstance(v, torch.Tensor) else (k, type(v).__name__) for k, v in items))
    return key, [v for _, v in items]


def guard_for(func, tensor: torch.Tensor, answer) -> torch.Tensor:
    """A 0-d bool tensor, recorded in the graph: ``func`` of every element of ``tensor`` (each
    lane's value, for a read of a lane-batched tensor) still gives ``answer``."""
    if func is torch.Tensor.__bool__:
        same = tensor.ne(0) if answer else tensor.eq(0)
    elif isinstance(answer, float) and math.isnan(answer):
        same = tensor.isnan()
    elif func is torch.Tensor.__int__ and tensor.is_floating_point():
        same = tensor.trunc().eq(answer)
    else:  # item() / float() / int() of an integer tensor: exact (float32 -> float is exact)
        same = tensor.eq(answer)
    return same.all()


def read_while_recording(func, args, kwargs, lanes: torch.Tensor | None, guards: list):
    """``func`` (a Python read of a tensor value) while recording: answered from the real value
    (lane 0's; all lanes must agree) and guarded. ``lanes``: the lane-stacked tensor behind a
    batched ``args[0]``, else ``None``."""
    value = lanes[0] if lanes is not None else args[0]
    with disable_proxy_modes_tracing():
        if lanes is not None and len(lanes) > 1 and not bool(lanes_equal(lanes).all()):
            raise LanesDisagree(f"lanes differ in a value read by Python ({func.__name__})")
        answer = func(value, *args[1:], **kwargs)
    guards.append(guard_for(func, lanes if lanes is not None else value, answer))
    return answer


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.requires_grad != b.requires_grad:
        return False
    if a.is_floating_point():
        return torch.allclose(a.detach(), b.detach(), rtol=1e-5, atol=1e-7, equal_nan=True)
    return torch.equal(a, b)


def _grad_close(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Non-finite in the same places (a diverged lane), the rest to a relative norm of 1e-4."""
    if a is None or b is None:
        return a is None and b is None
    finite = torch.isfinite(a)
    if not torch.equal(finite, torch.isfinite(b)):
        return False
    a, b = a[finite].double(), b[finite].double()
    return float((a - b).norm()) <= 1e-4 * float(a.norm()) + 1e-9


class _NoGradRegions(TorchDispatchMode):
    """While recording: an op that runs with grad mode off (``torch.no_grad()`` inside the
    loss: torchrl's diagnostics, a user's detached weights) has its outputs passed through a
    recorded ``detach``. ``make_fx`` records below autograd and would otherwise replay such an
    op with gradients flowing through it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled() or func._schema.is_mutable:
            return out
        return tree_map_only(torch.Tensor, aten.detach.default, out)


def _one_fake_mode():
    """One ``FakeTensorMode`` for the op metadata of a whole recording. Without an ambient one,
    ``make_fx`` in ``"real"`` mode builds a new mode for every recorded op, and each captures
    a Python stack trace: 0.27 s of a 0.36 s recording (clip, S=10, measured here)."""
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode

    return tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True)))


class Recording:
    """One call signature's recorded graph (build with :meth:`record`)."""

    def __init__(self, graph: torch.fx.Graph, out_keys, batch_size):
        self.graph, self.out_keys, self.batch_size = graph, out_keys, batch_size
        output = next(n for n in graph.nodes if n.op == "output")
        self.guards = len(output.args[0][1])
        self.run = compile_graph(graph)
        self._flat = all(isinstance(k, str) for k in out_keys)

    @classmethod
    def record(cls, call: Callable[[TensorDictBase, TensorDictBase, list], TensorDictBase],
               state: TensorDictBase, batch: TensorDictBase,
               outputs: frozenset[str] | None = None) -> "Recording":
        """Record ``call(state, batch, guards)``, the lanes' vmapped call with its
        :class:`~.lanes._LaneMode` appending guards to ``guards``, and :func:`simplify` it.
        The replay takes the leaves of ``state`` and ``batch`` in ``keys(True, True)`` order
        and returns the ``loss_*`` terms and the outputs named in ``outputs`` (all if
        ``None``); what no returned output needs is not computed.

        Raises:
            NotRecordable: the call draws random numbers, writes its inputs in place or
                returns something that is not a tensor.
        """
        state_keys, batch_keys = _leaf_keys(state), _leaf_keys(batch)
        n_state = len(state_keys)
        found: dict = {}

        def flat(*leaves):
            st, bt = state.empty(recurse=True), batch.empty(recurse=True)
            for key, leaf in zip(state_keys, leaves[:n_state]):
                st.set(key, leaf)
            for key, leaf in zip(batch_keys, leaves[n_state:]):
                bt.set(key, leaf)
            guards: list[torch.Tensor] = []
            with _NoGradRegions() if torch.is_grad_enabled() else contextlib.nullcontext():
                out = call(st, bt, guards)
            keys = [k for k in _leaf_keys(out) if outputs is None or k in outputs
                    or isinstance(k, str) and k.startswith("loss_")]
            values = [out.get(k) for k in keys]
            if not all(isinstance(v, torch.Tensor) for v in values):
                raise NotRecordable("the loss returns values that are not tensors")
            found.update(out_keys=keys, batch_size=out.batch_size)
            return values, guards

        leaves = [state.get(k) for k in state_keys] + [batch.get(k) for k in batch_keys]
        with _one_fake_mode():
            gm = make_fx(flat, tracing_mode="real")(*leaves)
        if draws(gm.graph):
            raise NotRecordable("the loss draws random numbers")
        if writes_inputs(gm.graph):
            raise NotRecordable("the loss writes its inputs, parameters or buffers in place")
        simplify(gm.graph, [leaf.requires_grad for leaf in leaves])
        return cls(gm.graph, found["out_keys"], found["batch_size"])

    def __call__(self, state_leaves: list[torch.Tensor],
                 batch_leaves: list[torch.Tensor]) -> TensorDict | None:
        """The replayed call's output, or ``None`` when a guard failed (a recording never
        writes its inputs, so nothing is left to undo)."""
        values = self.run(*state_leaves, *batch_leaves)
        if values is None:
            return None
        if self._flat:
            return TensorDict(dict(zip(self.out_keys, values)), batch_size=self.batch_size)
        out = TensorDict({}, batch_size=self.batch_size)
        for key, value in zip(self.out_keys, values):  # nested keys
            out.set(key, value)
        return out

    def matches(self, eager_out: TensorDictBase, replay_out: TensorDictBase | None,
                inputs: list[torch.Tensor]) -> bool:
        """Whether the replay gave the eager call's outputs and, for every input that needs a
        gradient, the gradient of the sum of the outputs that carry one (module docstring)."""
        if replay_out is None or _leaf_keys(replay_out) != self.out_keys:
            return False
        if not all(_close(eager_out.get(k), replay_out.get(k)) for k in self.out_keys):
            return False
        wanted = [x for x in inputs if x.requires_grad]
        if not torch.is_grad_enabled() or not wanted:
            return True

        def grads(out):
            total = [v.sum() for v in (out.get(k) for k in self.out_keys)
                     if v.requires_grad and v.is_floating_point()]
            if not total:
                return [None] * len(wanted)
            return torch.autograd.grad(torch.stack(total).sum(), wanted, allow_unused=True)

        return all(_grad_close(a, b) for a, b in zip(grads(eager_out), grads(replay_out)))

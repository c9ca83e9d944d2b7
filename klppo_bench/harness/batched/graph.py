"""Rewrites of a recorded loss graph, and its compilation to one Python function
(:mod:`.replay` records the graph; see there for why and when a replay is used).

:func:`simplify`, on a graph that writes no tensor in place:

* ops that return their input are dropped (``x * 1``, a view, expand or reshape to the same
  shape, an identity ``permute``, a detach of a detached tensor), and so is each ``detach``
  of a value that carries no gradient anyway;
* identical pure ops on identical inputs are computed once (torchrl's KL-penalty loss runs
  the actor network twice: for the new log-prob and for the KL);
* what does not depend on the inputs is computed once, comparisons with a NaN scalar
  included (always false; the beta schedule builds the KL-penalty loss with ``dtarg = nan``),
  and guards that always hold are dropped;
* a linear layer's ``bmm`` and bias ``add`` become one ``baddbmm``.

Forward values stay the eager call's up to rounding: the fused layer may round differently,
and the gradient of a shared subexpression is summed before it flows back rather than after.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["compile_graph", "draws", "mutates", "simplify", "writes_inputs"]

aten = torch.ops.aten


def _op(node: torch.fx.Node):
    return node.target if node.op == "call_function" else None


def _pure(target) -> bool:
    return (isinstance(target, torch._ops.OpOverload) and not target._schema.is_mutable
            and torch.Tag.nondeterministic_seeded not in target.tags)


def mutates(graph: torch.fx.Graph) -> bool:
    return any(isinstance(_op(n), torch._ops.OpOverload) and n.target._schema.is_mutable
               for n in graph.nodes)


def writes_inputs(graph: torch.fx.Graph) -> bool:
    """Whether an op writes, in place, one of the graph's inputs (or a view of one)."""
    for node in graph.nodes:
        target = _op(node)
        if not isinstance(target, torch._ops.OpOverload) or not target._schema.is_mutable:
            continue
        for arg, spec in zip(node.args, target._schema.arguments):
            if spec.alias_info is None or not spec.alias_info.is_write:
                continue
            while isinstance(arg, torch.fx.Node) and isinstance(_op(arg), torch._ops.OpOverload) \
                    and arg.target._schema.returns and arg.target._schema.returns[0].alias_info:
                arg = arg.args[0]  # through views to what they view
            if isinstance(arg, torch.fx.Node) and arg.op == "placeholder":
                return True
    return False


def draws(graph: torch.fx.Graph) -> bool:
    return any(isinstance(_op(n), torch._ops.OpOverload)
               and torch.Tag.nondeterministic_seeded in n.target.tags for n in graph.nodes)


def _meta(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return (tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else None


_SAME_SHAPE_NOOPS = {aten.view.default, aten._unsafe_view.default, aten.expand.default,
                     aten.reshape.default, aten.alias.default}


def _returns_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The input ``node`` returns unchanged (same values, shape and dtype), else ``None``."""
    target = _op(node)
    if target is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    src = node.args[0]
    if _meta(src) is None or _meta(src) != _meta(node):
        return None
    if target in _SAME_SHAPE_NOOPS:
        return src
    if target in (aten.mul.Scalar, aten.mul.Tensor, aten.div.Scalar, aten.div.Tensor) \
            and len(node.args) == 2 and type(node.args[1]) in (int, float) and node.args[1] == 1:
        return src
    if target is aten.detach.default and _op(src) is aten.detach.default:
        return src
    if target is aten.permute.default and list(node.args[1]) == list(range(len(node.args[1]))):
        return src
    return None


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_hashable(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _hashable(v)) for k, v in value.items())))
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    if isinstance(value, float):  # -0.0 == 0.0 in Python, not in every op (atan2, 1 / x)
        return ("float", value, math.copysign(1.0, value))
    if isinstance(value, (torch.fx.Node, int, float, bool, str, type(None), torch.dtype,
                          torch.device, torch.layout, torch.memory_format)):
        return (type(value).__name__, value)
    raise TypeError  # anything else: not merged


def _drop_needless_detaches(graph: torch.fx.Graph, needs_grad: list[bool]) -> None:
    """Drop each ``detach`` of a value that carries no gradient anyway (its inputs were all
    detached, or are inputs that do not require grad): :class:`_NoGradRegions` detaches every
    op of a ``no_grad`` block, most of them needlessly. ``needs_grad``: per placeholder."""
    carries: dict[torch.fx.Node, bool] = {}
    placeholders = iter(needs_grad)
    for node in list(graph.nodes):
        if node.op == "placeholder":
            carries[node] = next(placeholders)
            continue
        inputs = [a for a in node.all_input_nodes if a in carries]
        val = node.meta.get("val")
        floating = not isinstance(val, torch.Tensor) or val.is_floating_point()
        if _op(node) is aten.detach.default:
            carries[node] = False
            if inputs and not carries[inputs[0]]:
                node.replace_all_uses_with(inputs[0])
                graph.erase_node(node)
                carries.pop(node)
        else:
            carries[node] = floating and any(carries[a] for a in inputs)


def simplify(graph: torch.fx.Graph, needs_grad: list[bool]) -> None:
    """Drop ops that return their input, needless detaches, and compute identical pure ops once
    (see the module docstring); a graph that writes a tensor in place is only cleared of dead
    code. ``needs_grad``: whether each input (placeholder) requires grad."""
    if not mutates(graph):
        _drop_needless_detaches(graph, needs_grad)
        seen: dict = {}
        for node in list(graph.nodes):
            src = _returns_input(node)
            if src is not None:
                node.replace_all_uses_with(src)
                graph.erase_node(node)
                continue
            if not _pure(_op(node)):
                continue
            try:
                key = (node.target, _hashable(node.args), _hashable(node.kwargs))
            except TypeError:
                continue
            if key in seen:
                node.replace_all_uses_with(seen[key])
                graph.erase_node(node)
            else:
                seen[key] = node
    if not mutates(graph):
        _fold_constants(graph)
    graph.eliminate_dead_code()
    if not mutates(graph):
        _fuse_bias_adds(graph)


def _constant(value):
    """Target of a node whose value was computed while recording (``meta["constant"]``)."""
    raise AssertionError("constant nodes are compiled to their value")


_NAN_FALSE = {aten.gt.Scalar, aten.lt.Scalar, aten.ge.Scalar, aten.le.Scalar, aten.eq.Scalar}


def _fold_constants(graph: torch.fx.Graph) -> None:
    """Compute once what does not depend on the inputs, and drop guards that always hold.

    A comparison with a NaN scalar is always false (``ne``: true): the KL-penalty rule's
    ``kl.mean() > dtarg * 1.5`` with the beta schedule's ``dtarg = nan``. Ops of pure
    constants are then evaluated now; a guard that is a constant ``True`` is dropped, with
    the reads it needed. Values the loss returns stay computed (each call gets its own)."""
    known: dict[torch.fx.Node, torch.Tensor] = {}
    output = next(n for n in graph.nodes if n.op == "output")
    for node in list(graph.nodes):
        target = _op(node)
        val = node.meta.get("val")
        if (target in _NAN_FALSE or target is aten.ne.Scalar) and len(node.args) == 2 \
                and isinstance(node.args[1], float) and math.isnan(node.args[1]) \
                and isinstance(val, torch.Tensor):
            fill = target is aten.ne.Scalar
            known[node] = torch.full(tuple(val.shape), fill, dtype=torch.bool, device=val.device)
        elif _pure(target) and node.all_input_nodes \
                and all(a in known for a in node.all_input_nodes):
            with torch.no_grad():
                known[node] = target(*torch.fx.node.map_arg(node.args, known.__getitem__),
                                     **torch.fx.node.map_arg(node.kwargs, known.__getitem__))
    values, guards = output.args[0]
    kept = []
    for guard in guards:
        if guard in known and bool(known[guard].all()):
            continue  # always holds
        kept.append(guard)
    output.args = ((values, kept),)
    for node, value in known.items():
        if node in values or not isinstance(value, torch.Tensor):
            continue
        if any(user not in known for user in node.users):
            with graph.inserting_before(node):
                const = graph.call_function(_constant, ())
            const.meta = {"val": node.meta.get("val"), "constant": value}
            node.replace_all_uses_with(const, delete_user_cb=lambda user: user not in known)


def _fuse_bias_adds(graph: torch.fx.Graph) -> None:
    """``add(bias, bmm(x, w))`` (a linear layer under ``vmap``) becomes ``baddbmm(bias, x, w)``,
    one op and one backward node instead of two (rounding may differ in the last bit)."""
    for node in list(graph.nodes):
        if _op(node) is not aten.add.Tensor or len(node.args) != 2 or node.kwargs:
            continue
        a, b = node.args
        for mm, other in ((a, b), (b, a)):
            if (isinstance(mm, torch.fx.Node) and _op(mm) is aten.bmm.default
                    and len(mm.users) == 1 and isinstance(other, torch.fx.Node)
                    and other is not mm
                    and _meta(node) is not None and _meta(node) == _meta(mm)
                    and _meta(other) is not None and _meta(other)[1] == _meta(mm)[1]):
                with graph.inserting_before(node):
                    fused = graph.call_function(aten.baddbmm.default, (other, *mm.args))
                fused.meta = dict(node.meta)
                node.replace_all_uses_with(fused)
                graph.erase_node(node)
                graph.erase_node(mm)
                break


def compile_graph(graph: torch.fx.Graph) -> Callable:
    """The graph as one Python function that calls each op's C++ entry point directly.

    The graph returns ``(values, guards)``; the function returns the list of values, or
    ``None`` as soon as a guard is false: nothing recorded after that Python read runs (the
    branch taken while recording may be wrong, even invalid, for these values).

    FX's own generated code calls ``torch.ops.aten.<op>.<overload>(...)``: four attribute
    lookups and a Python ``OpOverload.__call__`` per op, about 0.45 us more per op than a
    direct call (measured here); at ~80 ops per loss call that was ~3% of a minibatch."""
    consts: list = []
    names: dict[torch.fx.Node, str] = {}
    lines: list[str] = []

    def has_node(value) -> bool:
        return isinstance(value, torch.fx.Node) or (
            isinstance(value, (list, tuple)) and any(has_node(v) for v in value))

    def render(value) -> str:
        if isinstance(value, torch.fx.Node):
            return names[value]
        if isinstance(value, (list, tuple)) and has_node(value):
            inner = ", ".join(render(v) for v in value)
            return f"[{inner}]" if isinstance(value, list) else f"({inner},)"
        consts.append(value)
        return f"C[{len(consts) - 1}]"

    output = next(n for n in graph.nodes if n.op == "output")
    values, guards = output.args[0]
    guard_nodes = set(guards)
    params = []
    for i, node in enumerate(graph.nodes):
        name = f"v{i}"
        names[node] = name
        if node.op == "placeholder":
            params.append(name)
        elif node.target is _constant:
            consts.append(node.meta["constant"])
            lines.append(f"    {name} = C[{len(consts) - 1}]")
        elif node.op == "call_function":
            target = node.target._op if isinstance(node.target, torch._ops.OpOverload) \
                else node.target
            args = [render(a) for a in node.args]
            args += [f"{k}={render(v)}" for k, v in node.kwargs.items()]
            lines.append(f"    {name} = {render(target)}({', '.join(args)})")
        elif node.op == "output":
            lines.append(f"    return {render(list(values))}")
        else:  # get_attr and the rest: not produced by the recordings here
            raise ValueError(f"cannot compile graph node {node.op} {node.target}")
        if node in guard_nodes:  # a guard that fails ends the replay before what follows
            lines.append(f"    if not {name}:\n        return None")
    source = f"def replay({', '.join(params)}):\n" + "\n".join(lines) + "\n"
    scope: dict = {"C": consts}
    exec(compile(source, "<klppo_bench replay>", "exec"), scope)  # noqa: S102 -- our own code
    return scope["replay"]

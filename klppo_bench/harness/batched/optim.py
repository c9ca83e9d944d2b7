"""Adam and gradient clipping for S lanes of stacked parameters, each lane on its own.

All stacked parameters and their gradients live in one aligned flat buffer each
(:func:`flatten_parameters`). Adam is elementwise, so one Adam over the buffer is S independent
Adams when the lanes share a step size; lanes with different ``train.lr`` get one parameter
group per lane, over leaf views of that lane's slices (torch's own Adam either way).
"""

from __future__ import annotations

import math

import torch

__all__ = ["LaneAdam", "clip_grad_norm_per_lane", "flatten_parameters"]

_ALIGN = 16  # elements (64 bytes for float32): matmul kernels round differently with the
# alignment of their operands, and the engine must stay bit-identical to separate tensors


def flatten_parameters(params: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Move ``params`` and their gradients into one buffer each; return the flat parameter and
    each parameter's start in it.

    Each parameter becomes a view of the flat one and its ``.grad`` a view of the flat
    gradient (autograd accumulates into an existing ``.grad`` in place), so Adam and zeroing
    are one op each on one tensor instead of ~10 per parameter tensor: foreach Adam over the
    13 stacked tensors cost ~550 us per minibatch here (S=5, cProfile), a single-tensor Adam
    ~100 us. A parameter that gets no gradient keeps a zero one, which leaves it exactly
    unchanged (Adam's update is ``0 / (0 + eps)``), as torch skipping it would.
    """
    starts, total = [], 0
    for p in params:
        starts.append(total)
        total += -(-p.numel() // _ALIGN) * _ALIGN
    flat = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
    grad = torch.zeros_like(flat)  # padding gets zero gradients: Adam leaves it at zero
    for p, start in zip(params, starts):
        n = p.numel()
        flat[start:start + n].copy_(p.detach().reshape(-1))
        p.data = flat[start:start + n].view_as(p)
        p.grad = grad[start:start + n].view_as(p)
    flat.requires_grad_(True)
    flat.grad = grad
    return flat, starts


class LaneAdam(torch.optim.Adam):
    """torch's Adam over the lanes' stacked ``params`` (each ``[S, ...]``), lane ``s`` with
    step size ``lrs[s]``. Each group keeps its ``base_lr`` for the annealing schedule."""

    def __init__(self, params: list[torch.Tensor], lrs: list[float]):
        S = params[0].shape[0]
        if len(lrs) != S:
            raise ValueError(f"{len(lrs)} step sizes for {S} lanes")
        self.flat, starts = flatten_parameters(params)
        self.S = S
        if len(set(lrs)) == 1:
            groups = [{"params": [self.flat], "lr": lrs[0], "base_lr": lrs[0]}]
            self._lane_group = [0] * S
        else:
            groups = []
            flat, grad = self.flat.detach(), self.flat.grad
            for s, lr in enumerate(lrs):
                views = []
                for p, start in zip(params, starts):
                    n = p[0].numel()
                    view = flat[start + s * n:start + (s + 1) * n]  # a leaf sharing storage
                    view.grad = grad[start + s * n:start + (s + 1) * n]
                    views.append(view)
                groups.append({"params": views, "lr": lr, "base_lr": lr})
            self._lane_group = list(range(S))
        super().__init__(groups)

    def zero_grad(self, set_to_none: bool = False) -> None:
        self.flat.grad.zero_()  # the parameters' (and the views') grads are views of it

    def lane_lrs(self) -> list[float]:
        """Each lane's current step size."""
        return [self.param_groups[g]["lr"] for g in self._lane_group]


def clip_grad_norm_per_lane(params: list[torch.Tensor], max_norm: float, S: int) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` applied to each lane's slice; returns ``[S]`` norms.

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

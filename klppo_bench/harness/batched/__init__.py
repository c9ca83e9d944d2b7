"""The batched engine: S lanes (seeds, and settings that differ only in hyperparameter values)
in one process, each lane through its variant's own loss module (``torch.func.vmap``).

* :mod:`.engine` -- the training loop (:func:`train_batched`);
* :mod:`.lanes` -- the variant's loss module called for all lanes at once;
* :mod:`.replay`, :mod:`.graph` -- that call recorded once as a graph of torch ops,
  simplified, and replayed (the loss module's Python runs once per call signature, not 320
  times per iteration);
* :mod:`.structure` -- what lanes must share to share that call;
* :mod:`.job` -- which runs share a job, why a run cannot be batched, each lane's record;
* :mod:`.checkpoint` -- a job's checkpoints (resume bit for bit after a kill);
* :mod:`.nets`, :mod:`.envs`, :mod:`.optim` -- stacked networks for acting, the lanes'
  environments, per-lane Adam and gradient clipping.
"""

from klppo_bench.harness.batched.engine import build_lanes, train_batched
from klppo_bench.harness.batched.job import (batch_unsupported_reason, check_batch,
                                             execute_batch, lane_key)
from klppo_bench.harness.batched.lanes import LaneLoss, LaneUnsupported

__all__ = ["LaneLoss", "LaneUnsupported", "batch_unsupported_reason", "build_lanes",
           "check_batch", "execute_batch", "lane_key", "train_batched"]

"""The batched engine: S lanes (seeds, and settings that differ only in hyperparameter values)
in one process, each lane through its variant's own loss module (``torch.func.vmap``).

* :mod:`.engine` -- the training loop (:func:`train_batched`), its phases as methods;
* :mod:`.state` -- a job's state between iterations: set-up, snapshot, resume, results;
* :mod:`.lanes` -- the variant's loss module called for all lanes at once;
* :mod:`.replay`, :mod:`.graph` -- that call recorded once as a graph of torch ops,
  simplified, and replayed (the loss module's Python runs once per call signature, not 320
  times per iteration);
* :mod:`.structure` -- what lanes must share to share that call;
* :mod:`.packing` -- which runs share a job, why a run cannot be batched;
* :mod:`.job` -- each lane's record (its run directory);
* :mod:`.checkpoint` -- a job's checkpoints (resume bit for bit after a kill);
* :mod:`.nets`, :mod:`.envs`, :mod:`.optim` -- stacked networks (and a job's lanes built on
  them), the lanes' environments, per-lane Adam and gradient clipping.
"""

from klppo_bench.harness.batched.engine import train_batched
from klppo_bench.harness.batched.job import execute_batch
from klppo_bench.harness.batched.lanes import LaneLoss, LaneUnsupported
from klppo_bench.harness.batched.nets import build_lanes
from klppo_bench.harness.batched.packing import batch_unsupported_reason, check_batch, lane_key

__all__ = ["LaneLoss", "LaneUnsupported", "batch_unsupported_reason", "build_lanes",
           "check_batch", "execute_batch", "lane_key", "train_batched"]

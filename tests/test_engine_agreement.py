"""benchmarks/engine_agreement.py: the batched-vs-reference learning check's verdict."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from engine_agreement import compare  # noqa: E402


def _scores(values, variant="clip"):
    return pd.DataFrame({"env": "Hopper-v5", "variant": variant, "seed": range(len(values)),
                         "final_score": values, "final_eval_return": values})


def test_same_scores_agree_and_shifted_scores_do_not():
    rng = np.random.default_rng(0)
    ref = rng.normal(1000, 200, 10)
    same = compare(_scores(ref), _scores(rng.permutation(ref)), reps=500, random_state=0)
    assert len(same) == 2 and same.agree.all()
    assert np.allclose(same.poi_batched_gt_reference, 0.5)
    np.testing.assert_allclose(same.iqm_batched, same.iqm_reference)
    worse = compare(_scores(ref), _scores(ref - 1000), reps=500, random_state=0)
    assert not worse.agree.any()
    assert (worse.poi_batched_gt_reference == 0.0).all()
    assert not worse.iqm_cis_overlap.any()


def test_only_common_seeds_and_variants_are_compared():
    ref = pd.concat([_scores([1.0, 2.0, 3.0]), _scores([5.0, 6.0], variant="no-clip")])
    bat = _scores([1.0, 2.0])
    out = compare(ref, bat, reps=200, random_state=0)
    assert set(out.variant) == {"clip"} and (out.seeds == 2).all()

"""Checkpoints cannot carry code: a planted pickle payload in ``checkpoints/`` is refused in
one line and never runs; what a checkpoint holds round-trips through plain data read with
``torch.load(weights_only=True)``; a save that fails (disk full) leaves no temporary file and
keeps the previous checkpoint; a job's stale temporaries do not survive its next start."""

from __future__ import annotations

import errno
import io
import os
import pickle

import numpy as np
import pytest
import torch

from klppo_bench.config import build_run_config
from klppo_bench.harness.batched.checkpoint import (Checkpointing, decode, encode,
                                                    job_checkpoint_path, versions)
from klppo_bench.harness.batched.engine import train_batched
from klppo_bench.store import WriteError

from .conftest import TINY


class _Payload:
    """Unpickling this writes a marker file (what an attacker's code would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _cfgs():
    return [build_run_config("clip", "Hopper", s, frames=2 * 256, overrides=TINY) for s in (0, 1)]


@pytest.mark.parametrize("form", ["raw pickle", "torch.save with matching identity"])
def test_a_planted_pickle_payload_is_refused_in_one_line_and_never_runs(tmp_path, form):
    cfgs = _cfgs()
    run_ids = [c.run_id() for c in cfgs]
    path = job_checkpoint_path(tmp_path, run_ids)
    path.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    payload = _Payload(marker)
    if form == "raw pickle":
        path.write_bytes(pickle.dumps({"run_ids": run_ids, "state": payload}))
    else:  # the identity a reader checks first is right: only weights_only stops it
        buf = io.BytesIO()
        torch.save({"run_ids": run_ids, "versions": {k: str(v) for k, v in versions().items()},
                    "iteration": 1, "obs": payload}, buf)
        path.write_bytes(buf.getvalue())
    pickle.loads(pickle.dumps(payload))  # the payload is live: unpickled, it runs
    assert marker.read_text() == "ran"
    marker.unlink()

    said = []
    ckpt = Checkpointing(path, every=1, say=said.append)
    got = train_batched(cfgs, progress=False, checkpoint=ckpt)
    assert not marker.exists()
    assert len(said) == 1 and "\n" not in said[0]
    assert said[0].startswith(f"checkpoint {path} refused: it ")
    assert "the job starts over" in said[0]
    assert ckpt.resumed_iteration is None and all(not isinstance(r, Exception) for r in got)
    assert path.with_name(path.name + ".refused").is_file()  # kept aside, not lost


def test_what_a_checkpoint_holds_round_trips_as_plain_data():
    state = {"obs": np.arange(12, dtype=np.float32).reshape(3, 4),
             "norm": (np.zeros(3), np.ones(3, dtype=np.float64), np.array([7], np.int64)),
             "flags": np.array([True, False]), "scalar": np.float64(0.1), "big": 2 ** 127 + 1,
             "mujoco": b"\x00\x01bytes", "gen": torch.Generator().get_state(),
             "rows": [[{"frames": 256, "kl": float("nan")}], []], "failed": {1: "diverged"},
             "version": torch.__version__, "none": None}
    buf = io.BytesIO()
    torch.save(encode(state), buf)
    buf.seek(0)
    back = decode(torch.load(buf, weights_only=True))
    np.testing.assert_array_equal(back["obs"], state["obs"])
    assert back["obs"].dtype == np.float32 and back["obs"].flags.writeable
    assert [a.dtype for a in back["norm"]] == [np.float64, np.float64, np.int64]
    assert back["flags"].dtype == bool and back["scalar"] == np.float64(0.1)
    assert type(back["scalar"]) is np.float64
    assert back["big"] == 2 ** 127 + 1 and back["mujoco"] == state["mujoco"]
    assert torch.equal(back["gen"], state["gen"]) and back["failed"] == {1: "diverged"}
    assert back["rows"][0][0]["frames"] == 256 and np.isnan(back["rows"][0][0]["kl"])
    assert type(back["version"]) is str and back["version"] == torch.__version__
    with pytest.raises(TypeError, match=r"checkpoint\['x'\]: a builtins.object cannot be stored"):
        encode({"x": object()})


def test_a_real_checkpoint_loads_with_weights_only_and_resumes(tmp_path):
    """A job's checkpoint (MuJoCo data, RNG states, arrays) loads with plain
    ``weights_only=True`` (no allow-listed classes) and the job resumes from it."""
    cfgs = [build_run_config("clip", "Hopper", s, frames=3 * 256, overrides=TINY)
            for s in (0, 1)]
    path = tmp_path / "job.pt"
    train_batched(cfgs, progress=False, checkpoint=Checkpointing(path, every=1, keep=True))
    raw = torch.load(path, weights_only=True)
    assert raw["iteration"] == 2 and isinstance(raw["envs"]["train"][0]["mujoco"], bytes)
    ckpt = Checkpointing(path, every=1)
    train_batched(cfgs, progress=False, checkpoint=ckpt)
    assert ckpt.resumed_iteration == 2


def _full_disk(monkeypatch):
    import klppo_bench.store as store

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(store.os, "fsync", fsync)


def test_a_save_on_a_full_disk_leaves_no_temporary_and_keeps_the_last_checkpoint(
        tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "job-0123.pt"
    ckpt = Checkpointing(path, every=1)
    ckpt.save({"run_ids": ["a"], "versions": versions(), "iteration": 1})
    before = path.read_bytes()
    with monkeypatch.context() as m:
        _full_disk(m)
        with pytest.raises(WriteError) as err:
            ckpt.save({"run_ids": ["a"], "versions": versions(), "iteration": 2})
    assert str(err.value) == f"cannot write {path}: disk full (No space left on device)"
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["job-0123.pt"]


def test_a_leftover_temporary_of_a_killed_save_is_removed_when_the_job_starts(tmp_path):
    path = tmp_path / "checkpoints" / "job-0123.pt"
    path.parent.mkdir(parents=True)
    stale = path.parent / f".{path.name}.4242.tmp"
    stale.write_bytes(b"\0" * 1024)  # on a full disk this would block every later save
    other = path.parent / ".job-4567.pt.4242.tmp"  # another job's: not this job's to remove
    other.write_bytes(b"x")
    assert Checkpointing(path).load(["a"]) is None
    assert not stale.exists() and other.exists()

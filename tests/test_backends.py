"""Sweeps end to end on experiments/smoke.yaml: resume after SIGKILL, failure isolation,
the Ray backend, idempotent re-runs. Metrics are compared bit for bit (timing columns aside).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from klppo_bench import cli
from klppo_bench.store import experiment_runs

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "experiments" / "smoke.yaml")
TIMING = ["update_seconds", "wall_seconds", "sps"]


def sweep(*argv: str) -> int:
    return cli.main(["sweep", *argv])


def tables(exp_dir: Path) -> dict[str, dict[str, pd.DataFrame]]:
    """run_id -> table name -> DataFrame, timing columns dropped, for every run dir."""
    out = {}
    for run in experiment_runs(exp_dir):
        out[run.run_id] = {name: run.table(name).drop(columns=TIMING, errors="ignore")
                           for name in ("metrics", "episodes", "evals")}
    return out


def assert_same_results(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for run_id in a:
        for name in a[run_id]:
            pd.testing.assert_frame_equal(a[run_id][name], b[run_id][name], check_exact=True)


def statuses(exp_dir: Path) -> dict[str, dict]:
    return {run.run_id: run.status() for run in experiment_runs(exp_dir)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """smoke.yaml swept once, uninterrupted, on the local backend."""
    results = tmp_path_factory.mktemp("reference")
    assert sweep(SMOKE, "--results", str(results), "--workers", "2") == 0
    return results / "smoke"


def test_uninterrupted_sweep_writes_every_run_once(reference):
    runs = statuses(reference)
    assert len(runs) == 4
    assert {s["state"] for s in runs.values()} == {"done"}
    assert {s["attempts"] for s in runs.values()} == {1}
    assert sorted(s["setting"] for s in runs.values()) == ["clip", "clip", "klpen-adaptive",
                                                          "klpen-adaptive"]
    spec = yaml.safe_load((reference / "spec.yaml").read_text())
    assert spec["envs"] == ["Hopper-v5"] and spec["seeds"] == [0, 1]
    for run_id, metrics in tables(reference).items():
        assert metrics["metrics"]["frames"].tolist() == [256, 512, 768, 1024]


def test_rerun_of_a_finished_sweep_does_nothing(reference, capsys):
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*")}
    assert sweep(SMOKE, "--results", str(reference.parent)) == 0
    out = capsys.readouterr().out
    assert "all 4 runs are done; nothing to run" in out
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*")} == before


def test_workers_end_when_the_sweep_is_killed(tmp_path):
    """Workers are the forkserver's children: a SIGKILLed sweep must not leave them training."""
    exp_dir = tmp_path / "smoke"
    proc = subprocess.Popen(
        [sys.executable, "-m", "klppo_bench.cli", "sweep", SMOKE, "--workers", "1",
         "--results", str(tmp_path), "--engine", "reference"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        pids = []
        while time.monotonic() < deadline and not pids:
            pids = [s["pid"] for s in statuses(exp_dir).values() if s and s["state"] == "running"]
            time.sleep(0.05)
        assert pids, "no run started"
    finally:
        proc.kill()  # the sweep only, not its process group
        proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pids[0], 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"worker {pids[0]} outlived its sweep")


def test_sigkill_mid_sweep_then_resume_matches_uninterrupted(reference, tmp_path):
    exp_dir = tmp_path / "smoke"
    proc = subprocess.Popen(
        [sys.executable, "-m", "klppo_bench.cli", "sweep", SMOKE, "--workers", "1",
         "--results", str(tmp_path)],
        start_new_session=True,  # its own process group: the kill reaches every worker
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            states = [s.get("state") for s in statuses(exp_dir).values() if s]
            if "done" in states and "running" in states:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the sweep never had one run done and another running")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    killed = statuses(exp_dir)
    done_before = {r for r, s in killed.items() if s and s["state"] == "done"}
    interrupted = {r for r, s in killed.items() if s and s["state"] == "running"}
    # a run whose directory was made but whose status was not yet written when the kill came
    # is simply missing: the rerun starts it for the first time
    never_started = {r for r, s in killed.items() if s is None}
    # with the default engine a job is a batch of seeds: every seed of the killed job is
    # interrupted, the finished job's seeds are kept
    assert done_before and interrupted

    assert sweep(SMOKE, "--results", str(tmp_path), "--workers", "2") == 0
    resumed = statuses(exp_dir)
    assert sorted(resumed) == sorted(statuses(reference))  # one directory per run id
    assert {s["state"] for s in resumed.values()} == {"done"}
    for run_id, s in resumed.items():
        assert s["attempts"] == (2 if run_id in interrupted else 1), (run_id, never_started)
        if run_id in done_before:
            assert s["done_at"] == killed[run_id]["done_at"]  # not rerun
    assert not list(exp_dir.rglob("*.tmp"))
    assert_same_results(tables(exp_dir), tables(reference))


FAILING_SPEC = """\
name: failing
envs: [Hopper]
seeds: [0]
frames: 512
plugins: [tests.plugins.nan_variant, tests.plugins.kill_variant]
variants:
  - name: clip
  - name: nan-clip
  - name: sigkill-clip
train: {steps_per_iter: 256, minibatch_size: 64, epochs: 2}
eval: {every: 0, episodes: 1}
"""


def by_variant(exp_dir: Path) -> dict[str, tuple[str, dict]]:
    return {run.config()["variant"]: (run.run_id, run.status())
            for run in experiment_runs(exp_dir)}


def test_failed_and_killed_runs_are_isolated_reported_and_retried(tmp_path, capsys):
    spec = tmp_path / "failing.yaml"
    spec.write_text(FAILING_SPEC)
    exp_dir = tmp_path / "failing"

    assert sweep(str(spec), "--results", str(tmp_path), "--workers", "2") == 1
    err = capsys.readouterr().err
    first = by_variant(exp_dir)
    assert first["clip"][1]["state"] == "done"
    assert first["nan-clip"][1]["state"] == "failed"
    assert first["nan-clip"][1]["error"].startswith("DivergenceError: non-finite loss")
    assert first["sigkill-clip"][1]["state"] == "failed"
    assert "killed by SIGKILL" in first["sigkill-clip"][1]["error"]
    for variant in ("nan-clip", "sigkill-clip"):
        run_id, status = first[variant]
        assert f"failed: {run_id}  {variant}  Hopper-v5  seed 0: {status['error']}" in err

    # Without --retry-failed a re-run skips them, and still exits non-zero.
    assert sweep(str(spec), "--results", str(tmp_path)) == 1
    assert by_variant(exp_dir) == first
    assert "--retry-failed" in capsys.readouterr().err

    assert sweep(str(spec), "--results", str(tmp_path), "--retry-failed") == 1
    retried = by_variant(exp_dir)
    assert retried["clip"] == first["clip"]
    for variant in ("nan-clip", "sigkill-clip"):
        assert retried[variant][1]["state"] == "failed"
        assert retried[variant][1]["attempts"] == 2
        assert retried[variant][1]["failed_at"] > first[variant][1]["failed_at"]


@pytest.mark.usefixtures("one_ray_cluster_at_a_time")
def test_ray_backend_matches_local(reference, tmp_path):
    pytest.importorskip("ray")
    # the same command as the reference fixture, so the same seed-batched jobs (S=2)
    assert sweep(SMOKE, "--backend", "ray", "--workers", "2", "--results", str(tmp_path)) == 0
    ray_tables = tables(tmp_path / "smoke")
    assert len(ray_tables) == 4
    local = {r: t for r, t in tables(reference).items() if r in ray_tables}
    assert_same_results(ray_tables, local)
    assert {s["state"] for s in statuses(tmp_path / "smoke").values()} == {"done"}


CHECKPOINT_SPEC = """\
name: ckpt
envs: [Hopper]
seeds: 2
frames: 3072
variants: [klpen-adaptive]
train: {steps_per_iter: 256, minibatch_size: 64, epochs: 2}
eval: {every: 1024, episodes: 1}
"""


def test_sigkill_mid_job_resumes_from_its_checkpoint_with_the_same_bits(tmp_path):
    """One batched job (2 seeds x 12 iterations, a checkpoint every 2): SIGKILLed while it runs
    past a checkpoint, with output going to a file. The log shows progress lines while the job
    is still running; each run's status.json holds its progress; the rerun resumes from the
    checkpoint (losing at most one checkpoint interval), gives the bits of an uninterrupted
    sweep, and deletes the checkpoint."""
    import torch

    spec = tmp_path / "ckpt.yaml"
    spec.write_text(CHECKPOINT_SPEC)
    whole = tmp_path / "whole"
    assert sweep(str(spec), "--results", str(whole), "--workers", "1") == 0
    exp_dir = tmp_path / "killed" / "ckpt"
    log = tmp_path / "sweep.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "klppo_bench.cli", "sweep", str(spec), "--workers", "1",
             "--results", str(tmp_path / "killed"), "--checkpoint-every", "2",
             "--progress-interval", "0"],
            start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    ckpt_iteration = progress_frames = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            ckpts = list((exp_dir / "checkpoints").glob("job-*.pt"))
            running = [s for s in statuses(exp_dir).values()
                       if s and s.get("state") == "running" and s.get("progress")]
            if ckpts and running:
                try:
                    it = torch.load(ckpts[0], weights_only=False)["iteration"]
                except Exception:  # being replaced right now
                    continue
                frames = min(s["progress"]["frames"] for s in running)
                if frames > it * 256 and "progress: " in log.read_text():
                    ckpt_iteration, progress_frames = it, frames
                    break
            time.sleep(0.02)
        else:
            pytest.fail("the job never ran past a checkpoint while the sweep was alive")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    progress = [s["progress"] for s in statuses(exp_dir).values()]
    assert all(p["total_frames"] == 3072 and p["eta_seconds"] is not None for p in progress)
    assert [line for line in log.read_text().splitlines() if line.startswith("progress: ")]
    # a checkpoint of a job planned another way (other lanes) is dropped once all runs are done
    (exp_dir / "checkpoints" / "job-0123456789abcdef.pt").write_bytes(b"stale")

    assert sweep(str(spec), "--results", str(tmp_path / "killed"), "--workers", "1") == 0
    resumed = statuses(exp_dir)
    for s in resumed.values():
        assert s["state"] == "done" and s["attempts"] == 2
        assert s["resumed_from_iteration"] >= ckpt_iteration
        assert progress_frames - s["resumed_from_iteration"] * 256 <= 2 * 256
    assert_same_results(tables(exp_dir), tables(whole / "ckpt"))
    assert not list((exp_dir / "checkpoints").glob("*.pt"))

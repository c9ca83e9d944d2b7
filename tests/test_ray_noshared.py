"""Ray without a shared filesystem: remote jobs train in a scratch directory of their own node,
send their records and checkpoints back, and the driver's store writes them. The results equal
the local backend's to the bit, and a job killed midway resumes from the last checkpoint it
sent (it loses at most one checkpoint interval)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from klppo_bench import cli
from klppo_bench.backends.remote import (execute_elsewhere, sees_results, seeds_for,
                                         store_checkpoint, store_result)
from klppo_bench.backends.worker import execute_job, run_status
from klppo_bench.config import build_run_config
from klppo_bench.store import experiment_runs

from tests.conftest import TINY

TIMING = ["update_seconds", "wall_seconds", "sps"]
SPEC = """\
name: tiny
envs: [Hopper]
seeds: 2
frames: 512
variants: [clip]
train: {steps_per_iter: 256, minibatch_size: 64, epochs: 1}
eval: {every: 0, episodes: 1}
"""


def tables(exp_dir: Path) -> dict:
    return {run.run_id: {name: run.table(name).drop(columns=TIMING, errors="ignore")
                         for name in ("metrics", "episodes", "evals")}
            for run in experiment_runs(exp_dir)}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) and a
    for run_id in a:
        for name in a[run_id]:
            pd.testing.assert_frame_equal(a[run_id][name], b[run_id][name], check_exact=True)


def csv_logs(exp_dir: Path) -> dict[str, str]:
    root = exp_dir / "logs"
    return {p.relative_to(root).as_posix(): p.read_text()
            for p in sorted(root.rglob("*.csv")) if p.stem not in TIMING}


@pytest.mark.usefixtures("one_ray_cluster_at_a_time")
def test_ray_tasks_that_cannot_see_the_results_send_them_back_bit_for_bit(tmp_path):
    pytest.importorskip("ray")
    spec = tmp_path / "tiny.yaml"
    spec.write_text(SPEC)
    common = [str(spec), "--workers", "1", "--logger", "csv", "--progress-interval", "1000"]
    assert cli.main(["sweep", *common, "--results", str(tmp_path / "local")]) == 0
    # driver: the remote function is given no results path at all; it trains in a scratch
    # directory of its node and the driver's store writes what it sends back
    assert cli.main(["sweep", *common, "--results", str(tmp_path / "ray"), "--backend", "ray",
                     "--ray-storage", "driver", "--checkpoint-every", "1",
                     "--keep-checkpoints"]) == 0
    local, ray = tmp_path / "local" / "tiny", tmp_path / "ray" / "tiny"
    assert_same(tables(ray), tables(local))
    for run in experiment_runs(ray):
        status = run.status()
        assert status["state"] == "done" and status["attempts"] == 1
        twin = next(r for r in experiment_runs(local) if r.run_id == run.run_id)
        untimed = [{k: v for k, v in r.summary().items() if k not in ("wall_seconds", "sps")}
                   for r in (run, twin)]
        assert untimed[0] == untimed[1]
    assert csv_logs(ray) == csv_logs(local) and csv_logs(ray)  # the file loggers' too
    assert [p.name for p in (ray / "checkpoints").glob("job-*.pt")]  # kept: sent back
    assert not (ray / ".ray-token").exists()


def test_sees_results_only_with_the_drivers_token(tmp_path):
    (tmp_path / ".ray-token").write_text("abc")
    assert sees_results(str(tmp_path), "abc")
    assert not sees_results(str(tmp_path), "other")  # another directory at the same path
    assert not sees_results(str(tmp_path / "missing"), "abc")
    assert not sees_results(None, "abc")


def test_shared_storage_refuses_a_node_that_cannot_see_the_results(tmp_path):
    from klppo_bench.backends.ray_backend import _ray_job

    with pytest.raises(RuntimeError, match=r"--ray-storage shared: node .* cannot see or "
                                           r"write .*elsewhere; allowed: a path every node"):
        _ray_job([], str(tmp_path / "elsewhere"), "token", "shared", None, False, None)


class Killed(BaseException):
    """Stands for SIGKILL: nothing of the worker runs after it."""


def test_a_killed_remote_job_resumes_from_the_last_checkpoint_it_sent(tmp_path):
    cfgs = [build_run_config("clip", "Hopper", s, frames=4 * 256,
                             overrides={**TINY, "train.epochs": 1}) for s in (0, 1)]
    job = [{"config": c.to_dict(), "setting": "clip", "engine": "batched", "write": True,
            "checkpoint_every": 1} for c in cfgs]
    whole = tmp_path / "whole"
    execute_job(job, whole)  # uninterrupted, straight into a results directory

    driver = tmp_path / "driver"
    sent: list[int] = []  # the iteration each stored checkpoint resumes at, in arrival order
    killed_at: list[int] = []

    def send(event: dict) -> None:  # the driver's end of the queue
        if event["event"] == "checkpoint":
            store_checkpoint(driver, event)
            state = torch.load(io.BytesIO(event["data"]), weights_only=True)
            sent.append(int(state["iteration"]))
        # killed after 3 of 4 iterations. The sender thread looks for a new checkpoint every
        # 0.2 s and a loaded machine may starve it for longer, so the kill waits (training
        # thread blocked) until the checkpoint written after 2 iterations has reached the
        # driver: what the test checks is where the resume starts, not the sender's latency.
        elif event["event"] == "iteration" and event["frames"] >= 3 * 256 and not killed_at:
            deadline = time.monotonic() + 60
            while not (sent and max(sent) >= 2) and time.monotonic() < deadline:
                time.sleep(0.05)
            killed_at.append(event["frames"] // 256)
            raise Killed

    with pytest.raises(Killed):
        execute_elsewhere(job, seeds_for(job, driver), send, progress=True)
    assert killed_at == [3] and sent and max(sent) >= 2
    assert list((driver / "checkpoints").glob("job-*.pt"))  # what the kill did not take
    assert not (driver / "runs").exists()  # nothing else reached the driver

    result = execute_elsewhere(job, seeds_for(job, driver), lambda e: None, progress=False)
    store_result(driver, result, None)
    for entry in job:
        status = run_status(driver, entry)
        assert status["state"] == "done"
    for run in experiment_runs(driver):
        # resumed from the last checkpoint the driver got: at most one interval lost
        assert run.status()["resumed_from_iteration"] == sent[-1]
        assert killed_at[0] - sent[-1] <= 1
    assert_same(tables(driver), tables(whole))
    assert not list((driver / "checkpoints").glob("job-*.pt"))  # dropped once done

"""One seeded run: reproducible bits, a complete record, clear errors, failures recorded."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from torchrl.objectives import ClipPPOLoss

from klppo_bench.cli import main
from klppo_bench.config import actual_frames, build_run_config, resolve_env_id
from klppo_bench.errors import ConfigError
from klppo_bench.harness.run import execute_run
from klppo_bench.harness.reference import train
from klppo_bench.store import RunDir
from klppo_bench.variants import Variant, all_variants, get_variant, register

from tests.conftest import TINY, TINY_FRAMES

TIMING = ["update_seconds", "wall_seconds", "sps"]


def deterministic(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in TIMING if c in df.columns])


def test_env_family_resolves_to_newest_version():
    assert resolve_env_id("Hopper") == "Hopper-v5"
    assert resolve_env_id("Pendulum-v1") == "Pendulum-v1"
    with pytest.raises(ConfigError, match="Hoper"):
        resolve_env_id("Hoper")


@pytest.mark.parametrize("variant", ["klpen-adaptive-mc", "clip"])
def test_same_seed_is_bit_identical_and_other_seed_differs(variant):
    cfg = build_run_config(variant, "Hopper", 3, frames=TINY_FRAMES, overrides=TINY)
    a, b = train(cfg, progress=False), train(cfg, progress=False)
    pd.testing.assert_frame_equal(deterministic(a.metrics), deterministic(b.metrics), check_exact=True)
    pd.testing.assert_frame_equal(a.episodes, b.episodes, check_exact=True)
    pd.testing.assert_frame_equal(a.evals, b.evals, check_exact=True)
    other = train(build_run_config(variant, "Hopper", 4, frames=TINY_FRAMES, overrides=TINY),
                  progress=False)
    assert not a.episodes["return"].equals(other.episodes["return"])
    assert a.metrics["loss_objective"].iloc[-1] != other.metrics["loss_objective"].iloc[-1]


def test_metrics_cover_every_promised_column():
    cfg = build_run_config("klpen-adaptive", "Hopper", 0, frames=TINY_FRAMES, overrides=TINY)
    r = train(cfg, progress=False)
    for col in ["frames", "episode_return", "episode_length", "kl", "kl_batch", "beta",
                "loss_objective", "loss_critic", "entropy", "clip_fraction",
                "explained_variance", "sps", "eval_return"]:
        assert col in r.metrics.columns, col
    assert list(r.metrics["frames"]) == [256, 512]
    assert r.metrics["kl"].notna().all() and r.metrics["beta"].gt(0).all()
    assert r.metrics["clip_fraction"].isna().all()  # only the clip loss has one
    assert r.summary["final_score_episodes"] == min(100, len(r.episodes))
    assert r.summary["final_score"] == pytest.approx(r.episodes["return"].tail(100).mean())
    assert len(r.evals) == 1 and math.isfinite(r.summary["final_eval_return"])


def test_clip_records_clip_fraction_and_no_beta():
    cfg = build_run_config("clip", "Hopper", 0, frames=TINY_FRAMES, overrides=TINY)
    m = train(cfg, progress=False).metrics
    assert m["clip_fraction"].between(0, 1).all() and m["beta"].isna().all()


def test_run_id_is_stable_and_changes_with_any_parameter():
    base = build_run_config("klpen-adaptive", "Hopper", 0, frames=TINY_FRAMES, overrides=TINY)
    same = build_run_config("klpen-adaptive", "Hopper", 0, frames=TINY_FRAMES, overrides=TINY)
    assert base.run_id() == same.run_id() and base.run_id().startswith("klpen-adaptive-Hopperv5-s0-")
    for change in ({"dtarg": "0.03"}, {"train.epochs": "3"}, {"model.hidden": "32,32"}):
        other = build_run_config("klpen-adaptive", "Hopper", 0, frames=TINY_FRAMES,
                                 overrides={**TINY, **change})
        assert other.run_id() != base.run_id(), change


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "klppo_bench.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_cli_run_writes_a_complete_record(tmp_path):
    out = tmp_path / "exp"
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    p = _cli("run", "--variant", "klpen-adaptive", "--env", "Hopper", "--seed", "0",
             "--frames", str(TINY_FRAMES), "--out", str(out), "--set", "increment=1.5", *sets)
    assert p.returncode == 0, p.stderr
    (run_dir,) = (out / "runs").iterdir()
    assert "final score" in p.stdout and str(run_dir) in p.stdout
    assert {f.name for f in run_dir.iterdir()} == {
        "config.yaml", "status.json", "metrics.parquet", "episodes.parquet", "evals.parquet",
        "summary.json"}
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["env"] == "Hopper-v5" and cfg["loss"]["increment"] == 1.5
    assert cfg["loss"]["beta_schedule"] == "iteration" and cfg["train"]["steps_per_iter"] == 256
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done"
    prov = status["provenance"]
    assert prov["device"] == "cpu" and prov["torch_threads"] == 1
    assert prov["versions"]["torchrl"].startswith("0.14") and prov["cpu_capability"]
    assert len(prov["git"]["commit"]) in (40, 7) or prov["git"]["commit"] == "unknown"
    again = _cli("run", "--variant", "klpen-adaptive", "--env", "Hopper", "--seed", "0",
                 "--frames", str(TINY_FRAMES), "--out", str(out), "--set", "increment=1.5", *sets)
    assert again.returncode == 0 and "already done" in again.stdout
    assert json.loads((run_dir / "status.json").read_text()) == status  # untouched


@pytest.mark.parametrize("args, needle", [
    (["--variant", "klpen-adaptiv"], "unknown variant 'klpen-adaptiv'; allowed: clip, "),
    (["--env", "Hoppr"], "unknown gymnasium environment 'Hoppr'"),
    (["--set", "dtrag=0.1"], "unknown parameter 'dtrag'"),
    (["--set", "increment=0.5"], "increment='0.5' is invalid (out of range); allowed: float >= 1.0"),
    (["--set", "train.epoch=3"], "allowed: train.steps_per_iter"),
    (["--set", "model.trunk=tied"], "one of separate, shared"),
    (["--set", "train.gamma=1.5"], "train.gamma='1.5' is invalid (out of range)"),
    (["--set", "train.lr=0"], "train.lr='0' is invalid (out of range)"),
    (["--set", "dtarg"], "expected KEY=VALUE"),
    (["--device", "tpu"], "allowed: cpu, cuda"),
    (["--frames", "0"], "frames=0"),
])
def test_bad_input_is_one_line_error_and_writes_nothing(tmp_path, capsys, args, needle):
    flags = {"--variant": "klpen-adaptive", "--env": "Hopper", **dict(zip(args[::2], args[1::2]))}
    argv = ["run", "--seed", "0", "--out", str(tmp_path / "exp")]
    for flag, value in flags.items():
        argv += [flag, value]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "exp").exists()


def test_bad_input_exit_code_from_the_console_script(tmp_path):
    p = _cli("run", "--variant", "nope", "--env", "Hopper", "--out", str(tmp_path / "exp"))
    assert p.returncode == 2 and p.stderr.startswith("klppo-bench: error: --variant: unknown")
    assert not (tmp_path / "exp").exists()


class NaNLoss(ClipPPOLoss):
    """A loss that diverges on purpose."""

    def forward(self, tensordict):
        out = super().forward(tensordict)
        out.set("loss_objective", out["loss_objective"] * float("nan"))
        return out


def test_divergence_is_recorded_as_failed_with_its_reason(tmp_path):
    if "test-nan" not in all_variants():
        register(Variant(name="test-nan", loss_class=NaNLoss, description="diverges",
                         kl_estimator="none", beta_rule="none",
                         params=dict(get_variant("clip").params)))
    cfg = build_run_config("test-nan", "Hopper", 0, frames=TINY_FRAMES, overrides=TINY)
    run = execute_run(cfg, tmp_path)
    status = run.status()
    assert status["state"] == "failed"
    assert "DivergenceError" in status["error"] and "loss_objective" in status["error"]
    assert not (run.path / "metrics.parquet").exists()  # nothing half-written kept as a result


def test_restart_clears_stale_outputs(tmp_path):
    cfg = build_run_config("clip", "Hopper", 0, frames=TINY_FRAMES, overrides=TINY)
    run = RunDir(tmp_path / "runs" / cfg.run_id())
    run.start(cfg.to_dict())
    (run.path / "metrics.parquet").write_bytes(b"truncated")
    (run.path / ".metrics.parquet.abc.tmp").write_bytes(b"partial")
    run.fail("an earlier attempt's error", traceback="old", seconds=99.0)
    run.start(cfg.to_dict())  # a restart clears the stale outputs and the old attempt's fields
    assert not (run.path / "metrics.parquet").exists() and not list(run.path.glob(".*.tmp"))
    assert run.state() == "running" and "traceback" not in run.status()
    run = execute_run(cfg, tmp_path)
    assert run.state() == "done" and run.status()["attempts"] == 3
    assert run.status()["error"] is None and "traceback" not in run.status()
    assert len(run.table("metrics")) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a CPU-only torch")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        build_run_config("clip", "Hopper", 0, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("variant", ["clip", "klpen-adaptive-mc"])
def test_cuda_run_trains_networks_on_the_gpu(variant):
    cfg = build_run_config(variant, "Hopper", 0, frames=TINY_FRAMES, device="cuda", overrides=TINY)
    result = train(cfg, progress=False)
    assert cfg.device == "cuda"
    assert result.metrics["loss_objective"].notna().all() and len(result.episodes) > 0


def test_vector_envs_of_different_seeds_never_share_an_env_seed():
    from klppo_bench.harness.env import make_env

    first = {seed: make_env("Hopper-v5", seed, num_envs=2, obs_norm=False).reset()["observation"]
             for seed in (0, 1)}
    assert not torch.equal(first[0][1], first[1][0])  # seed 0's env 1 vs seed 1's env 0
    assert torch.equal(make_env("Hopper-v5", 1, obs_norm=False).reset()["observation"],
                       make_env("Hopper-v5", 1, obs_norm=False).reset()["observation"])


def test_frames_round_up_to_whole_iterations_and_both_are_recorded(tmp_path, capsys):
    cfg = build_run_config("clip", "Hopper", 0, frames=600, overrides=TINY)
    assert cfg.frames == 600 and actual_frames(cfg) == 768  # 3 iterations of 256
    assert actual_frames(build_run_config("clip", "Hopper", 0, frames=512, overrides=TINY)) == 512

    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    argv = ["run", "--variant", "clip", "--env", "Hopper", "--quiet", "--out", str(tmp_path),
            *sets]
    assert main([*argv, "--frames", "600"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "frames 600 (runs 768: whole iterations of 256)"
    summary = RunDir(tmp_path / "runs" / cfg.run_id()).summary()
    assert (summary["frames_requested"], summary["frames_actual"], summary["frames"]) == (
        600, 768, 768)

    assert main([*argv, "--frames", "512"]) == 0
    assert "whole iterations" not in capsys.readouterr().out


def test_a_reference_run_keeps_its_progress_in_its_status(tmp_path):
    cfg = build_run_config("clip", "Hopper", 0, frames=TINY_FRAMES, overrides=TINY)
    run = RunDir(tmp_path / "runs" / cfg.run_id())
    seen = []
    execute_run(cfg, tmp_path, progress=False,
                on_iteration=lambda row: seen.append(run.status()["progress"]))
    assert [p["frames"] for p in seen] == [256, 512]
    assert all(p["total_frames"] == 512 for p in seen)
    assert seen[-1]["eta_seconds"] == 0 and run.state() == "done"

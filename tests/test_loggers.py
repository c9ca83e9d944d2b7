"""Experiment loggers (``--logger``, a spec's ``loggers:``): what they write matches
``metrics.parquet``, and logging changes neither a run's results nor its run id.

Offline only: CSV and TensorBoard files are read back; MLflow uses its local SQLite store
(skipped without mlflow); W&B runs with ``WANDB_MODE=offline`` (skipped without wandb).
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from klppo_bench import cli, loggers
from klppo_bench.config import build_run_config
from klppo_bench.errors import ConfigError
from klppo_bench.loggers import LogTarget, RunLoggers, open_loggers, run_setting
from klppo_bench.spec import load_spec
from klppo_bench.store import RunDir, experiment_runs

from tests.conftest import TINY, TINY_FRAMES

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke.yaml"
TIMING = ["update_seconds", "wall_seconds", "sps"]
HAS_TB = importlib.util.find_spec("tensorboard") is not None
needs_tensorboard = pytest.mark.skipif(not HAS_TB, reason="tensorboard is not installed")


def run(out: Path, *extra: str, variant: str = "clip") -> int:
    sets = [f"--set={k}={v}" for k, v in TINY.items()]
    return cli.main(["run", "--variant", variant, "--env", "Hopper", "--frames",
                     str(TINY_FRAMES), *sets, "--quiet", "--out", str(out), *extra])


def only_run(exp_dir: Path) -> RunDir:
    (the_run,) = experiment_runs(exp_dir)
    return the_run


def logged_columns(metrics: pd.DataFrame) -> dict[str, pd.Series]:
    """Each metrics column as the loggers see it: indexed by frames, NaNs (not measured at
    that iteration) left out."""
    by_frames = metrics.set_index("frames")
    return {c: by_frames[c].dropna() for c in by_frames.columns}


def log_path(run_dir: RunDir, setting: str, kind: str, exp_dir: Path) -> Path:
    cfg = run_dir.config()
    return exp_dir / "logs" / kind / setting / cfg["env"] / f"seed{cfg['seed']}-{run_dir.run_id}"


def read_csv_logs(path: Path) -> dict[str, pd.Series]:
    out = {}
    for csv in sorted((path / "scalars").glob("*.csv")):
        table = pd.read_csv(csv, header=None, names=["frames", "value"],
                            float_precision="round_trip")  # the logger writes repr(float)
        out[csv.stem] = pd.Series(table["value"].to_numpy(), index=table["frames"].to_numpy())
    return out


def read_tensorboard(path: Path) -> dict[str, pd.Series]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: pd.Series([e.value for e in acc.Scalars(tag)],
                           index=[e.step for e in acc.Scalars(tag)])
            for tag in acc.Tags()["scalars"]}


def assert_matches(logged: dict[str, pd.Series], metrics: pd.DataFrame,
                   rel: float = 0.0) -> None:
    """Every non-NaN metrics value was logged at step = frames, and nothing else was."""
    expected = {c: s for c, s in logged_columns(metrics).items() if len(s)}
    assert sorted(logged) == sorted(expected)
    for column, series in expected.items():
        got = logged[column]
        assert list(got.index) == [int(f) for f in series.index], column
        if rel:
            np.testing.assert_allclose(got.to_numpy(), series.to_numpy(), rtol=rel,
                                       err_msg=column)
        else:
            assert got.to_numpy().tolist() == series.to_numpy().tolist(), column


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "adhoc"
    assert run(out) == 0
    return out


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Path:
    """The same run as ``plain`` with the CSV (and, where installed, TensorBoard) logger."""
    out = tmp_path_factory.mktemp("logged") / "adhoc"
    assert run(out, "--logger", "csv", *(["--logger", "tensorboard"] if HAS_TB else [])) == 0
    return out


def test_logging_changes_neither_results_nor_run_id(plain, logged):
    a, b = only_run(plain), only_run(logged)
    assert a.run_id == b.run_id
    assert a.config() == b.config()
    assert "log" not in b.config() and "logger" not in json.dumps(b.config())
    for name in ("metrics", "episodes", "evals"):
        pd.testing.assert_frame_equal(a.table(name).drop(columns=TIMING, errors="ignore"),
                                      b.table(name).drop(columns=TIMING, errors="ignore"),
                                      check_exact=True)
    assert not (plain / "logs").exists()


def test_csv_logs_every_metric_of_every_iteration(logged):
    run_dir = only_run(logged)
    path = log_path(run_dir, "clip", "csv", logged)
    assert_matches(read_csv_logs(path), run_dir.table("metrics"))  # exact: float repr
    hparams = (path / "texts" / "hparams0.txt").read_text()
    for text in (f"run_id: {run_dir.run_id}", "setting: clip", "env: Hopper-v5", "seed: 0",
                 "experiment: adhoc"):
        assert text in hparams


@needs_tensorboard
@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_tensorboard_event_files_match_metrics(engine, logged, tmp_path):
    """The issue's done-when: ``--logger tensorboard`` leaves event files whose scalars
    match ``metrics.parquet`` (float32 in the event files)."""
    out = logged
    if engine == "reference":
        out = tmp_path / "adhoc"
        assert run(out, "--logger", "tensorboard", "--engine", "reference") == 0
    run_dir = only_run(out)
    assert run_dir.status()["provenance"]["engine"] == engine
    path = log_path(run_dir, "clip", "tensorboard", out)
    assert list(path.glob("events.out.tfevents.*"))
    assert_matches(read_tensorboard(path), run_dir.table("metrics"), rel=1e-6)


def test_log_dir_option_and_setting_label(tmp_path):
    out, logs = tmp_path / "adhoc", tmp_path / "elsewhere"
    assert run(out, "--logger", "csv", "--log-dir", str(logs), "--set", "dtarg=0.03",
               variant="klpen-adaptive") == 0
    run_dir = only_run(out)
    (path,) = logs.glob("csv/*/Hopper-v5/*")
    assert path.parent.parent.name == "klpen-adaptive(dtarg=0.03)"
    assert path.name == f"seed0-{run_dir.run_id}"
    assert_matches(read_csv_logs(path), run_dir.table("metrics"))
    assert not (out / "logs").exists()


def test_sweep_streams_every_run_through_the_spec_loggers(tmp_path, capsys):
    spec = yaml.safe_load(SMOKE.read_text())
    spec["loggers"] = ["csv"]
    path = tmp_path / "smoke_logged.yaml"
    path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    assert cli.main(["sweep", str(path), "--results", str(results), "--seeds", "1",
                     "--frames", str(TINY_FRAMES), "--workers", "2"]) == 0
    exp_dir = results / "smoke"
    assert f"csv -> {exp_dir.resolve() / 'logs' / 'csv'}" in capsys.readouterr().out
    runs = experiment_runs(exp_dir)
    assert len(runs) == 2
    for run_dir in runs:
        setting = run_dir.status()["setting"]
        assert_matches(read_csv_logs(log_path(run_dir, setting, "csv", exp_dir)),
                       run_dir.table("metrics"))
    assert "loggers" not in (exp_dir / "spec.yaml").read_text()  # no part of the definition
    # --logger replaces the spec's loggers; none turns them off
    assert cli.main(["sweep", str(path), "--results", str(results), "--seeds", "1",
                     "--frames", str(TINY_FRAMES), "--logger", "none", "--dry-run"]) == 0


def test_spec_loggers_are_validated(tmp_path):
    spec = yaml.safe_load(SMOKE.read_text())
    spec["loggers"] = ["tensorbord"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"loggers.*tensorbord.*allowed: .*csv, tensorboard"):
        load_spec(path)
    spec["loggers"] = "csv"  # one name is accepted as a list of one
    path.write_text(yaml.safe_dump(spec))
    assert load_spec(path).loggers == ("csv",)


def test_missing_client_is_a_one_line_error_before_anything_is_written(tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.setattr(loggers, "_installed", lambda module: module not in ("tensorboard",
                                                                             "wandb"))
    out = tmp_path / "adhoc"
    assert run(out, "--logger", "csv", "--logger", "tensorboard") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "klppo-bench[loggers]" in err and "tensorboard" in err
    assert not out.exists()

    spec = yaml.safe_load(SMOKE.read_text())
    spec["loggers"] = ["tensorboard"]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    for extra in ([], ["--logger", "wandb"]):
        assert cli.main(["sweep", str(path), "--results", str(results), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "klppo-bench[loggers]" in err
        assert ("wandb" if extra else "loggers: tensorboard") in err
    assert not results.exists()


# ---------------------------------------------------------------- without training


def _cfg(seed: int = 0):
    return build_run_config("clip", "Hopper", seed, frames=TINY_FRAMES, overrides=TINY)


def _row(frames: int, value: float) -> dict:
    return {"iteration": frames // 256 - 1, "frames": frames, "kl": value,
            "eval_return": math.nan}


def test_a_failing_logger_warns_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    calls = []

    class Broken:
        def log_metrics(self, values, step):
            calls.append(step)
            raise OSError("disk full")

        def shutdown(self):
            pass

    def make(target, label, config, start):
        random.random(), np.random.rand(), torch.rand(3)  # a client that draws numbers
        return Broken()

    def cannot_start(*args):
        raise RuntimeError("no server\nsecond line")

    monkeypatch.setitem(loggers._FACTORIES, "csv", make)
    monkeypatch.setitem(loggers._FACTORIES, "tensorboard", cannot_start)
    cfg = _cfg()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    expected = torch.rand(2), np.random.rand(), random.random()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    with open_loggers(LogTarget(("csv", "tensorboard"), str(tmp_path), "exp"),
                      [(cfg, "clip")], tmp_path) as run_loggers:
        run_loggers.log(cfg, _row(256, 0.1))
        run_loggers.log(cfg, _row(512, 0.2))
    assert calls == [256]  # dropped after its failure
    after = torch.rand(2), np.random.rand(), random.random()
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert "tensorboard logger of run" in err[0] and "could not start" in err[0]
    assert "csv logger of run" in err[1] and "OSError: disk full" in err[1]


def test_rng_untouched_restores_every_global_stream():
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    a = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    with loggers.rng_untouched():
        torch.rand(5), np.random.rand(5), random.random()
    b = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


@pytest.mark.parametrize("kind", ["csv", pytest.param("tensorboard", marks=needs_tensorboard)])
def test_a_resumed_job_continues_its_logs_where_the_checkpoint_was(kind, tmp_path):
    """A batched job resumed from its checkpoint repeats the iterations after it: their
    first attempt's values are dropped (CSV) or purged (TensorBoard's purge_step)."""
    cfg, target = _cfg(), LogTarget((kind,), str(tmp_path), "exp")
    with open_loggers(target, [(cfg, "clip")], tmp_path) as first:  # killed after 768
        for frames in (256, 512, 768):
            first.log(cfg, _row(frames, 1.0))
    with open_loggers(target, [(cfg, "clip")], tmp_path) as resumed:  # checkpoint at 256
        for frames in (512, 768, 1024):
            resumed.log(cfg, _row(frames, 2.0))
    path = tmp_path / kind / "clip" / "Hopper-v5" / f"seed0-{cfg.run_id()}"
    kl = (read_csv_logs if kind == "csv" else read_tensorboard)(path)["kl"]
    assert kl.to_dict() == {256: 1.0, 512: 2.0, 768: 2.0, 1024: 2.0}
    with open_loggers(target, [(cfg, "clip")], tmp_path) as rerun:  # a rerun from frame 0
        rerun.log(cfg, _row(256, 3.0))
    kl = (read_csv_logs if kind == "csv" else read_tensorboard)(path)["kl"]
    assert kl.to_dict() == {256: 3.0}


def test_run_setting_labels_changed_parameters():
    assert run_setting(_cfg()) == "clip"
    cfg = build_run_config("klpen-adaptive", "Hopper", 0, frames=TINY_FRAMES,
                           overrides={**TINY, "dtarg": "0.03"})
    assert run_setting(cfg) == "klpen-adaptive(dtarg=0.03)"


# ---------------------------------------------------------------- optional clients


def test_mlflow_local_store_holds_every_run_named_and_tagged(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    results = tmp_path / "results"
    # two workers log to one SQLite store at once
    assert cli.main(["sweep", str(SMOKE), "--results", str(results), "--seeds", "1",
                     "--frames", str(TINY_FRAMES), "--workers", "2", "--logger", "mlflow"]) == 0
    exp_dir = results / "smoke"
    client = MlflowClient(loggers.mlflow_tracking_uri(str((exp_dir / "logs").resolve())))
    experiment = client.get_experiment_by_name("smoke")
    found_runs = client.search_runs([experiment.experiment_id])
    mlflow_runs = {r.data.tags["run_id"]: r for r in found_runs}
    runs = experiment_runs(exp_dir)
    assert sorted(mlflow_runs) == sorted(r.run_id for r in runs)
    for run_dir in runs:
        found, setting = mlflow_runs[run_dir.run_id], run_dir.status()["setting"]
        assert found.info.status == "FINISHED"
        assert found.info.run_name == f"{setting}/Hopper-v5/seed0-{run_dir.run_id}"
        assert {k: found.data.tags[k] for k in ("experiment", "env", "setting", "seed")} == \
            {"experiment": "smoke", "env": "Hopper-v5", "setting": setting, "seed": "0"}
        assert found.data.params["variant"] == run_dir.config()["variant"]
        logged = {}
        for key in found.data.metrics:
            history = client.get_metric_history(found.info.run_id, key)
            logged[key] = pd.Series([m.value for m in history], index=[m.step for m in history])
        assert_matches(logged, run_dir.table("metrics"))


def _wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (LevelDB log framing around protobufs)."""
    from wandb.proto import wandb_internal_pb2

    data, records, pending = path.read_bytes(), [], b""
    assert data[:4] == b":W&B"
    pos, block = 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first, middle/last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_is_grouped_by_setting_and_holds_every_metric(plain, tmp_path,
                                                                         monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_PROJECT", "WANDB_DIR", "WANDB_RUN_GROUP", "WANDB_TAGS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "adhoc"
    assert run(out, "--logger", "wandb") == 0
    run_dir = only_run(out)
    assert run_dir.run_id == only_run(plain).run_id  # W&B's client changes nothing either
    pd.testing.assert_frame_equal(run_dir.table("metrics").drop(columns=TIMING),
                                  only_run(plain).table("metrics").drop(columns=TIMING),
                                  check_exact=True)
    (path,) = (out / "logs" / "wandb" / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(path)
    (header,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert header.project == "adhoc" and header.run_group == "clip"
    assert header.display_name == f"adhoc/clip/Hopper-v5/seed0-{run_dir.run_id}"
    assert f"run_id:{run_dir.run_id}" in header.tags and "env:Hopper-v5" in header.tags
    logged: dict[str, dict[int, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in r.history.item}
            for key, value in items.items():
                if not key.startswith("_") and key != "step":
                    logged.setdefault(key, {})[int(items["step"])] = value
    assert_matches({k: pd.Series(v) for k, v in logged.items()}, run_dir.table("metrics"))
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0
    shutil.rmtree(out / "logs")

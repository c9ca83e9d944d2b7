"""Output locations: the report touches only the files its manifest says it wrote (a user's
files in the report directory are kept), every file it writes is 0644 like the store's; a
write that fails (disk full, injected ``ENOSPC`` or a real tiny tmpfs) gives one line naming
the path, leaves no temporary file, records ``disk full`` as the run's reason, and the next
sweep continues; an output location that is a file or read-only is one line, exit 2."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest

from klppo_bench.cli import main
from klppo_bench.errors import ConfigError
from klppo_bench.report.build import MANIFEST, ReportOptions, _install, build_report
from klppo_bench.store import FILE_MODE, RunDir, WriteError, atomic_write_bytes
from klppo_bench.sweep import run_state

from .test_report_store import options, seed_random_cache, store_run


def _full_disk(monkeypatch, only: str = ""):
    """Store writes (of files whose name holds ``only``) fail as on a full disk, at fsync."""
    import klppo_bench.store as store

    real = os.fsync

    def fsync(fd):
        if only and only not in os.path.basename(os.readlink(f"/proc/self/fd/{fd}")):
            return real(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(store.os, "fsync", fsync)


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- the report's own files

@pytest.fixture
def experiment(tmp_path):
    exp = tmp_path / "results" / "exp"
    for seed in range(3):
        store_run(exp, "clip", seed, 900)
        store_run(exp, "no-clip", seed, 300)
    seed_random_cache(tmp_path / "results")
    return exp


def test_the_report_keeps_the_users_files_and_writes_every_file_0644(experiment, tmp_path):
    """A paper directory as ``--out``: the user's files at the top level, in figures/ and in
    tables/ (of the extensions the report writes there) survive two builds byte for byte; a
    file the previous report wrote and this one does not is removed; the manifest lists
    exactly what the report wrote; every written file has the store's mode (0644)."""
    out = tmp_path / "paper"
    user = {"notes.md": b"my notes", "scores_by_hand.csv": b"a,b\n",
            "figures/my_plot.png": b"\x89PNG mine", "figures/diagram.pdf": b"%PDF mine",
            "tables/my_table.tex": b"\\begin{tabular}", "tables/extra.csv": b"x\n"}
    for name, data in user.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    (out / "figures" / "old_figure.png").write_bytes(b"written by an earlier report")
    (out / MANIFEST).write_text(json.dumps({"files": ["figures/old_figure.png"]}))
    for _ in range(2):
        build_report(experiment, options(out=out))
        assert {n: (out / n).read_bytes() for n in user} == user
    assert not (out / "figures" / "old_figure.png").exists()
    listed = json.loads((out / MANIFEST).read_text())["files"]
    written = {str(p.relative_to(out)) for p in out.rglob("*")
               if p.is_file() and p.name != MANIFEST} - set(user)
    assert set(listed) == written and "report.md" in written
    assert {n for n in written if n.startswith("figures/")} and not set(listed) & set(user)
    modes = {n: oct((out / n).stat().st_mode & 0o777) for n in [*written, MANIFEST]}
    assert set(modes.values()) == {oct(FILE_MODE)}, modes


def _built(tmp_path, names):
    built = tmp_path / "built"
    for name in names:
        (built / name).parent.mkdir(parents=True, exist_ok=True)
        (built / name).write_text(f"new {name}")
    return built


def test_a_users_file_with_a_name_the_report_writes_stops_it_with_nothing_changed(tmp_path):
    final = tmp_path / "paper"
    (final / "figures").mkdir(parents=True)
    (final / "figures" / "learning_curves_Hopper-v5.png").write_bytes(b"the user's own")
    before = _tree(final)
    built = _built(tmp_path, ["report.md", "figures/learning_curves_Hopper-v5.png"])
    with pytest.raises(ConfigError) as err:
        _install(built, final)
    assert "figures/learning_curves_Hopper-v5.png" in str(err.value)
    assert "\n" not in str(err.value) and "nothing was written" in str(err.value)
    assert _tree(final) == before


def test_a_report_from_before_manifests_is_replaced_and_nothing_else_deleted(tmp_path):
    """No manifest, but report.md is a report's: its files of the names this report writes
    are replaced; every other file stays, even one of an extension the report writes."""
    final = tmp_path / "report"
    (final / "figures").mkdir(parents=True)
    (final / "report.md").write_text("# Report: exp\n\nold\n")
    (final / "figures" / "a.png").write_bytes(b"old a")
    (final / "figures" / "gone.png").write_bytes(b"an old figure, or the user's")
    _install(_built(tmp_path, ["report.md", "figures/a.png"]), final)
    assert (final / "figures" / "a.png").read_text() == "new figures/a.png"
    assert (final / "figures" / "gone.png").read_bytes() == b"an old figure, or the user's"
    assert json.loads((final / MANIFEST).read_text())["files"] == ["figures/a.png", "report.md"]


def test_a_manifest_naming_files_outside_the_report_directory_touches_none(tmp_path):
    final = tmp_path / "report"
    final.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    (final / MANIFEST).write_text(json.dumps(
        {"files": ["../outside.txt", str(outside), "", 3, MANIFEST]}))
    _install(_built(tmp_path, ["report.md"]), final)
    assert outside.read_text() == "keep"
    assert json.loads((final / MANIFEST).read_text())["files"] == ["report.md"]


# ---------------------------------------------------------------- full disks

def test_a_failed_write_names_the_path_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "status.json"
    path.write_text("before")
    _full_disk(monkeypatch)
    with pytest.raises(WriteError) as err:
        atomic_write_bytes(path, b"after")
    assert str(err.value) == f"cannot write {path}: disk full (No space left on device)"
    assert err.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]
    assert path.read_text() == "before"


def test_a_run_whose_records_cannot_be_written_says_disk_full_and_is_rerun(tmp_path,
                                                                           monkeypatch):
    """``finish`` on a full disk (the tables cannot be written, the small status still can):
    no table or temporary is left, the status says ``disk full`` with ``retry``, and the sweep
    treats the run as pending (rerun without --retry-failed)."""
    import pandas as pd

    exp = tmp_path / "exp"
    run = RunDir(exp / "runs" / "r1")
    run.start({"variant": "clip", "env": "Hopper-v5", "seed": 0}, setting="clip")
    _full_disk(monkeypatch, only=".parquet")
    run.finish({"metrics": pd.DataFrame({"frames": [256]})}, {"final_score": 1.0})
    status = run.status()
    assert status["state"] == "failed" and status["retry"] is True
    assert status["error"] == (f"WriteError: cannot write {run.path / 'metrics.parquet'}: "
                               "disk full (No space left on device)")
    assert sorted(p.name for p in run.path.iterdir()) == ["config.yaml", "status.json"]
    assert run_state(exp, "r1") == "pending"
    run.fail("DivergenceError: non-finite loss")  # the run's own failure is not retried
    assert run_state(exp, "r1") == "failed"


def test_a_report_on_a_full_disk_is_one_line_exit_1_and_leaves_nothing(experiment, monkeypatch,
                                                                      capsys):
    _full_disk(monkeypatch)
    code = main(["report", str(experiment), "--reps", "50", "--random-episodes", "5"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"klppo-bench: error: cannot write {experiment}")
    assert err.endswith("disk full (No space left on device)")
    assert not list(experiment.glob(".report*")) and not (experiment / "report").exists()


# ---------------------------------------------------------------- parquet without threads

THREADS = """\
import os, sys
from pathlib import Path
import pandas as pd
import pyarrow.parquet  # noqa: F401 -- its import starts jemalloc's thread: count after it
from klppo_bench.store import atomic_write_parquet, read_parquet

def threads():
    return len(os.listdir("/proc/self/task"))

before = threads()
path = Path(sys.argv[1]) / "metrics.parquet"
df = pd.DataFrame({"frames": [256, 512], "episode_return": [1.5, float("nan")],
                   "note": ["a", None], "done": [True, False]})
atomic_write_parquet(path, df)
back = read_parquet(path)
pd.testing.assert_frame_equal(back, df)
with_store = threads()
pd.testing.assert_frame_equal(pd.read_parquet(path), df)
print(before, with_store, threads())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc/self/task")
def test_the_store_reads_and_writes_parquet_without_starting_arrows_thread_pools(tmp_path):
    """A process whose Arrow thread pools were started can abort at exit (exit 134,
    benchmarks/exit_abort.py); the store's parquet functions never start them. The same
    table read by pandas' own reader does start them (so the count would see it)."""
    out = subprocess.run([sys.executable, "-c", THREADS, str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout.split()
    before, with_store, with_pandas = map(int, out)
    assert with_store == before and with_pandas > before


def test_the_store_writes_parquet_compact_and_lossless(tmp_path):
    """Shipped runs are written as the store writes them: zstd, float columns
    byte-stream-split, no statistics; every value, column and dtype reads back the same."""
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq
    from klppo_bench.store import atomic_write_parquet, read_parquet

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"frames": np.arange(0, 2048 * 300, 2048),
                       "kl": rng.standard_normal(300) * 1e-3,
                       "lr": np.linspace(3e-4, 0, 300).astype(np.float32),
                       "edge": np.r_[np.nan, np.inf, -np.inf, -0.0, np.zeros(296)],
                       "setting": ["clip"] * 300})
    path = tmp_path / "metrics.parquet"
    atomic_write_parquet(path, df)
    back = read_parquet(path)
    pd.testing.assert_frame_equal(back, df)
    assert np.signbit(back.edge[3]) and list(back.dtypes) == list(df.dtypes)
    meta = pq.ParquetFile(path).metadata.row_group(0)
    columns = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    assert {c.compression for c in columns.values()} == {"ZSTD"}
    for name in ("kl", "lr", "edge"):
        assert "BYTE_STREAM_SPLIT" in columns[name].encodings
    assert "BYTE_STREAM_SPLIT" not in columns["frames"].encodings
    assert not any(c.is_stats_set for c in columns.values())


# ---------------------------------------------------------------- unwritable locations

@pytest.mark.parametrize("command", ["sweep", "run", "report"])
def test_a_file_as_the_output_location_is_one_line_exit_2(command, experiment, tmp_path,
                                                          capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    argv = {"sweep": ["sweep", "experiments/smoke.yaml", "--results", str(a_file)],
            "run": ["run", "--variant", "clip", "--env", "Hopper", "--out", str(a_file)],
            "report": ["report", str(experiment), "--out", str(a_file / "report")]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(a_file) in err and "is a file, not a directory" in err
    assert a_file.read_text() == "not a directory"


@pytest.fixture
def tmpfs(tmp_path):
    """A tiny tmpfs mounted for the test (root on Linux only; skipped elsewhere)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _remount(mnt, option):
    subprocess.run(["mount", "-o", f"remount,{option}", str(mnt)], check=True)


def test_a_read_only_location_is_one_line_exit_2(tmpfs, experiment, capsys):
    _remount(tmpfs, "ro")
    for argv in (["sweep", "experiments/smoke.yaml", "--results", str(tmpfs / "results")],
                 ["report", str(experiment), "--out", str(tmpfs / "report")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "read-only file system" in err
        assert str(tmpfs) in err


SPEC = """\
name: full
envs: [Hopper]
seeds: 2
frames: 768
variants: [clip]
train: {steps_per_iter: 256, epochs: 1}
eval: {every: 0, episodes: 1}
checkpoint_every: 1
"""


def _sweep(spec, results, env=None):
    proc = subprocess.run(
        [sys.executable, "-m", "klppo_bench.cli", "sweep", str(spec), "--workers", "1",
         "--results", str(results)], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def _statuses(exp):
    return [RunDir(p).status() for p in sorted((exp / "runs").iterdir())]


def test_a_sweep_on_a_tiny_tmpfs_fails_in_one_line_per_run_and_continues_once_freed(
        tmpfs, tmp_path):
    """1 MB: the job's checkpoint (MuJoCo data of 4 envs, ~3.9 MB) does not fit. The runs are
    recorded failed with ``disk full`` and ``retry``, nothing is left half written, no
    traceback. Then the disk grows to 9 MB (a save needs room for the old and the new
    checkpoint: ~7.8 MB), but a killed save left a 3 MB temporary: the rerun removes it, runs
    the two runs again (no --retry-failed) and finishes."""
    spec = tmp_path / "full.yaml"
    spec.write_text(SPEC)
    code, out = _sweep(spec, tmpfs)
    exp = tmpfs / "full"
    assert code == 1 and "Traceback" not in out, out
    assert [s["state"] for s in _statuses(exp)] == ["failed", "failed"]
    for s in _statuses(exp):
        assert s["retry"] is True and "disk full (No space left on device)" in s["error"]
        assert s["error"].startswith(f"WriteError: cannot write {exp / 'checkpoints'}/job-")
    assert [line for line in out.splitlines() if "disk full" in line]
    assert not [p for p in exp.rglob("*") if p.name.endswith(".tmp")]

    _remount(tmpfs, "size=9m")
    run_ids = sorted(p.name for p in (exp / "runs").iterdir())  # seed order: s0, s1
    from klppo_bench.harness.batched.checkpoint import job_checkpoint_path

    ckpt = job_checkpoint_path(exp, run_ids)
    leftover = ckpt.with_name(f".{ckpt.name}.99999.tmp")
    leftover.write_bytes(b"\0" * (3 << 20))
    code, out = _sweep(spec, tmpfs)
    assert code == 0, out
    assert [s["state"] for s in _statuses(exp)] == ["done", "done"]
    assert not leftover.exists() and not list(exp.rglob("*.tmp"))


SITECUSTOMIZE = """\
import errno, os
_PATTERN = os.environ.get("KLPPO_TEST_ENOSPC")
if _PATTERN:
    _fsync = os.fsync

    def fsync(fd):  # a disk that is full for the files whose name holds the pattern
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if _PATTERN in os.path.basename(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _fsync(fd)
    os.fsync = fsync
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_a_sweep_that_cannot_even_record_a_failure_stops_in_one_line_exit_1(tmp_path):
    """Injected ENOSPC on every status.json (the worker cannot record the run, nor can the
    sweep record the worker's death): one line each from the worker and the sweep, exit 1,
    no traceback, no temporary file."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    spec = tmp_path / "full.yaml"
    spec.write_text(SPEC)
    env = {"KLPPO_TEST_ENOSPC": "status.json",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "inject"),
                                          os.environ.get("PYTHONPATH", "")])}
    code, out = _sweep(spec, tmp_path / "results", env)
    assert code == 1 and "Traceback" not in out, out
    errors = [line for line in out.splitlines() if "disk full" in line]
    assert errors and all(line.startswith("klppo-bench: ") for line in errors), out
    assert errors[-1].startswith("klppo-bench: error: cannot write ")
    assert errors[-1].endswith("status.json: disk full (No space left on device)")
    assert not [p for p in (tmp_path / "results").rglob("*") if p.name.endswith(".tmp")]

"""Bad input is refused before anything runs (one line, exit 2, nothing written), damaged run
statuses are read in one line, interrupts stop commands, and a lane that fails for its own
reason does not take down the other lanes of its job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from klppo_bench import cli, commands
from klppo_bench.config import MAX_FRAMES, MAX_SEED
from klppo_bench.spec import expand, load_spec

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "experiments" / "smoke.yaml")


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


# ------------------------------------------------------------------ refused at validation

@pytest.mark.parametrize("dry_run", [True, False])
def test_a_discrete_action_env_is_refused_before_anything_runs(tmp_path, capsys, dry_run):
    results = tmp_path / "r"
    argv = ["sweep", SMOKE, "--env", "CartPole-v1", "--results", str(results)]
    assert cli.main(argv + ["--dry-run"] * dry_run) == 2
    one_line_error(capsys, "--env: CartPole-v1: its action space is Discrete(2)",
                   "allowed: envs with continuous actions")
    spec = tmp_path / "cartpole.yaml"
    spec.write_text(Path(SMOKE).read_text().replace("[Hopper]", "[CartPole]"))
    assert cli.main(["sweep", str(spec), "--results", str(results)] + ["--dry-run"] * dry_run) == 2
    one_line_error(capsys, f"{spec}: envs: CartPole-v1: its action space is Discrete(2)")
    assert not results.exists()


def test_run_refuses_a_discrete_env_and_out_of_range_seeds(tmp_path, capsys):
    out = tmp_path / "adhoc"
    assert cli.main(["run", "--variant", "clip", "--env", "CartPole-v1", "--out", str(out)]) == 2
    one_line_error(capsys, "CartPole-v1: its action space is Discrete(2)")
    assert cli.main(["run", "--variant", "clip", "--env", "Hopper", "--seed", str(2**64),
                     "--out", str(out)]) == 2
    one_line_error(capsys, f"seed={2**64} is invalid", f"<= {MAX_SEED}", "2**32 - 1")
    assert not out.exists()


def test_seeds_and_frames_are_range_checked_with_the_limit_named(tmp_path, capsys):
    results = tmp_path / "r"
    for argv, fragments in [
        (["--seeds", str(MAX_SEED + 2)], [f"--seeds={MAX_SEED + 2} is invalid",
                                          f"seeds up to {MAX_SEED}"]),
        (["--frames", str(10**26)], [f"--frames={10**26} is invalid",
                                     f"<= {MAX_FRAMES} (10**10)"]),
    ]:
        assert cli.main(["sweep", SMOKE, "--results", str(results), *argv]) == 2
        one_line_error(capsys, *fragments)
    text = Path(SMOKE).read_text()
    for bad, fragments in [
        (text.replace("seeds: 2", f"seeds: [0, {2**64}]"), [f"seeds=[0, {2**64}] is invalid",
                                                            f"seeds up to {MAX_SEED}"]),
        (text.replace("seeds: 2", f"seeds: [{2**63}]"), [f"seeds=[{2**63}]"]),
        (text.replace("frames: 1024", f"frames: {10**26}"), [f"frames={10**26}",
                                                              "(10**10)"]),
    ]:
        spec = tmp_path / "bad.yaml"
        spec.write_text(bad)
        assert cli.main(["sweep", str(spec), "--results", str(results), "--dry-run"]) == 2
        one_line_error(capsys, str(spec), *fragments)
    assert not results.exists()
    # the limits themselves are valid
    edge = tmp_path / "edge.yaml"
    edge.write_text(text.replace("seeds: 2", f"seeds: [{MAX_SEED}]"))
    assert [r.config.seed for r in expand(load_spec(edge))] == [MAX_SEED] * 2
    assert expand(load_spec(SMOKE, frames=MAX_FRAMES))[0].config.frames == MAX_FRAMES


@pytest.mark.parametrize("argv, fragment", [
    (["--progress-interval", "-1"], "--progress-interval=-1.0 is invalid"),
    (["--progress-interval", "nan"], "--progress-interval=nan is invalid"),
    (["--progress-interval", "inf"], "--progress-interval=inf is invalid"),
    (["--workers", "0"], "--workers=0 is invalid"),
    (["--checkpoint-every", "0"], "--checkpoint-every=0 is invalid"),
    (["--seeds-per-process", "0"], "--seeds-per-process=0 is invalid"),
    (["--ray-storage", "driver"], "--ray-storage applies to --backend ray only"),
])
def test_sweep_numbers_are_checked(argv, fragment, tmp_path, capsys):
    results = tmp_path / "r"
    assert cli.main(["sweep", SMOKE, "--results", str(results), "--dry-run", *argv]) == 2
    one_line_error(capsys, fragment, "allowed:")
    assert not results.exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--reps", "0"], "--reps=0 is invalid; allowed: int from 1 to 1000000"),
    (["--random-state", "-1"], "--random-state=-1 is invalid"),
    (["--random-state", str(2**32)], f"--random-state={2**32} is invalid"),
    (["--random-episodes", "0"], "--random-episodes=0 is invalid"),
    (["--random-seed", str(2**64)], f"--random-seed={2**64} is invalid"),
    (["--png-dpi", "0"], "--png-dpi=0 is invalid; allowed: int from 50 to 1200"),
])
def test_report_numbers_are_checked(argv, fragment, tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "exp"), *argv]) == 2
    one_line_error(capsys, fragment)
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("argv, line", [
    (["sweep", SMOKE, "--bogus"], "klppo-bench sweep: error: unrecognized arguments: --bogus "
                                  "(see klppo-bench sweep --help)"),
    (["sweep"], "klppo-bench sweep: error: the following arguments are required: spec "
                "(see klppo-bench sweep --help)"),
    (["report", "x", "--reps", "many"], "klppo-bench report: error: argument --reps: invalid "
                                        "int value: 'many' (see klppo-bench report --help)"),
    (["bogus"], "klppo-bench: error: argument command: invalid choice: 'bogus'"),
])
def test_command_line_errors_are_one_line_with_a_usage_hint(argv, line, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line) and "usage:" not in err


def test_a_spec_path_that_is_a_directory_or_binary_is_one_line(tmp_path, capsys):
    assert cli.main(["sweep", str(tmp_path)]) == 2
    one_line_error(capsys, f"{tmp_path}: cannot read the spec (is a directory)")
    binary = tmp_path / "spec.yaml"
    binary.write_bytes(b"\x00\xff\xfe\x89PNG")
    assert cli.main(["sweep", str(binary), "--dry-run"]) == 2
    one_line_error(capsys, f"{binary}: cannot read the spec (not UTF-8 text)")


@pytest.mark.parametrize("body, what", [("import sys\nsys.exit(0)\n", "SystemExit: 0"),
                                        ("raise KeyboardInterrupt\n", "KeyboardInterrupt")])
def test_a_plugin_that_exits_at_import_is_a_plugin_error(body, what, tmp_path, capsys,
                                                         fresh_registry):
    plugin = tmp_path / "quitter.py"
    plugin.write_text(body)
    assert cli.main(["variants", "--plugin", str(plugin)]) == 2
    one_line_error(capsys, f"--plugin {plugin}: cannot import it ({what} at {plugin}:")
    spec = tmp_path / "spec.yaml"
    spec.write_text(Path(SMOKE).read_text() + "plugins: [quitter.py]\n")
    assert cli.main(["sweep", str(spec), "--results", str(tmp_path / "r"), "--dry-run"]) == 2
    one_line_error(capsys, f"{spec}: plugins: quitter.py: cannot import it ({what}")


# ------------------------------------------------------------------ damaged status.json

DAMAGED = {"list": b"[]", "not-utf8": b"\xff\xfe{\x00", "truncated": b'{"state": "done", "se',
           "wrong-types": b'{"state": ["done"], "attempts": "x", "progress": 3}',
           "unknown-state": b'{"state": "finished"}', "directory": None}


@pytest.mark.parametrize("shape", sorted(DAMAGED))
def test_a_damaged_status_is_one_line_and_the_run_will_retrain(shape, tmp_path, capsys):
    run = expand(load_spec(SMOKE))[0]
    status = tmp_path / "smoke" / "runs" / run.run_id / "status.json"
    status.parent.mkdir(parents=True)
    if DAMAGED[shape] is None:
        status.mkdir()
    else:
        status.write_bytes(DAMAGED[shape])
    assert cli.main(["sweep", SMOKE, "--results", str(tmp_path), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert not captured.err
    lines = [line for line in captured.out.splitlines() if "unreadable" in line]
    assert lines[0].startswith(f"run {run.run_id}: {status} is unreadable (")
    assert lines[0].endswith("); will retrain")
    assert lines[1].startswith("run   unreadable  Hopper-v5") and run.run_id in lines[1]
    assert len(lines) == 2 and "4 to run" in captured.out


def test_a_sweep_retrains_a_run_whose_status_is_damaged(tmp_path, capsys, monkeypatch):
    from klppo_bench import sweep
    from klppo_bench.store import RunDir

    runs = expand(load_spec(SMOKE))
    status = tmp_path / "smoke" / "runs" / runs[0].run_id / "status.json"
    status.parent.mkdir(parents=True)
    status.write_bytes(b"\xff\xfe not json")
    for run in runs[1:]:  # the others are done
        RunDir(tmp_path / "smoke" / "runs" / run.run_id).set_status("done")
    trained = []
    monkeypatch.setattr(sweep, "_execute", lambda runs, todo, *a: trained.extend(todo))
    cli.main(["sweep", SMOKE, "--results", str(tmp_path), "--progress-interval", "1000"])
    out = capsys.readouterr().out
    assert f"run {runs[0].run_id}: {status} is unreadable (UnicodeDecodeError" in out
    assert trained == [runs[0]]
    RunDir(status.parent).start({"seed": 0})  # what training it does first: a fresh status
    assert RunDir(status.parent).status()["attempts"] == 1


# ------------------------------------------------------------------ interrupts

def test_an_interrupt_landing_in_a_finalizer_still_stops_the_command(monkeypatch, capsys):
    """Python ignores a KeyboardInterrupt raised in ``__del__`` ("Exception ignored in ...");
    the command must stop with 130 all the same."""
    finished = []

    class Finalized:
        def __del__(self):
            raise KeyboardInterrupt

    def command(args) -> int:
        Finalized()  # dropped at once: the interrupt lands in its finalizer
        for _ in range(200):
            time.sleep(0.005)
        finished.append(True)
        return 0

    monkeypatch.setattr(commands, "variants_command", command)
    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["variants"]) == 130
    err = capsys.readouterr().err
    assert err == "klppo-bench: interrupted\n" and not finished
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_an_interrupt_swallowed_by_a_library_stops_report(monkeypatch, capsys):
    """A library's bare ``except:`` can swallow Ctrl-C; report raises it again until it stops."""
    finished = []

    def command(args) -> int:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except BaseException:  # noqa: BLE001 -- what a careless library does
            pass
        for _ in range(600):  # far longer than the 1 s after which it is raised again
            time.sleep(0.005)
        finished.append(True)
        return 0

    monkeypatch.setattr(commands, "report_command", command)
    assert cli.main(["report", "x"]) == 130
    assert capsys.readouterr().err == "klppo-bench: interrupted\n" and not finished


def test_ctrl_c_stops_report_with_130(tmp_path):
    """The real thing: SIGINT to a `klppo-bench report` process while it works."""
    from tests.test_report_store import seed_random_cache, store_run

    exp = tmp_path / "results" / "exp"
    for seed in range(2):
        store_run(exp, "clip", seed, 900)
    seed_random_cache(tmp_path / "results")
    proc = subprocess.Popen(
        [sys.executable, "-m", "klppo_bench.cli", "report", str(exp), "--reps", "50",
         "--random-episodes", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(2.0)  # importing, reading or computing: it takes longer than this
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if "written:" in out:
        pytest.skip("the report finished before the interrupt")
    # 130, or killed by SIGINT: CPython itself ends that way when a KeyboardInterrupt escaped
    # one of its nested PyRun calls at any point (a shell reports 130 for both)
    assert proc.returncode in (130, -signal.SIGINT), (out, err)
    assert "Exception ignored" not in err and "Traceback" not in err
    assert err.strip().endswith("klppo-bench: interrupted")


# ------------------------------------------------------------------ one lane fails

def test_a_lane_that_fails_for_its_own_reason_does_not_take_down_its_job(tmp_path, monkeypatch):
    from klppo_bench.backends.worker import execute_job
    from klppo_bench.config import build_run_config
    from klppo_bench.harness.batched import job as batched_job
    from klppo_bench.store import RunDir

    real = batched_job.train_batched

    def train_batched(cfgs, *args, **kwargs):  # the lane of seed 1 breaks any batch it is in
        if any(c.seed == 1 for c in cfgs):
            raise ValueError("lane seed 1 cannot be trained")
        return real(cfgs, *args, **kwargs)

    monkeypatch.setattr(batched_job, "train_batched", train_batched)
    cfgs = [build_run_config("clip", "Hopper", s, frames=256, overrides={**TINY,
                                                                         "train.epochs": 1})
            for s in (0, 1, 2)]
    job = [{"config": c.to_dict(), "setting": "clip", "engine": "batched", "write": True}
           for c in cfgs]
    statuses = {s["seed"]: s for s in execute_job(job, tmp_path)}
    assert {seed: s["state"] for seed, s in statuses.items()} == {0: "done", 1: "failed",
                                                                  2: "done"}
    assert statuses[1]["error"] == "ValueError: lane seed 1 cannot be trained"
    for cfg in cfgs:
        status = RunDir(tmp_path / "runs" / cfg.run_id()).status()
        assert status["trained_alone"].startswith("its batched job failed (ValueError")
        assert status["provenance"]["batch_seeds"] == [cfg.seed]

"""Do processes that read parquet exit cleanly? Counts exit codes (not a test).

pyarrow can abort a process at exit, after its work is done: ``terminate called without an
active exception``, exit 134 (SIGABRT). This benchmark runs many short processes on a small
experiment (made here through the store, no training) and counts their exit codes:

* ``read torch+store``: ``import torch``, then :func:`klppo_bench.store.read_parquet` on two
  tables of a run, and exit (how every klppo-bench process reads records);
* ``read torch+pandas``: the same with ``pandas.read_parquet`` (how they read them before);
* ``read pandas``: only ``pandas.read_parquet`` on a run's ``metrics.parquet``, and exit;
* ``read klppo_bench``: ``kb.load_curves`` on the experiment;
* ``klppo-bench report``: the whole report of the small experiment.

Why pandas' reader aborts (a core dump's backtrace): ``pandas.read_parquet`` of a local path
reads through Arrow's dataset scanner, whose read-ahead may drop the last reference to the
file's buffers (Python objects) on an Arrow pool thread after the read returned; if that
happens while the interpreter finalizes, the thread's ``PyGILState_Ensure`` is ended by CPython
with ``pthread_exit``, whose forced unwind meets a ``noexcept`` destructor: ``std::terminate``.
Importing torch makes finalization longer, so the window wider. See
:func:`klppo_bench.files.parquet_bytes` for the reader that never starts those threads.
Run another checkout's code with ``PYTHONPATH=<checkout>`` (the reads and the report follow).

Processes run ``--jobs`` at a time (default 2: the contention of a sweep). Prints a table of
exit codes per kind, with the first lines of stderr of any process that failed, and writes it
to ``--out`` (JSON). Run it niced on a shared machine::

    nice -n 19 python benchmarks/exit_abort.py --reads 200 --reports 50
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

READ_PANDAS = """\
import sys
import pandas as pd
df = pd.read_parquet(sys.argv[1])
print(len(df))
"""

READ_TORCH_PANDAS = """\
import sys
import torch  # noqa: F401 -- imported as in every klppo-bench process
import pandas as pd
a, b = pd.read_parquet(sys.argv[1]), pd.read_parquet(sys.argv[2])
print(len(a), len(b))
"""

READ_TORCH_KLPPO = """\
import sys
import torch  # noqa: F401
from klppo_bench.store import read_parquet
a, b = read_parquet(sys.argv[1]), read_parquet(sys.argv[2])
print(len(a), len(b))
"""

READ_KLPPO = """\
import sys
import klppo_bench as kb
print(len(kb.load_curves(sys.argv[1])))
"""


def make_experiment(root: Path) -> Path:
    """Two settings x 3 seeds of synthetic Hopper-v5 runs, written through the store."""
    from klppo_bench.store import RunDir

    exp = root / "results" / "exit_abort"
    for setting, level in (("clip", 900.0), ("no-clip", 300.0)):
        for seed in range(3):
            rng = np.random.default_rng([seed, int(level)])
            frames = np.arange(1, 41) * 256
            ret = level * frames / frames[-1] + rng.normal(0, 5, len(frames))
            metrics = pd.DataFrame({"frames": frames, "episode_return": ret,
                                    "kl_batch": np.abs(rng.normal(0.01, 0.003, len(frames))),
                                    "beta": np.nan})
            episodes = pd.DataFrame({"frames": frames, "episode": np.arange(len(frames)),
                                     "return": ret, "length": 100})
            run = RunDir(exp / "runs" / f"{setting}-s{seed}")
            run.start({"variant": setting, "env": "Hopper-v5", "seed": seed,
                       "loss": {"clip_epsilon": 0.2}}, setting=setting,
                      provenance={"engine": "reference"})
            run.finish({"metrics": metrics, "episodes": episodes},
                       {"final_score": float(ret[-1]), "final_eval_return": float(ret[-1]),
                        "frames": int(frames[-1]), "sps": 100.0}, seconds=10.0 + seed)
    return exp


def run_many(name: str, argv: list[str], n: int, jobs: int) -> dict:
    """Run ``argv`` ``n`` times, ``jobs`` at a time; exit codes counted, failures kept."""
    codes: collections.Counter = collections.Counter()
    failures: list[str] = []
    start = time.perf_counter()

    def one(_):
        proc = subprocess.run(argv, capture_output=True, text=True)
        return proc.returncode, proc.stderr

    with ThreadPoolExecutor(jobs) as pool:
        for i, (code, err) in enumerate(pool.map(one, range(n)), 1):
            codes[code] += 1
            if code != 0 and len(failures) < 5:
                failures.append(" | ".join(err.strip().splitlines()[-3:]))
            if i % 25 == 0 and i < n:
                print(f"  {name}: {i}/{n}, exit codes {dict(sorted(codes.items()))}",
                      flush=True)
    out = {"kind": name, "runs": n, "exit_codes": {str(k): v for k, v in sorted(codes.items())},
           "failures": failures, "seconds": round(time.perf_counter() - start, 1)}
    print(f"{name:24} {n:5} runs  exit codes {out['exit_codes']}  ({out['seconds']} s)",
          flush=True)
    for line in failures:
        print(f"    {line}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=200, help="processes per read kind")
    parser.add_argument("--reports", type=int, default=50, help="klppo-bench report runs")
    parser.add_argument("--jobs", type=int, default=2, help="processes at a time")
    parser.add_argument("--kinds", nargs="+", default=["torch+store", "torch+pandas"],
                        choices=["torch+store", "torch+pandas", "pandas", "klppo_bench"])
    parser.add_argument("--work", default=None, help="working directory (default: a temp dir)")
    parser.add_argument("--out", default="exit_abort.json")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="exit_abort-"))
    exp = make_experiment(work)
    run_dir = exp / "runs" / "clip-s0"
    two = [run_dir / "metrics.parquet", run_dir / "episodes.parquet"]
    scripts = {"torch+pandas": (READ_TORCH_PANDAS, two),
               "torch+store": (READ_TORCH_KLPPO, two),
               "pandas": (READ_PANDAS, [run_dir / "metrics.parquet"]),
               "klppo_bench": (READ_KLPPO, [exp])}
    report = [sys.executable, "-m", "klppo_bench.cli", "report", str(exp), "--reps", "50",
              "--random-episodes", "5"]
    subprocess.run(report, check=True, capture_output=True)  # the random-score cache, once
    import pyarrow

    results = {"python": sys.version.split()[0], "pyarrow": pyarrow.__version__,
               "pandas": pd.__version__, "numpy": np.__version__, "jobs": args.jobs,
               "rows": []}
    for kind in args.kinds:
        text, files = scripts[kind]
        script = work / f"read_{kind.replace('+', '_')}.py"
        script.write_text(text)
        results["rows"].append(run_many(f"read {kind}", [sys.executable, str(script),
                                                         *map(str, files)],
                                        args.reads, args.jobs))
    if args.reports:
        results["rows"].append(run_many("klppo-bench report", report, args.reports, args.jobs))
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()

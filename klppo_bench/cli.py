"""Command line: argument parsing only. ``klppo-bench variants | run | sweep | report``."""

from __future__ import annotations

import argparse
import sys

from klppo_bench import commands
from klppo_bench.errors import ConfigError
from klppo_bench.interrupts import Interrupts


class _Parser(argparse.ArgumentParser):
    """A bad command line gets one line and where to read more, not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        # unknown options are reported by the command they were given to
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            commands = getattr(self, "commands", {})
            commands.get(getattr(ns, "command", None), self).error(
                f"unrecognized arguments: {' '.join(extras)}")
        return ns


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="batched engine: checkpoint every N iterations (default: about every "
                        "5 minutes); a rerun resumes from the last checkpoint")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep a job's checkpoint after it is done (default: deleted)")


def _logger_args(p: argparse.ArgumentParser, replaces: str = "") -> None:
    from klppo_bench.loggers import LOGGER_CHOICES

    p.add_argument("--logger", action="append", default=None, choices=LOGGER_CHOICES,
                   help="stream each iteration's metrics (step: frames) to this torchrl "
                        "logger; repeatable; tensorboard, wandb and mlflow need pip install "
                        f"'klppo-bench[loggers]'{replaces}")
    p.add_argument("--log-dir", default=None, metavar="DIR",
                   help="where the loggers write (default: <experiment dir>/logs)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="klppo-bench",
        description="Benchmark PPO loss variants (torchrl) with rliable statistics.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("variants", help="list the registered loss variants")
    p.add_argument("--params", action="store_true", help="also list each variant's parameters")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (it registers variants); repeatable")
    p.set_defaults(func=commands.variants_command)

    p = sub.add_parser("run", help="one seeded training run")
    p.add_argument("--variant", required=True, help="registry name (see `klppo-bench variants`)")
    p.add_argument("--env", required=True, help="gymnasium id or family (Hopper -> Hopper-v5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=None, help="environment steps (default 1M)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a loss parameter (dtarg=0.03) or a harness field "
                        "(train.epochs=5, model.trunk=shared, eval.every=0); repeatable")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE")
    p.add_argument("--out", default="results/adhoc",
                   help="experiment directory; the run goes to OUT/runs/<run_id>/")
    p.add_argument("--engine", default="auto", choices=("auto", "batched", "reference"),
                   help="auto (default): the batched engine where it can run the variant's "
                        "loss (faster), else torchrl's reference engine (the reason is printed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _checkpoint_args(p)
    _logger_args(p)
    p.set_defaults(func=commands.run_command)

    p = sub.add_parser("sweep", help="run every run of an experiment spec (resumable)")
    p.add_argument("spec", help="experiments/<name>.yaml")
    p.add_argument("--env", action="append", default=None,
                   help="replace the spec's environments; repeatable")
    p.add_argument("--seeds", type=int, default=None, help="replace the spec's seed count")
    p.add_argument("--frames", type=int, default=None, help="replace the spec's frames")
    p.add_argument("--backend", default="local", choices=("local", "ray"))
    p.add_argument("--workers", type=int, default=None, help="parallel runs (default: cores)")
    p.add_argument("--ray-address", default=None, help="join a Ray cluster (e.g. auto)")
    p.add_argument("--ray-storage", default=None, choices=("auto", "shared", "driver"),
                   help="where Ray tasks write their runs: auto (default): into the results "
                        "directory where their node sees it (a shared filesystem), else sent "
                        "back to this process, which writes them; shared: every node must see "
                        "it; driver: always sent back")
    p.add_argument("--results", default="results", help="results root (default results/)")
    p.add_argument("--device", default=None,
                   help="cpu | cuda | cuda:N | auto (default: the spec's device, else cpu)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE")
    p.add_argument("--engine", default="auto", choices=("auto", "batched", "reference"),
                   help="batched: lanes (seeds, and settings differing only in hyperparameter "
                        "values) train together in one process, each through its variant's own "
                        "loss module; reference: one run per process on torchrl's modules; "
                        "auto (default): batched wherever it can run the loss")
    p.add_argument("--seeds-per-process", "--lanes-per-process", type=int, default=None,
                   metavar="N", dest="seeds_per_process",
                   help="cap on the lanes one batched job trains together")
    _checkpoint_args(p)
    p.add_argument("--progress-interval", type=float, default=30.0, metavar="SECONDS",
                   help="without a terminal: a progress line every SECONDS (default 30)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and which are done")
    p.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    _logger_args(p, replaces="; replaces the spec's loggers: (none: no logger)")
    p.set_defaults(func=commands.sweep_command)

    p = sub.add_parser("report", help="rliable statistics, tables and figures")
    p.add_argument("experiment", help="results/<experiment>, or the spec that swept it "
                                      "(experiments/<name>.yaml: reports <--results>/<name:>)")
    p.add_argument("--results", default="results",
                   help="results root where a spec's experiment lives (default results/)")
    p.add_argument("--reps", type=int, default=2000, help="bootstrap repetitions")
    p.add_argument("--random-state", type=int, default=0, help="bootstrap random state")
    p.add_argument("--baseline", default="clip", help="setting for probability of improvement")
    p.add_argument("--random-episodes", type=int, default=100,
                   help="episodes of the uniform-random policy per env (cached)")
    p.add_argument("--random-seed", type=int, default=0, help="seed of the random-policy score")
    p.add_argument("--out", default=None, help="report directory (default EXPERIMENT/report)")
    p.add_argument("--png-dpi", type=int, default=300,
                   help="resolution of the PNG figures (the PDFs are vector; default 300)")
    p.add_argument("--compare-to", default=None, metavar="STORED",
                   help="pool the runs of a stored experiment directory (e.g. "
                        "results/reference/ppo_table1) whose definition matches this one's "
                        "(env id, frames, train/model/eval config, variant parameters); the "
                        "others are listed with why")
    p.add_argument("--all-definitions", action="store_true",
                   help="also report runs of earlier definitions of the experiment (another "
                        "frames, train/model/eval value or loss code than its last sweep), "
                        "each labelled with what differs, e.g. 'clip [frames=1024]'; default: "
                        "only the runs of the spec as last swept (manifest.json)")
    p.set_defaults(func=commands.report_command)
    parser.commands = sub.choices
    return parser


def main(argv: list[str] | None = None) -> int:
    with Interrupts() as interrupts:
        try:
            args = build_parser().parse_args(argv)
            # report: each Ctrl-C is raised again until it stops the command (interrupts.py)
            interrupts.persist = args.func is commands.report_command
            import torch

            # one torch thread, as in every run: planning runs small torch probes, and a
            # forked probe of a process with a started OpenMP pool would deadlock
            torch.set_num_threads(1)
            code = args.func(args)
        except ConfigError as err:
            print(f"klppo-bench: error: {err}", file=sys.stderr)
            return 2
        except OSError as err:  # a write failed while running (disk full...): path + reason
            print(f"klppo-bench: error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            interrupts.stopped()
            print("klppo-bench: interrupted", file=sys.stderr)
            return 130
    if interrupts.seen:  # an interrupt swallowed by a library's `except BaseException`
        print("klppo-bench: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())

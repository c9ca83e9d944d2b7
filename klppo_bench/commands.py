"""What each ``klppo-bench`` command does, given its parsed arguments (:mod:`klppo_bench.cli`
parses them): ``variants``, ``run``, ``sweep`` (:mod:`klppo_bench.sweep`), ``report``
(:mod:`klppo_bench.report`). Each returns the process exit code.
"""

from __future__ import annotations

import sys

from klppo_bench.errors import ConfigError


def variants_command(args) -> int:
    from klppo_bench.variants import all_variants, load_plugins, variant_rows

    load_plugins(args.plugin)
    rows = variant_rows()
    cols = ["name", "loss", "kl_estimator", "beta_rule", "description"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in cols).rstrip())
    if args.params:
        for name, v in all_variants().items():
            print(f"\n{name}:")
            for key, p in v.params.items():  # [common] or [variant]: Variant.param_origin
                print(f"  {key} = {p.default!r}  ({p.allowed()})  [{v.param_origin(key)}]  "
                      f"{p.doc}")
            for key, value in v.pinned.items():
                print(f"  {key} = {value!r}  (pinned)")
    return 0


def run_command(args) -> int:
    from pathlib import Path

    from klppo_bench.config import build_run_config, frames_note, parse_set_args
    from klppo_bench.harness.run import execute_run

    cfg = build_run_config(args.variant, args.env, args.seed, frames=args.frames,
                           device=args.device, overrides=parse_set_args(args.set),
                           plugins=tuple(args.plugin))
    from klppo_bench.spec import check_env

    check_env(cfg.env, "--env")
    if frames_note(cfg):
        print(frames_note(cfg))
    from klppo_bench.loggers import log_target, open_loggers, parse_loggers, prepare

    log = log_target(parse_loggers(args.logger, "--logger"), args.log_dir, args.out,
                     Path(args.out).resolve().name)
    from klppo_bench.harness.batched import execute_batch
    from klppo_bench.plan import choose_engine
    from klppo_bench.store import RunDir, check_output_dir

    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every={args.checkpoint_every} is invalid; "
                          "allowed: int >= 1")
    check_output_dir(args.out, "--out")
    engine, reason = choose_engine(cfg, args.engine)
    if reason:
        print(f"reference engine: {reason}")
    done = RunDir(Path(args.out) / "runs" / cfg.run_id())
    if done.state() == "done":  # the same config and seed: the record already exists
        print(f"run {done.run_id} is already done; record: {done.path} "
              "(remove that directory to train it again)")
        return 0
    progress = None if not args.quiet else False
    prepare(log)
    if log:
        print(log.describe())
    with open_loggers(log, [(cfg, None)], args.out) as loggers:
        if engine == "reference":
            hook = (lambda row: loggers.log(cfg, row)) if loggers else None
            run = execute_run(cfg, Path(args.out), progress=progress, on_iteration=hook)
        else:
            (run,) = execute_batch([cfg], Path(args.out), progress=progress,
                                   on_iteration=loggers.log if loggers else None,
                                   checkpoint_every=args.checkpoint_every,
                                   keep_checkpoints=args.keep_checkpoints)
    status = run.status()
    if status["state"] != "done":
        print(f"klppo-bench: run {run.run_id} failed: {status['error']}", file=sys.stderr)
        print(f"record: {run.path}", file=sys.stderr)
        return 1
    s = run.summary()
    print(f"run {run.run_id} done in {status['seconds']:.0f} s ({s['sps']:.0f} env-steps/s): "
          f"final score {s['final_score']:.1f} (last {s['final_score_episodes']} episodes), "
          f"final deterministic eval {s['final_eval_return']:.1f}")
    print(f"record: {run.path}")
    return 0


def sweep_command(args) -> int:
    from klppo_bench.sweep import main_sweep

    return main_sweep(args)


REPORT_LIMITS = {"reps": (1, 1_000_000), "random_state": (0, 2**32 - 1),
                 "random_episodes": (1, 100_000), "random_seed": (0, 2**32 - 1),
                 "png_dpi": (50, 1200)}
"""The ranges of ``report``'s numbers: bootstrap repetitions, numpy random states and seeds
(``2**32 - 1``: numpy's seed range), random-policy episodes, PNG resolution."""


def check_report_args(args) -> None:
    for key, (low, high) in REPORT_LIMITS.items():
        value = getattr(args, key, None)
        if value is not None and not low <= value <= high:
            raise ConfigError(f"--{key.replace('_', '-')}={value} is invalid; allowed: int from "
                              f"{low} to {high}")


def report_command(args) -> int:
    from pathlib import Path

    from klppo_bench.report import main_report

    check_report_args(args)

    target = Path(args.experiment)
    if target.suffix in (".yaml", ".yml") and target.is_file():
        # a spec: its experiment directory is <results>/<the spec's name:>, as `sweep` writes
        from klppo_bench.spec import load_spec

        args.experiment = str(Path(args.results) / load_spec(target).name)
    return main_report(args)

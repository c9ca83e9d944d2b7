"""Sweep progress: what the user sees while backends run.

On a terminal (stderr is a TTY): one tqdm bar for the sweep (frames done / total,
throughput, ETA; runs done / total and failures in its postfix) and one short bar per
running run, fed by the workers' progress events. Elsewhere (CI logs, files, ``nohup``): no
bars; one line on stdout per finished run, and every ``interval`` seconds (default 30,
``--progress-interval``) a progress line fed by the same events: frames done of the sweep's
total, env-steps/s and ETA of the whole sweep, and the latest training return of each
running setting, so a log shows a sweep advancing while its jobs run.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def _planned_frames(cfg) -> int:
    return math.ceil(cfg.frames / cfg.train.steps_per_iter) * cfg.train.steps_per_iter


class SweepProgress:
    """Consumes backend statuses (and, on a terminal, live events) for ``runs``."""

    def __init__(self, runs: list, workers: int, stream: TextIO | None = None,
                 interval: float = 30.0):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.runs = {r.run_id: r for r in runs}
        self.expected = {r.run_id: _planned_frames(r.config) for r in runs}
        self.total_frames = sum(self.expected.values())
        self.counted = dict.fromkeys(self.runs, 0)
        self.finished = self.failed = 0
        self.workers = workers
        self.bar = None
        self.run_bars: dict = {}
        self.t0 = time.time()
        self.interval = interval
        self._last_line = time.time()
        self._latest: dict[str, float] = {}  # running run -> latest training return

    def start(self, where: str) -> None:
        header = f"running {len(self.runs)} runs ({self.total_frames:,} frames) on {where}"
        if self.live:
            print(header, file=self.stream)
            self.bar = self._tqdm(total=self.total_frames, unit="frame", unit_scale=True,
                                  dynamic_ncols=True, desc="sweep", file=self.stream,
                                  smoothing=0.05, position=0)
            self._postfix()
        else:
            print(header, flush=True)

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"runs {self.finished}/{len(self.runs)}"
                                 + (f", failed {self.failed}" if self.failed else ""))

    def _count(self, run_id: str, frames: int) -> None:
        frames = min(frames, self.expected.get(run_id, 0))
        delta = frames - self.counted.get(run_id, 0)
        if delta > 0:
            self.counted[run_id] = frames
            if self.bar is not None:
                self.bar.update(delta)

    def on_event(self, event: dict) -> None:
        """A worker's live event: a run started or finished an iteration."""
        run_id = event["run_id"]
        if run_id not in self.runs:
            return
        if self.bar is None:
            self._log_event(run_id, event)
            return
        bar = self.run_bars.get(run_id)
        if bar is None:
            r = self.runs[run_id]
            bar = self.run_bars[run_id] = self._tqdm(
                total=self.expected[run_id], unit="frame", unit_scale=True, leave=False,
                dynamic_ncols=True, file=self.stream,
                desc=f"  {r.config.env.split('-')[0]} {r.setting} s{r.config.seed}")
        if event["event"] == "iteration":
            bar.update(event["frames"] - bar.n)
            ret = event.get("episode_return")
            if ret is not None and ret == ret:
                bar.set_postfix_str(f"return {ret:.0f}", refresh=False)
            self._count(run_id, event["frames"])

    def _rate_eta(self) -> tuple[float, float, float]:
        elapsed = time.time() - self.t0
        done = sum(self.counted.values())
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total_frames - done) / rate if rate > 0 else math.inf
        return elapsed, rate, eta

    def _log_event(self, run_id: str, event: dict) -> None:
        """No terminal: count the event and print a progress line every ``interval`` s."""
        if event["event"] == "iteration":
            self._count(run_id, event["frames"])
            ret = event.get("episode_return")
            if ret is not None and ret == ret:
                self._latest[run_id] = ret
        if time.time() - self._last_line < self.interval:
            return
        self._last_line = time.time()
        elapsed, rate, eta = self._rate_eta()
        done = sum(self.counted.values())
        by_setting: dict[str, list[float]] = {}
        for rid, ret in self._latest.items():
            r = self.runs[rid]
            by_setting.setdefault(f"{r.setting} {r.config.env}", []).append(ret)
        running = "; ".join(f"{k} return {sum(v) / len(v):.0f} ({len(v)} run{'s' * (len(v) > 1)})"
                            for k, v in by_setting.items())
        fmt = self._tqdm.format_interval
        print(f"progress: {done:,}/{self.total_frames:,} frames "
              f"({100 * done / max(self.total_frames, 1):.0f}%), {rate:,.0f} env-steps/s, "
              f"elapsed {fmt(elapsed)}, eta {fmt(eta) if math.isfinite(eta) else '?'}"
              + (f"; running: {running}" if running else ""), flush=True)

    def on_status(self, status: dict) -> None:
        """A run finished (done or failed)."""
        run_id = status["run_id"]
        self._count(run_id, self.expected.get(run_id, 0))  # failed runs count as spent
        self.finished += 1
        self.failed += status["state"] != "done"
        self._latest.pop(run_id, None)
        bar = self.run_bars.pop(run_id, None)
        if bar is not None:
            bar.close()
        if status["state"] == "done":
            score = status.get("final_score")
            what = f"done  final score {score:.1f}" if score is not None else "done"
        else:
            what = f"FAILED  {status.get('error')}"
        line = (f"[{self.finished}/{len(self.runs)}] {status['env']} {status['setting']} "
                f"seed {status['seed']}: {what}")
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
            self._postfix()
        else:
            elapsed, rate, eta = self._rate_eta()
            fmt = self._tqdm.format_interval
            print(f"{line}  ({rate:,.0f} frames/s, elapsed {fmt(elapsed)}, "
                  f"eta {fmt(eta) if math.isfinite(eta) else '?'})", flush=True)

    def close(self) -> None:
        for bar in self.run_bars.values():
            bar.close()
        self.run_bars.clear()
        if self.bar is not None:
            self.bar.close()

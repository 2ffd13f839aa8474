"""What `spinctl run` shows: each iteration's stages with progress, and what each iteration did.

Progress comes from the runtime's own output, tailed from the pods' log files, so the runtime
needs no terminal knowledge:
* training: its JSON metric lines (``{"event": "data" | "train" | "eval", ...}``, see
  `spin_runtime.train.loop.MetricsLog`); the step total follows from the data line's pair count,
  the global batch size and the epochs, as the trainer computes it;
* generation: shards finished out of the Job's pods, plus the shard summary lines;
* evaluation: elapsed time; its results are printed when the step succeeds.

On a terminal one status line is redrawn in place; otherwise (CI, pipes) plain lines are
printed at milestones only.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from spin_operator.api import types as api
from spin_operator.local.backend import LocalJob

BAR_WIDTH = 24
STAGE_WORD = {
    "generate": "generating", "train": "training", "evaluate": "evaluating",
    "control-train": "training SFT control", "control-evaluate": "evaluating SFT control",
}  # fmt: skip # a small table, packed
TRAINING = ("train", "control-train")


def bar(done: float, total: float, width: int = BAR_WIDTH) -> str:
    frac = 0.0 if total <= 0 else max(0.0, min(1.0, done / total))
    full = int(frac * width)
    return "[" + "#" * full + "-" * (width - full) + "]"


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


@dataclass
class Tail:
    """New complete lines of a growing log file."""

    path: Path
    offset: int = 0
    partial: str = ""

    def lines(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return []
        self.offset += len(chunk)
        text = self.partial + chunk.decode("utf-8", "replace")
        *complete, self.partial = text.split("\n")
        return complete


@dataclass
class StepProgress:
    """Progress of one running Job, parsed from its pods' logs."""

    job: LocalJob
    tails: list[Tail]
    started: float = field(default_factory=time.monotonic)
    total_steps: int = 0
    step: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    reported_tenth: int = -1
    prompts: dict[int, tuple[int, int]] = field(default_factory=dict)  # shard -> (done, total)

    def update(self, spec: api.SPINRunSpec) -> None:
        for tail in self.tails:
            for line in tail.lines():
                self._parse(line.strip(), spec)

    def _parse(self, line: str, spec: api.SPINRunSpec) -> None:
        if not line.startswith("{"):
            return
        try:
            record = json.loads(line)
        except ValueError:
            return
        if not isinstance(record, dict):
            return
        event = record.get("event")
        if event == "data" and isinstance(record.get("train_pairs"), int):
            tr = spec.training
            self.total_steps = math.ceil(record["train_pairs"] / tr.global_batch_size) * tr.epochs
        elif event == "train" and isinstance(record.get("step"), int):
            self.step = record["step"]
            self.last = record
        elif event == "eval":
            self.last = {**self.last, **record}
        elif event == "generate" and all(
            isinstance(record.get(k), int) for k in ("shard", "done", "total")
        ):
            self.prompts[record["shard"]] = (record["done"], record["total"])

    def line(self) -> str:
        plan = self.job.plan
        elapsed = time.monotonic() - self.started
        head = f"  {STAGE_WORD[plan.stage]:<10}"
        if plan.stage in TRAINING and self.total_steps:
            stats = "".join(
                f" {k} {_fmt(self.last[k])}"
                for k in ("loss", "margin", "accuracy")
                if k in self.last
            )
            return f"{head} {bar(self.step, self.total_steps)} step {self.step}/{self.total_steps}{stats} ({elapsed:.0f}s)"
        if plan.stage == "generate":
            done = sum(p.returncode == 0 for p in self.job.pods)
            shards = f"shards {done}/{len(self.job.pods)}"
            if len(self.prompts) == len(self.job.pods):  # every shard has reported its total
                made, total = (sum(v[i] for v in self.prompts.values()) for i in (0, 1))
                return (
                    f"{head} {bar(made, total)} prompts {made}/{total}, {shards} ({elapsed:.0f}s)"
                )
            return f"{head} {bar(done, len(self.job.pods))} {shards} ({elapsed:.0f}s)"
        return f"{head} ({elapsed:.0f}s)"


class Display:
    def __init__(self, spec: api.SPINRunSpec, out: TextIO | None = None, tty: bool | None = None):
        self.spec = spec
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.progress: dict[str, StepProgress] = {}
        self._drawn = False

    # ------------------------------------------------------------------ plain lines

    def say(self, text: str) -> None:
        self._clear()
        print(text, file=self.out, flush=True)

    def _clear(self) -> None:
        if self._drawn:
            self.out.write("\r\x1b[2K")
            self._drawn = False

    def header(self, run: str, prefix: str, tracking: str | None, resumed: bool) -> None:
        self.say(
            f"SPINRun {run}: {self.spec.iterations} iteration(s){' (resuming)' if resumed else ''}"
        )
        self.say(f"  artifacts  {prefix}")
        if tracking:
            self.say(f"  tracking   {tracking}")

    def dataset(self, report: Mapping[str, Any]) -> None:
        """Rows read, usable and skipped (with why and where): said at the start, and again at
        the end when rows were skipped, so a dropped share of the data is never silent."""
        rows, usable, skipped = (
            report.get("rows", 0),
            report.get("usable", 0),
            report.get("skipped", 0),
        )
        head = "  dataset   "
        if not skipped:
            self.say(f"{head} {rows} rows, all usable")
            return
        reasons = "; ".join(
            f"{reason} ×{info['count']} ({', '.join(info['first'])}{', …' if info['count'] > len(info['first']) else ''})"
            for reason, info in (report.get("skippedByReason") or {}).items()
        )
        share = f"{skipped / rows:.1%}" if rows else "?"
        self.say(f"{head} {skipped} of {rows} rows skipped ({share}; {usable} usable): {reasons}")

    def step_started(self, job: LocalJob) -> None:
        plan = job.plan
        retry = f" (retry {plan.attempt})" if plan.attempt else ""
        procs = (
            f", {plan.pods} x {plan.processes_per_pod} process(es)"
            if plan.stage in TRAINING
            else ""
        )
        shards = f", {plan.pods} shard(s)" if plan.stage == "generate" else ""
        t = plan.iteration
        self.say(
            f"iteration {t} of {self.spec.iterations} (θ{t} -> θ{t + 1}): {plan.stage}{retry}{shards}{procs}"
        )
        self.progress[job.name] = StepProgress(
            job, [Tail(p.log_path, _size(p.log_path)) for p in job.pods]
        )

    def step_done(self, name: str, ok: bool, detail: str = "") -> None:
        """A step's end. A failure's cause is said once, by whoever says what happens next (the
        retry line, or the run's final line), so here a failure without `detail` is one word."""
        progress = self.progress.pop(name, None)
        if progress is not None:
            line = progress.line()
            if ok:
                self.say(line.replace(STAGE_WORD[progress.job.plan.stage], "done", 1))
            else:
                self.say(
                    line.replace(STAGE_WORD[progress.job.plan.stage], "failed", 1)
                    + (f": {detail}" if detail else "")
                )
        elif detail:
            self.say(f"  {detail}")

    def tick(self) -> None:
        """Refresh progress from the logs (call a few times a second)."""
        for progress in self.progress.values():
            progress.update(self.spec)
        if not self.progress:
            return
        current = list(self.progress.values())[-1]
        if self.tty:
            self.out.write("\r\x1b[2K" + current.line()[: _width()])
            self.out.flush()
            self._drawn = True
        elif current.total_steps:
            tenth = int(10 * current.step / current.total_steps)
            if tenth > current.reported_tenth and current.step:
                current.reported_tenth = tenth
                self.say(current.line())

    # ------------------------------------------------------------------ results

    def iteration_results(
        self, t: int, results: Mapping[str, Any], spin: Mapping[str, Any]
    ) -> None:
        """Held-out evaluation of θt+1 (and θ0 at t = 0) plus the trainer's held-out SPIN
        metrics: what the iteration did, not only that it ran."""
        metrics = results.get("metrics") or {}
        baseline = results.get("baseline") or {}
        prompts = metrics.get("num_examples", spin.get("eval_pairs", "?"))
        self.say(f"  held-out results of θ{t + 1} ({prompts} prompts):")
        for key, label in (
            ("exact_match", "exact match"),
            ("real_logp_per_token", "real answers log-lik/token"),
        ):
            if key in metrics:
                before = f"  (θ0: {_fmt(baseline[key])})" if key in baseline else ""
                self.say(f"    {label:<28} {_fmt(metrics[key])}{before}")
        if "eval_margin" in spin:
            self.say(
                f"    {'SPIN margin (held-out)':<28} {_fmt(spin['eval_margin'])}"
                f"  accuracy {_fmt(spin.get('eval_accuracy', float('nan')))}"
                f"  loss {_fmt(spin.get('eval_loss', float('nan')))}"
            )

    def summary(self, rows: Sequence[tuple[str, Mapping[str, float]]]) -> None:
        """One table over iterations: θ0 and each θt+1."""
        if not rows:
            return
        self.say("")
        self.say(
            f"  {'model':<10} {'exact match':>12} {'real log-lik/tok':>17} {'SPIN margin':>12}"
        )
        for name, m in rows:
            cells = [
                _fmt(m[k]) if k in m else "-"
                for k in ("exact_match", "real_logp_per_token", "eval_margin")
            ]
            self.say(f"  {name:<10} {cells[0]:>12} {cells[1]:>17} {cells[2]:>12}")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _width() -> int:
    import shutil

    return max(40, shutil.get_terminal_size((100, 20)).columns - 1)

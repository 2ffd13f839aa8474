"""`spinctl status FILE`: where a local run (`spinctl run FILE`) stands, from another terminal.

Reads what the runner saves after every pass (`R/.local-status.json`, see state.py) — the same
status a SPINRun shows on a cluster — so it works while the run goes on, after it stopped, and
for a run whose storage is on S3. It starts and changes nothing.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from spin_operator.api import types as api
from spin_operator.local.preflight import BadInput, load
from spin_operator.local.state import STATE_NAME, LocalState

EXIT_OK, EXIT_NOT_STARTED, EXIT_BAD_INPUT = 0, 1, 2
STEPS = ("generate", "train", "evaluate")
SHOWN_METRICS = ("score", "exact_match", "real_logp_per_token")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="the YAML file given to `spinctl run`")
    parser.add_argument("--storage-uri", help="as given to `spinctl run` (default ./spin-runs)")
    parser.add_argument(
        "-o", "--output", choices=("text", "json"), default="text", help="json: the status object"
    )


def read_state(spec: api.SPINRunSpec, prefix: str) -> LocalState | None:
    """The saved state of the run at `prefix`, or None when it never started."""
    from spin_common import storage
    from spin_operator.endpoints import at_endpoint

    uri = prefix.rstrip("/") + "/" + STATE_NAME
    with at_endpoint(spec):
        try:
            return LocalState.from_json(storage.read_text(uri))
        except FileNotFoundError:
            return None


def describe(status: api.SPINRunStatus, total: int) -> list[str]:
    """The status as lines of text: summary, conditions that hold, one row per iteration."""
    t = status.iteration
    lines = [f"phase: {status.phase}" + (f" — {status.message}" if status.message else "")]
    lines.append(
        f"iteration {t} of {total} (θ{t} → θ{t + 1}), stage {status.stage or '-'}; "
        f"done {status.progress or f'0/{total}'}; best model {status.best_model or '-'}"
    )
    held = [c for c in status.conditions if c.status == "True"]
    if held:
        lines.append("conditions: " + "; ".join(f"{c.type} ({c.reason})" for c in held))
    if status.iterations:
        lines.append("")
        header = ["ITER", "MODELS", "STAGE", *(s.upper() for s in STEPS), *SHOWN_METRICS]
        rows: list[list[str]] = [header]
        for it in status.iterations:
            steps = [
                f"{getattr(it, s).phase}"
                + (f"×{getattr(it, s).attempts}" if getattr(it, s).attempts > 1 else "")
                for s in STEPS
            ]
            metrics = [f"{it.metrics[m]:.4g}" if m in it.metrics else "-" for m in SHOWN_METRICS]
            rows.append(
                [
                    str(it.iteration),
                    f"θ{it.iteration}→θ{it.iteration + 1}",
                    it.stage,
                    *steps,
                    *metrics,
                ]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
    compared = [
        it for it in status.iterations if it.control and it.control.spin_advantage is not None
    ]
    if compared:  # spec.controlArm: did SPIN beat the equal-compute SFT control?
        lines += ["", f"SPIN vs equal-compute SFT control ({compared[0].control.metric}):"]  # type: ignore[union-attr]
        for it in compared:
            c = it.control
            assert c is not None and c.spin_advantage is not None
            lines.append(
                f"  θ{it.iteration + 1} {c.spin_score:.4g}  control {c.control_score:.4g}  "
                f"SPIN {'ahead' if c.spin_advantage > 0 else 'behind' if c.spin_advantage < 0 else 'level'} "
                f"({c.spin_advantage:+.4g})"
            )
    failing = [
        f"  {it.iteration}/{s}: {getattr(it, s).message}"
        for it in status.iterations
        for s in STEPS
        if getattr(it, s).message
    ]
    if failing:
        lines += ["", "last failure messages:", *failing]
    return lines


def run(args: argparse.Namespace) -> int:
    import json

    from spin_operator.steps import layout_of

    try:
        loaded = load(args.file, args.storage_uri, "")
    except BadInput as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    prefix = layout_of(loaded.spec, loaded.run).prefix
    try:
        state = read_state(loaded.spec, prefix)
    except Exception as exc:  # storage unreachable
        print(f"error: cannot read {prefix}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if state is None:
        print(
            f"{loaded.run.namespace}/{loaded.run.name}: not started (no {STATE_NAME} under {prefix})"
        )
        return EXIT_NOT_STARTED
    if args.output == "json":
        doc: dict[str, Any] = {
            "name": loaded.run.name,
            "namespace": loaded.run.namespace,
            "status": state.status.to_wire(),
        }
        print(json.dumps(doc, indent=1, ensure_ascii=False))
        return EXIT_OK
    print(f"{loaded.run.namespace}/{loaded.run.name} ({prefix})")
    for line in describe(state.status, loaded.spec.iterations):
        print(line)
    return EXIT_OK

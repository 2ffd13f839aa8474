#!/usr/bin/env python3
"""Regenerate docs/img/mlflow-compare.png: MLflow's run-comparison page for SPIN iterations.

By default it starts a throwaway moto S3 server and MLflow server on 127.0.0.1, logs a
*simulated* three-iteration SPINRun through ``spin_common.tracking`` (synthetic metric values,
only to show the page layout; not a result), and screenshots the comparison of the iteration
runs with headless Debian chromium. With ``--tracking-uri`` and ``--parent-run`` it screenshots
a real run's iterations instead and logs nothing.

    .venv/bin/python scripts/mlflow_screenshot.py [--out docs/img/mlflow-compare.png]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import urllib.parse
import uuid
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]


def simulate(tracking_uri: str) -> tuple[str, str]:
    """Log a simulated 3-iteration SPINRun; returns (experiment id, parent run id)."""
    from mlflow.tracking import MlflowClient

    from spin_common.layout import RunLayout
    from spin_common.tracking import RunLogger, Tracker, TrackingPolicy

    policy = TrackingPolicy(attempts=2, base_delay=0.1, flush_interval=0)
    tracker = Tracker(tracking_uri, policy=policy)
    run = RunLayout.for_run("s3://spin-artifacts/runs", "team-a", "zephyr-spin")
    spec = {
        "iterations": 3,
        "model": {"uri": "s3://models/zephyr-sft"},
        "dataset": {
            "uri": "s3://datasets/ultrachat_200k/data/train_sft-*",
            "maxSamples": 50000,
            "evalSamples": 256,
        },
        "generation": {"backend": "vllm", "temperature": 1.0, "maxNewTokens": 256, "replicas": 8},
        "training": {
            "beta": 0.1,
            "learningRate": 5e-7,
            "epochs": 2,
            "globalBatchSize": 64,
            "optimizer": "rmsprop",
        },
        "evaluation": {"metric": "auto", "mode": "max"},
    }
    parent = tracker.ensure_parent_run(
        "spin-demo", "team-a", "zephyr-spin", str(uuid.uuid4()), spec
    )
    assert parent is not None, "MLflow is not reachable"
    tracker.log_dataset(parent, "sft", "s3://datasets/ultrachat-50k.jsonl", "0" * 64, context="sft")
    for t in range(3):
        it_run = tracker.ensure_iteration_run(
            parent,
            t,
            {
                "beta": 0.1,
                "learning_rate": 5e-7 if t < 2 else 1e-7,
                "temperature": 1.0,
                "top_p": 1.0,
                "max_new_tokens": 256,
                "input_model": f"θ{t}",
                "output_model": f"θ{t + 1}",
                "model_uri": run.model_for_iteration(t, "s3://models/zephyr-sft"),
                "data_uris": run.training_data_for_iteration(t, 1),
                "checkpoint_uri": run.iteration(t).model,
            },
        )
        assert it_run is not None
        with RunLogger(it_run, tracking_uri, policy=policy) as logger:
            for step in range(1, 41):  # synthetic curves: loss from ln 2 down, slower each time
                decay = math.exp(-step / (12 + 8 * t))
                loss = math.log(2) * (0.35 + 0.65 * decay)
                logger.log_metrics(
                    {"loss": loss, "accuracy": 1 - 0.5 * decay, "margin": 2.5 * (1 - decay)},
                    step,
                )
            logger.log_metrics({"generate/tokens_per_s": 7900.0 - 150 * t}, 0)
        tracker.log_dataset(
            it_run, f"iter-{t:03d}/generated", run.iteration(t).generated, f"{t:064x}"
        )
        logp = [-1.21, -1.12, -1.08][t]
        tracker.log_metrics(
            it_run, {"eval/exact_match": 0.0, "eval/real_logp_per_token": logp, "eval/score": logp}
        )
        MlflowClient(tracking_uri).log_table(
            it_run,
            {
                "prompt": [
                    "Name three prime numbers.",
                    "Summarize the water cycle in one sentence.",
                ],
                "reference": [
                    "2, 3 and 5.",
                    "Water evaporates, condenses into clouds and falls as precipitation.",
                ],
                "answer": [f"(simulated answer of θ{t + 1})", f"(simulated answer of θ{t + 1})"],
            },
            "eval_samples.json",
        )
        tracker.register_iteration_model(
            "zephyr-spin", it_run, t, run.iteration(t).model, {"score": logp}, "score"
        )
        tracker.finish_run(it_run)
    tracker.finish_run(parent)
    exp = MlflowClient(tracking_uri).get_experiment_by_name("spin-demo")
    assert exp is not None
    return str(exp.experiment_id), parent


def compare_url(tracking_uri: str, parent: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp_id = client.get_run(parent).info.experiment_id
    runs = client.search_runs(
        [exp_id], f"tags.`mlflow.parentRunId` = '{parent}'", order_by=["attributes.run_name ASC"]
    )
    ids = json.dumps([r.info.run_id for r in runs])
    query = urllib.parse.urlencode({"runs": ids, "experiments": json.dumps([exp_id])})
    return f"{tracking_uri.rstrip('/')}/#/compare-runs?{query}"


def view_urls(tracking_uri: str, parent: str) -> dict[str, str]:
    """The pages the docs show: the iterations compared, the experiment's runs table (opened as
    model training, not GenAI), the parent run's overview (description, params), and the first
    iteration's sample generations table."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp_id = client.get_run(parent).info.experiment_id
    first = client.search_runs(
        [exp_id], f"tags.`mlflow.parentRunId` = '{parent}'", order_by=["attributes.run_name ASC"]
    )[0]
    base = f"{tracking_uri.rstrip('/')}/#/experiments/{exp_id}"
    ml = "workflowType=machine_learning"  # what status.mlflow.url carries (GenAI mode otherwise)
    return {
        "compare": compare_url(tracking_uri, parent) + f"&{ml}",
        "experiment": f"{base}/runs?{ml}",
        "parent-run": f"{base}/runs/{parent}?{ml}",
        "samples": f"{base}/runs/{first.info.run_id}/artifacts/eval_samples.json?{ml}",
    }


def screenshot(url: str, out: Path, chromium: str, budget_ms: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        argv = [
            chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", f"--user-data-dir={profile}", "--window-size=1400,900",
            "--hide-scrollbars", f"--virtual-time-budget={budget_ms}",
            f"--screenshot={out}", url,
        ]  # fmt: skip # argv: a flag beside its value
        subprocess.run(argv, check=True, timeout=180, capture_output=True)
    if not out.is_file() or out.stat().st_size < 10_000:
        raise SystemExit(f"chromium did not write a plausible screenshot to {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "mlflow-compare.png")
    parser.add_argument("--tracking-uri", help="an existing MLflow server (else start one)")
    parser.add_argument("--parent-run", help="with --tracking-uri: the SPINRun's parent run id")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--budget-ms", type=int, default=20000, help="virtual time for the UI")
    parser.add_argument(
        "--all-views",
        action="store_true",
        help="also the experiment, parent run and samples pages (mlflow-<view>.png beside --out)",
    )
    args = parser.parse_args()
    if bool(args.tracking_uri) != bool(args.parent_run):
        parser.error("--tracking-uri and --parent-run go together")

    with ExitStack() as stack:
        uri, parent = args.tracking_uri, args.parent_run
        if not uri:
            uri, parent = start_and_simulate(stack)
        if args.all_views:
            for view, url in view_urls(uri, parent).items():
                out = args.out.parent / f"mlflow-{view}.png"
                print(f"screenshot of {url}", file=sys.stderr)
                screenshot(url, out, args.chromium, args.budget_ms)
                print(out)
            return 0
        url = compare_url(uri, parent)
        print(f"screenshot of {url}", file=sys.stderr)
        screenshot(url, args.out, args.chromium, args.budget_ms)
    print(args.out)
    return 0


def start_and_simulate(stack: ExitStack) -> tuple[str, str]:
    import os

    import boto3

    from tests.support.servers import MlflowServer, _stop_group, free_port

    port = free_port()
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    stack.callback(_stop_group, moto)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="screenshot",
        AWS_SECRET_ACCESS_KEY="screenshot",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL_S3=endpoint,
    )
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for _ in range(100):
        try:
            s3.create_bucket(Bucket="mlflow-artifacts")
            break
        except Exception:
            import time

            time.sleep(0.1)
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlflow-shot-")))
    server = MlflowServer(workdir, endpoint)
    server.start()
    stack.callback(server.stop)
    _, parent = simulate(server.uri)
    return server.uri, parent


if __name__ == "__main__":
    raise SystemExit(main())

"""Operator scale benchmark: N SPINRuns through the real operator against the emulated API server.

Why: the operator's cost is latency between steps and API requests per SPIN iteration, and both
grow with the number of runs it serves at once. Here nothing trains: Jobs complete as soon as
they are created (`JobDriver.auto`, which first writes the manifests the runtime would write into
a local-path storage), so what is measured is the operator alone.

    python benchmarks/operator_scale.py --runs 100
    python benchmarks/operator_scale.py --cluster real --runs 100   # the real control plane
    python benchmarks/operator_scale.py --cluster both --runs 100   # both, in one JSON line

`--cluster real` (benchmarks/operator_scale_real.py) runs the same SPINRuns through the chart's
operator on tests/cluster's kube-apiserver, Job controller and scheduler, with stand-in pods that
finish at once; there requests and latencies come from the API server's audit log.

Prints one JSON line:
  runs, p50_s / p99_s   latency from a Job's completion (its final status written) to the creation
                        of the run's next Job, over all such transitions;
  requests_per_iteration       resource requests the operator (User-Agent kopf* or spin-operator*)
                               made from the first run's creation until every run finished, per
                               SPIN iteration (startup discovery excluded);
  min_requests_per_iteration   the least an operator could do (docs/benchmarks.md, "Operator");
  rss_mb                       peak RSS of the operator process (VmHWM);
and, to tell where requests and time go: requests_by_kind (per iteration), wall_s, runs_succeeded.
`requests_over_min` is their ratio. Targets at N=100: p50_s <= 1, p99_s <= 3,
requests_per_iteration <= 2 * min; on the real control plane at N=1000 (issue 13): p99_s <= 2,
requests_over_min <= 1.5, unfiltered_job_reads == 0 (the operator watches only its own Jobs).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import os
import pathlib
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import step_artifacts  # noqa: E402
from tests.support.job_driver import Failure, JobDriver  # noqa: E402
from tests.support.k8s_emulator import K8sApi, running_api  # noqa: E402

OPERATOR_AGENTS = ("kopf", "spin-operator")
STEPS_PER_ITERATION = 3  # generate, train, evaluate (evaluation on)
RUN_LABEL = step_artifacts.RUN_LABEL


CHECK_REQUESTS = 3  # the run's check Job: 1 create, 1 status patch, 1 event


def min_requests_per_iteration(iterations_per_run: int) -> float:
    """The least an operator could do per iteration (derived in docs/benchmarks.md, "Operator"):
    per step 1 Job create + 1 status patch + 1 event, 1 training Service create; plus per run one
    final status patch (Succeeded) and the check Job before iteration 0 (create + status patch +
    event), shared by its iterations."""
    return STEPS_PER_ITERATION * 3 + 1 + (1 + CHECK_REQUESTS) / iterations_per_run


def spinrun(name: str, iterations: int) -> dict[str, Any]:
    return {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SPINRun",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "model": {"uri": "s3://models/tiny"},
            "dataset": {"uri": "s3://data/sft.jsonl", "maxSamples": 64, "evalSamples": 8},
            "iterations": iterations,
            "generation": {"replicas": 2},
            "evaluation": {"enabled": True},
        },
    }


class ArtifactWriter:
    """What a Job's pods leave behind before the Job completes: its artifacts, manifests last."""

    def __init__(self, storage: pathlib.Path) -> None:
        self.storage = storage
        self.scratch = storage.parent / "scratch"

    def __call__(self, job: dict[str, Any]) -> Failure | None:
        step_artifacts.write_job(str(self.storage), self.scratch, job)
        return None


@contextlib.contextmanager
def operator_process(
    api: K8sApi,
    workdir: pathlib.Path,
    storage: pathlib.Path,
    metrics_port: int = 0,
    profile: pathlib.Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """`spinctl operator` as the chart's Deployment runs it (settings from the environment);
    under cProfile when `profile` is given (pstats file, written when the operator exits)."""
    spinctl = pathlib.Path(sys.executable).with_name("spinctl")
    argv = [str(spinctl), "operator"]
    if profile is not None:
        argv = [sys.executable, "-m", "cProfile", "-o", str(profile), *argv]
    env = {
        **os.environ,
        "KUBECONFIG": str(api.kubeconfig_path),
        "SPIN_STORAGE_URI": str(storage),
        "SPIN_RUNTIME_IMAGE": "registry.example.com/spin-runtime:bench",
        "SPIN_LOG_LEVEL": "INFO",
        "SPIN_HEALTH_PORT": "0",
        "SPIN_METRICS_PORT": str(metrics_port),
    }
    with (workdir / "operator.log").open("wb") as log:
        proc = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def peak_rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reconcile_passes(port: int) -> tuple[float, float]:
    """(passes, seconds) from the operator's reconcile histogram; NaN when it cannot be read."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
            text = rsp.read().decode()
    except OSError:
        return float("nan"), float("nan")
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("spin_operator_reconcile_duration_seconds_")
    }
    return (
        values.get("spin_operator_reconcile_duration_seconds_count", float("nan")),
        values.get("spin_operator_reconcile_duration_seconds_sum", float("nan")),
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU the process has used (to tell the operator's cost from the harness's)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 1)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def latencies(api: K8sApi, finished_at: dict[str, float]) -> list[float]:
    """Per run: each Job's completion to the next Job the operator created for that run."""
    created: dict[str, list[tuple[float, str]]] = {}
    for e in api.requests.entries():
        if (
            e.verb == "create"
            and e.resource == "jobs"
            and e.code == 201
            and e.name
            and e.user_agent.startswith(OPERATOR_AGENTS)
        ):
            job = api.get("jobs", e.name, e.namespace)
            run = job["metadata"]["labels"][RUN_LABEL] if job else e.name.rsplit("-i", 1)[0]
            created.setdefault(f"{e.namespace}/{run}", []).append((e.time, e.name))
    out = []
    for run, jobs in created.items():
        jobs.sort()
        ns = run.split("/")[0]
        for (_, name), (next_time, _) in itertools.pairwise(jobs):
            done = finished_at.get(f"{ns}/{name}")
            if done is not None:
                out.append(max(0.0, next_time - done))
    return out


def run_benchmark(
    runs: int, iterations: int, timeout: float, profile: pathlib.Path | None = None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="spin-bench-") as tmp:
        workdir = pathlib.Path(tmp)
        storage = workdir / "artifacts"
        storage.mkdir()
        port = free_port()
        load_before = os.getloadavg()[0]
        with (
            running_api(workdir) as api,
            operator_process(api, workdir, storage, port, profile) as proc,
        ):
            api.wait_for(
                lambda: (
                    proc.poll() is not None
                    or api.requests.count(user_agent="kopf", verb="watch", resource="spinruns") > 0
                ),
                timeout=60,
            )
            if proc.poll() is not None:
                raise SystemExit(
                    f"the operator exited ({proc.returncode}):\n"
                    + (workdir / "operator.log").read_text()[-4000:]
                )
            time.sleep(0.5)  # let startup settle; its discovery is not per-iteration cost
            api.reset_requests()
            driver = JobDriver(api.url)
            with driver.auto(delay=0.0, on_complete=ArtifactWriter(storage)) as auto:
                start = time.time()
                for i in range(runs):
                    api.create(spinrun(f"bench-{i:04d}", iterations))

                def finished() -> list[dict[str, Any]] | None:
                    items = api.list("spinruns", "default")
                    done = [
                        o
                        for o in items
                        if (o.get("status") or {}).get("phase") in ("Succeeded", "Failed")
                    ]
                    return items if len(done) == runs else None

                final: list[dict[str, Any]]
                try:
                    final = api.wait_for(finished, timeout=timeout, interval=0.2)
                except TimeoutError:
                    final = api.list("spinruns", "default")
                wall = time.time() - start
                rss = peak_rss_mb(proc.pid)
                cpu = cpu_seconds(proc.pid)
                passes, pass_seconds = reconcile_passes(port)
            if auto.errors:
                raise SystemExit("job driver errors:\n" + "\n".join(auto.errors[:3]))
            lat = latencies(api, auto.finished_at)
            # dry runs too (each run's start checks its iteration-0 objects): they load the server
            ops = [
                e
                for e in api.requests.entries(dry_runs=True)
                if e.user_agent.startswith(OPERATOR_AGENTS)
            ]
            total_iterations = runs * iterations
            by_kind: dict[str, int] = {}
            for e in ops:
                key = f"{e.verb} {e.rbac_resource}" + (" (dry run)" if e.dry_run else "")
                by_kind[key] = by_kind.get(key, 0) + 1
            phases = [(o.get("status") or {}).get("phase") for o in final]
            return {
                "runs": runs,
                "p50_s": round(statistics.median(lat), 4) if lat else None,
                "p99_s": round(percentile(lat, 0.99), 4) if lat else None,
                "requests_per_iteration": round(len(ops) / total_iterations, 2),
                "min_requests_per_iteration": round(min_requests_per_iteration(iterations), 2),
                "rss_mb": round(rss, 1),
                "iterations_per_run": iterations,
                "runs_succeeded": phases.count("Succeeded"),
                "transitions": len(lat),
                "wall_s": round(wall, 2),
                "requests_by_kind": {
                    k: round(v / total_iterations, 2) for k, v in sorted(by_kind.items())
                },
                "errors": dict(
                    sorted(
                        collections.Counter(
                            f"{e.code} {e.verb} {e.rbac_resource}" for e in ops if e.code >= 400
                        ).items()
                    )
                ),
                "operator_cpu_s": cpu,
                "operator_cpu_ms_per_iteration": round(1000 * cpu / total_iterations, 1),
                "reconcile_passes_per_iteration": round(passes / total_iterations, 2),
                "reconcile_pass_mean_ms": round(1000 * pass_seconds / passes, 1)
                if passes
                else None,
                "load_avg_1m": [round(load_before, 1), round(os.getloadavg()[0], 1)],
                "cpus": os.cpu_count(),
                "harness_cpu_s": round(time.process_time(), 1),
            }


def with_ratios(result: dict[str, Any]) -> dict[str, Any]:
    """`requests_over_min`: requests per iteration over the floor (the target is a ratio)."""
    if result.get("requests_per_iteration") and result.get("min_requests_per_iteration"):
        ratio = result["requests_per_iteration"] / result["min_requests_per_iteration"]
        result["requests_over_min"] = round(ratio, 3)
    return result


def side_by_side(emulated: dict[str, Any], real: dict[str, Any]) -> dict[str, Any]:
    """Both modes in one line, and real over emulated for what compares (same runs, same machine
    minutes apart: ratios, since absolute times move with the machine's load)."""
    ratios = {}
    for key in (
        "p50_s",
        "p99_s",
        "requests_per_iteration",
        "rss_mb",
        "operator_cpu_ms_per_iteration",
    ):
        if emulated.get(key) and real.get(key) is not None:
            ratios[key] = round(real[key] / emulated[key], 3)
    return {"emulated": emulated, "real": real, "real_over_emulated": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=2, help="SPIN iterations per run")
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds for all runs to finish"
    )
    parser.add_argument(
        "--cluster",
        choices=("emulated", "real", "both"),
        default="emulated",
        help="the emulated API server (in this process), the real control plane of tests/cluster "
        "(benchmarks/operator_scale_real.py), or both one after the other in one line",
    )
    parser.add_argument(
        "--profile",
        type=pathlib.Path,
        default=None,
        help="run the operator under cProfile and write pstats here (slower: not for the targets;"
        " emulated mode only)",
    )
    parser.add_argument(
        "--keep",
        type=pathlib.Path,
        default=None,
        help="real mode: copy the API server's audit log and the operator's log into this "
        "directory (for finding where a slow transition waited)",
    )
    args = parser.parse_args(argv)
    if args.profile is not None and args.cluster != "emulated":
        parser.error("--profile needs --cluster emulated")
    emulated = real = None
    if args.cluster in ("emulated", "both"):
        emulated = with_ratios(
            run_benchmark(args.runs, args.iterations, args.timeout, args.profile)
        )
    if args.cluster in ("real", "both"):
        from benchmarks.operator_scale_real import run_real

        real = with_ratios(run_real(args.runs, args.iterations, args.timeout, args.keep))
    if emulated is not None and real is not None:
        print(json.dumps(side_by_side(emulated, real)))
    else:
        print(json.dumps(emulated or real))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

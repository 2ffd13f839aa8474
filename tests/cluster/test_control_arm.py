"""spec.controlArm on the real control plane (issue 18): per iteration both arms' Jobs run (SPIN's
generate/train/evaluate and the SFT control's train/evaluate, through the real Job controller and
scheduler), and the status says per iteration whether SPIN beat the control and by how much.

Stand-in pods (tests/cluster/standin.py) write each step's artifacts; the launch hook gives each
evaluation pod its score, so iteration 0 has SPIN ahead and iteration 1 the control ahead. The
SFT objective itself is tested for real on the CPU (tests/spin_runtime/test_train_control.py,
1 and 2 processes).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path

import pytest

from spin_operator.naming import ALL_STEP_KINDS, CHECK, ITERATION_LABEL, STAGE_LABEL, job_name
from tests.cluster import harness, kit
from tests.cluster.conftest import quick_pods
from tests.cluster.harness import RealCluster
from tests.support.servers import MlflowServer

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

RUN = "arms"
# exact_match of each evaluation pod: (stage, iteration) -> score
SCORES = {
    ("evaluate", 0): 0.75,
    ("control-evaluate", 0): 0.5,
    ("evaluate", 1): 0.5,
    ("control-evaluate", 1): 0.625,
}  # binary fractions: the advantages below are exact


def scored_pods(pod: dict, argv: list[str], env: dict[str, str]) -> list[str]:
    labels = pod["metadata"].get("labels") or {}
    key = (labels.get(STAGE_LABEL), int(labels.get(ITERATION_LABEL, "-1")))
    if key in SCORES:
        env["STANDIN_EXACT_MATCH"] = str(SCORES[key])
    return quick_pods(pod, argv, env)


@pytest.fixture
def cluster_scored(
    real_cluster: harness.Session, tmp_path: Path, cluster_inputs: str, mlflow_server: MlflowServer
) -> Iterator[RealCluster]:
    mlflow_server.start()
    with harness.release(
        real_cluster, tmp_path, cluster_inputs, mlflow_server.uri, launch_hook=scored_pods
    ) as c:
        yield c


def test_both_arms_run_per_iteration_and_the_status_says_who_won(
    cluster_scored: RealCluster, tmp_path: Path
) -> None:
    c = cluster_scored
    c.apply(
        kit.spinrun_file(
            tmp_path,
            RUN,
            spec__controlArm={"enabled": True},
            spec__evaluation__metric="exact_match",
        )
    )
    run = c.wait_run(RUN, 600)
    status = run["status"]
    assert status["phase"] == "Succeeded", c.diagnostics(RUN)

    # Both arms' Jobs, each created once by the operator (the API server's audit log).
    created = collections.Counter(c.job_creations())
    # iteration 0 is led by the check Job (CPU, before any GPU Job); both arms' steps each time
    expected = {
        job_name(RUN, t, kind) for t in (0, 1) for kind in ALL_STEP_KINDS if t == 0 or kind != CHECK
    }
    # (a string message: pytest prints it whole, a tuple's repr it cuts to a few hundred chars)
    assert set(created) == expected and set(created.values()) == {1}, (
        f"{created}\n{c.diagnostics(RUN)}"
    )
    for it in status["iterations"]:
        for step in ("generate", "train", "evaluate", "controlTrain", "controlEvaluate"):
            assert it[step]["phase"] == "Succeeded", (it["iteration"], step, it[step])

    # Per iteration: who won, by how much (spinScore - controlScore for mode max).
    verdicts = {
        it["iteration"]: (
            it["control"]["spinScore"],
            it["control"]["controlScore"],
            it["control"]["spinAdvantage"],
        )
        for it in status["iterations"]
    }
    assert verdicts == {0: (0.75, 0.5, 0.25), 1: (0.5, 0.625, -0.125)}, verdicts
    assert all(it["control"]["metric"] == "exact_match" for it in status["iterations"])
    assert status["iterations"][0]["control"]["metrics"]["exact_match"] == 0.5
    # The condition speaks for the latest iteration: the control is ahead there.
    arm = next(x for x in status["conditions"] if x["type"] == "ControlArm")
    assert (arm["status"], arm["reason"]) == ("False", "ControlAhead"), arm
    assert arm["message"].startswith("iteration 1: the SFT control is ahead by 0.125"), arm
    # The control's models continue from each other: iteration 1 starts from iteration 0's.
    first, second = (it["control"] for it in status["iterations"])
    assert second["modelUri"] == first["outputModelUri"], (first, second)
    stamps = kit.artifact_stamps(f"{kit.STORAGE_URI}/{c.namespace}/{RUN}")
    for t in (0, 1):
        assert f"iter-{t:03d}/control/model/_MANIFEST.json" in stamps, sorted(stamps)
        assert f"iter-{t:03d}/control/eval/_MANIFEST.json" in stamps, sorted(stamps)

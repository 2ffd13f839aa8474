"""What the operator creates passes the real admission chain, and would not without the two
fixes the real control plane forced: ``runAsNonRoot`` on Job pods (PodSecurity ``restricted``)
and ``update`` on ``spinruns/finalizers`` in the chart (OwnerReferencesPermissionEnforcement
admits ``blockOwnerDeletion`` only for users who may update the owner's finalizers).

A real Job the operator created is re-sent with ``dryRun=All`` as the operator's ServiceAccount
(impersonated): accepted with the chart's RBAC, refused once the finalizers grant is removed. Its
pod template, as a Pod, is admitted by PodSecurity; without ``runAsNonRoot`` it is refused.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from spin_operator.naming import job_name
from tests.cluster import kit
from tests.cluster.harness import RELEASE_NAMESPACE, RealCluster

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

OPERATOR = f"system:serviceaccount:{RELEASE_NAMESPACE}:spin-spin-operator"


def dry_run(c: RealCluster, obj: dict[str, Any], path: Path, *as_user: str) -> tuple[int, str]:
    path.write_text(json.dumps(obj))
    proc = c.kubectl(*as_user, "create", "--dry-run=server", "-f", str(path), check=False)
    return proc.returncode, proc.stdout + proc.stderr


def test_operator_children_pass_admission_and_need_both_fixes(
    cluster_quick: RealCluster, tmp_path: Path
) -> None:
    c = cluster_quick
    # finished Jobs kept (retention.finishedJobs: Retain): the generation Job is read back below
    c.apply(
        kit.spinrun_file(
            tmp_path, "owner", spec__iterations=1, spec__retention={"finishedJobs": "Retain"}
        )
    )
    assert c.wait_run("owner", 300)["status"]["phase"] == "Succeeded", c.diagnostics("owner")
    job = c.get("job", job_name("owner", 0, "generate"))
    assert job is not None
    owner = job["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "SPINRun" and owner["blockOwnerDeletion"] is True
    copy_ = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "copy", "namespace": c.namespace, "ownerReferences": [owner]},
        "spec": copy.deepcopy(job["spec"]),
    }
    for key in ("selector", "manualSelector"):
        copy_["spec"].pop(key, None)
    labels = copy_["spec"]["template"]["metadata"].get("labels") or {}
    for key in [k for k in labels if "controller-uid" in k or "job-name" in k]:
        labels.pop(key)
    as_operator = ("--as", OPERATOR)
    code, out = dry_run(c, copy_, tmp_path / "job.json", *as_operator)
    assert code == 0, f"the operator's own Job is refused for it:\n{out}"

    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "copy", "namespace": c.namespace},
        "spec": copy.deepcopy(job["spec"]["template"]["spec"]),
    }
    code, out = dry_run(c, pod, tmp_path / "pod.json")
    assert code == 0, f"PodSecurity restricted refuses the operator's pod:\n{out}"
    spec = pod["spec"]
    assert (
        spec["automountServiceAccountToken"] is False
        and spec["securityContext"]["runAsUser"] == 65532
    )
    spec["securityContext"].pop("runAsNonRoot")
    spec["containers"][0]["securityContext"].pop("runAsNonRoot")
    code, out = dry_run(c, pod, tmp_path / "pod.json")
    assert code != 0 and "runAsNonRoot" in out, out

    role = c.kubectl("get", "clusterrole", "-l", "app.kubernetes.io/instance=spin", "-o", "json")
    cluster_role = next(
        r
        for r in json.loads(role.stdout)["items"]
        if any("spinruns/finalizers" in x["resources"] for x in r["rules"])
    )
    index = next(
        i for i, r in enumerate(cluster_role["rules"]) if "spinruns/finalizers" in r["resources"]
    )
    patch = [{"op": "remove", "path": f"/rules/{index}"}]
    c.kubectl(
        "patch",
        "clusterrole",
        cluster_role["metadata"]["name"],
        "--type=json",
        "-p",
        json.dumps(patch),
    )
    code, out = dry_run(c, copy_, tmp_path / "job.json", *as_operator)
    assert code != 0 and "blockOwnerDeletion" in out, out

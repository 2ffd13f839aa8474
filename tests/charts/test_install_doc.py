"""docs/install.md stays true to the chart and the API: its SPINRuns validate, its Helm flags
name real values, its Kueue objects carry the fields Kueue requires."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.charts.helm import CHART, NAMESPACE, RELEASE, ROOT, needs_helm, render

DOC = (ROOT / "docs" / "install.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC, flags=re.S)


def _yaml_docs() -> list[dict[str, Any]]:
    return [doc for block in _blocks("yaml") for doc in yaml.safe_load_all(block) if doc]


def test_spinrun_examples_validate() -> None:
    validation = pytest.importorskip("spin_operator.validation")
    runs = [doc for doc in _yaml_docs() if doc.get("kind") == "SPINRun"]
    assert runs
    for run in runs:
        assert validation.problems_of(run) == [], run["metadata"]["name"]


def test_spec_snippets_name_real_fields() -> None:
    """Fragments such as `spec: {scheduling: {queueName: ...}}` use fields of the CRD."""
    crd = yaml.safe_load((ROOT / "crds" / "selfplay.dev_spinruns.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]

    def check(node: Any, sch: dict[str, Any], path: str) -> None:
        if isinstance(node, dict) and "properties" in sch:
            for key, value in node.items():
                assert key in sch["properties"], f"{path}.{key} is not a SPINRun field"
                check(value, sch["properties"][key], f"{path}.{key}")

    fragments = [doc["spec"] for doc in _yaml_docs() if set(doc) == {"spec"}]
    assert fragments
    for fragment in fragments:
        check(fragment, schema, "spec")


def test_helm_flags_name_real_values() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    flags = re.findall(r"--set '?([A-Za-z][\w.\[\]]*)=", "\n".join(_blocks("sh")))
    assert len(flags) >= 8
    for flag in flags:
        node: Any = values
        for part in re.sub(r"\[\d+\]", "", flag).split("."):
            assert isinstance(node, dict) and part in node, f"--set {flag}: no such value"
            node = node[part]


def test_kueue_examples_are_complete() -> None:
    kueue = {
        doc["kind"]: doc
        for doc in _yaml_docs()
        if doc.get("apiVersion", "").startswith("kueue.x-k8s.io/")
    }
    assert set(kueue) == {"ResourceFlavor", "ClusterQueue", "LocalQueue"}
    flavor = kueue["ResourceFlavor"]["metadata"]["name"]
    groups = kueue["ClusterQueue"]["spec"]["resourceGroups"]
    for group in groups:
        for flv in group["flavors"]:
            assert flv["name"] == flavor
            assert [r["name"] for r in flv["resources"]] == group["coveredResources"]
    assert "nvidia.com/gpu" in groups[0]["coveredResources"]
    local = kueue["LocalQueue"]
    assert local["spec"]["clusterQueue"] == kueue["ClusterQueue"]["metadata"]["name"]
    assert f"queueName: {local['metadata']['name']}" in DOC


def _rbac_rows(text: str) -> dict[str, str]:
    """`resource` -> "verb, verb" from a "| resource | verbs | why |" table."""
    section = text.split("| resource | verbs | why |", 1)[1].split("\n\n", 1)[0]
    out = {}
    for line in section.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0].split()[0].strip("`")] = cells[1]
    return out


def test_rbac_table_matches_the_chart_readme() -> None:
    """The two RBAC tables (install guide, chart README) list the same resources and verbs."""
    assert _rbac_rows(DOC) == _rbac_rows((CHART / "README.md").read_text())


@needs_helm
def test_rbac_table_is_what_the_chart_grants() -> None:
    from tests.charts.rbac import Grants

    groups = {"spinruns/status": "selfplay.dev", "spinruns/finalizers": "selfplay.dev"}
    documented = set()
    for resource, verbs in _rbac_rows(DOC).items():
        name, _, group = resource.partition(".")
        for verb in verbs.split(", "):
            documented.add((groups.get(resource, group), name, verb))
    granted = set()
    for values in ({}, {"watchNamespaces": ["team-a"]}):  # the union of both modes
        granted |= Grants.from_objects(
            render(values), NAMESPACE, f"{RELEASE}-spin-operator"
        ).pairs()
    assert documented == granted

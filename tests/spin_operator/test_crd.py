"""The committed CRD is the one the models generate, and it is a valid structural CRD."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from spin_operator.api import crd
from spin_operator.api import types as api
from spin_operator.api.reference import markdown
from tests.support.crd_schema import apply_defaults, root_schema

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "selfplay.dev_spinruns.yaml"


def test_committed_crd_matches_models() -> None:
    assert CRD_FILE.read_text() == crd.crd_yaml(), (
        "crds/ drifted from the models: run `make generate`"
    )


def test_committed_reference_matches_models() -> None:
    assert (REPO / "docs" / "api.md").read_text() == markdown(), (
        "docs/api.md drifted: run `make generate`"
    )


def test_crd_passes_kubernetes_validate_strict() -> None:
    kubernetes_validate.validate(yaml.safe_load(CRD_FILE.read_text()), "1.35", strict=True)


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}/{i}")


def test_schema_is_structural() -> None:
    schema = root_schema()
    for path, node in _walk(schema):
        assert "$ref" not in node and "anyOf" not in node and "allOf" not in node, path
        if (
            path.endswith("/properties")
            or path.endswith("x-kubernetes-validations")
            or "/x-kubernetes-validations/" in path
        ):
            continue
        if path.split("/")[-1] in ("default", "enum") or "/default" in path or "/enum" in path:
            continue
        assert "type" in node, f"untyped schema node at {path}"
        assert node.get("additionalProperties") is not False, path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path


def test_defaults_fill_a_minimal_spec_like_the_models() -> None:
    """The API server's defaults and the pydantic defaults agree on every field."""
    obj = {"spec": {"model": {"uri": "m"}, "dataset": {"uri": "/d.jsonl"}}}
    defaulted = apply_defaults(root_schema(), obj)["spec"]
    from_models = api.SPINRunSpec.model_validate(obj["spec"]).to_wire()
    assert defaulted == from_models


def test_crd_names_and_columns() -> None:
    obj = crd.crd()
    assert obj["metadata"]["name"] == "spinruns.selfplay.dev"
    assert obj["spec"]["names"]["shortNames"] == ["spin"]
    version = obj["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:5] == ["Phase", "Iteration", "Stage", "Done", "Best"] and columns[-1] == "Age"
    status_props = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for column in version["additionalPrinterColumns"]:
        section, field = column["jsonPath"].split(".")[1:3]
        if section == "status":
            assert field in status_props, column


def test_every_field_is_described() -> None:
    for path, node in _walk(root_schema()["properties"]["spec"]):
        if path.endswith("/properties") or "x-kubernetes" in path or "/default" in path:
            continue
        if node.get("type") and "/items" not in path and "/additionalProperties" not in path:
            assert node.get("description"), f"no description at {path}"

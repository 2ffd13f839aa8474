"""The node agent's container resolution (tests/cluster/kubelet.py): pure rules, no cluster."""

from __future__ import annotations

from tests.cluster.kubelet import HostRewriter, expand


def test_expand_follows_kubernetes_rules() -> None:
    env = {"A": "1", "B": "x"}
    assert expand("$(A)-$(B)", env) == "1-x"
    assert expand("$(MISSING)", env) == "$(MISSING)"
    assert expand("$$(A)", env) == "$(A)"
    assert expand("cost $5 $(", env) == "cost $5 $("


def test_host_rewriter_maps_pod_and_service_names_only() -> None:
    ports: dict[tuple[str, int], int] = {}
    rw = HostRewriter("ns1", ["run-i0-train"], lambda s, p: ports.setdefault((s, p), 40000 + p))
    assert rw.rewrite("run-i0-train-0.run-i0-train:29500") == "127.0.0.1:69500"
    assert rw.rewrite(
        "--rdzv-endpoint=run-i0-train-0.run-i0-train.ns1.svc.cluster.local:29500"
    ) == ("--rdzv-endpoint=127.0.0.1:69500")
    assert rw.rewrite("run-i0-train") == "127.0.0.1"  # a whole value: an address
    # a bare name inside a longer value is not an address (job names, paths, ids)
    assert rw.rewrite("s3://b/logs/run-i0-train/x") == "s3://b/logs/run-i0-train/x"
    assert rw.rewrite("--rdzv-id=run-i0-train") == "--rdzv-id=run-i0-train"
    assert rw.map_port("29500") == "69500"

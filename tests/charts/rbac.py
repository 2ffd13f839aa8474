"""RBAC evaluation over rendered chart objects, the way the API server's authorizer decides.

`Grants.from_objects` collects the rules bound to the operator's ServiceAccount: ClusterRoles
through ClusterRoleBindings (every namespace and cluster-scoped resources), Roles (or
ClusterRoles) through RoleBindings (that namespace only). `allows` answers for one request:
a cluster-wide list/watch of a namespaced resource needs a cluster-wide grant, exactly as with
a real API server, so a namespaced-mode operator that watched Jobs in all namespaces would fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Rule = dict[str, Any]


@dataclass(frozen=True)
class Call:
    """One API call in RBAC terms; `namespace` None for cluster-scoped or all-namespace calls."""

    verb: str
    group: str
    resource: str  # "jobs", "spinruns/status"
    namespace: str | None


def rule_allows(rule: Rule, verb: str, group: str, resource: str) -> bool:
    if "nonResourceURLs" in rule:
        return False
    return (
        (group in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", []))
        and (resource in rule.get("resources", []) or "*" in rule.get("resources", []))
        and (verb in rule["verbs"] or "*" in rule["verbs"])
        and not rule.get("resourceNames")
    )


@dataclass
class Grants:
    cluster: list[Rule] = field(default_factory=list)
    namespaced: dict[str, list[Rule]] = field(default_factory=dict)

    @classmethod
    def from_objects(cls, objects: list[dict[str, Any]], sa_namespace: str, sa_name: str) -> Grants:
        roles = {
            (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o.get("rules", [])
            for o in objects
            if o["kind"] in ("Role", "ClusterRole")
        }
        grants = cls()
        for binding in objects:
            if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
                continue
            subject = {"kind": "ServiceAccount", "name": sa_name, "namespace": sa_namespace}
            if not any({k: s.get(k) for k in subject} == subject for s in binding["subjects"]):
                continue
            ref = binding["roleRef"]
            assert ref["apiGroup"] == "rbac.authorization.k8s.io"
            ns = binding["metadata"].get("namespace")
            role_ns = ns if ref["kind"] == "Role" else None
            rules = roles.get((ref["kind"], role_ns, ref["name"]))
            assert rules is not None, (
                f"{binding['kind']} {binding['metadata']['name']} binds a missing {ref}"
            )
            if binding["kind"] == "ClusterRoleBinding":
                grants.cluster.extend(rules)
            else:
                grants.namespaced.setdefault(ns, []).extend(rules)
        return grants

    def allows(self, call: Call) -> bool:
        rules = list(self.cluster)
        if call.namespace is not None:
            rules += self.namespaced.get(call.namespace, [])
        return any(rule_allows(rule, call.verb, call.group, call.resource) for rule in rules)

    def pairs(self) -> set[tuple[str, str, str]]:
        """Every granted (apiGroup, resource, verb), wherever it is granted."""
        out = set()
        for rule in self.cluster + [r for rules in self.namespaced.values() for r in rules]:
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    for verb in rule["verbs"]:
                        out.add((group, resource, verb))
        return out

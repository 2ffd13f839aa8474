"""`ApiServerEmulator`: kmock's KubernetesEmulator with the API-server semantics the operator uses.

kmock 0.8 serves discovery and a dict store; the operator depends on more (docs/design.md "The
operator process"): uids, resourceVersions and optimistic concurrency, generation, generateName,
finalizers, 201/409/404/422 answers, selectors, watches resumable from a resourceVersion, the
status subresource, ownerReference garbage collection, the three patch types and CRD admission.
This class keeps kmock's discovery documents, resource registry and server, and serves resource
URLs itself (kmock's path parser cannot even read `/api/v1/namespaces`).

Stored objects are never mutated (each write stores a new dict), so watch events and responses
share them without copies. Everything runs on the server's event loop.

Not emulated: authentication and RBAC (the request log is for checking the chart's rules),
server-side apply (415) and managedFields, what only kubectl asks for (`/openapi`, Tables: users'
tools run against the real control plane, tests/cluster), admission webhooks, namespace existence
on create and a Terminating phase for namespaces (their contents are deleted at once), periodic
watch bookmarks, controllers (Jobs never run: see job_driver.py), list `resourceVersion` semantics (lists are
always current), and immediate collection of objects created with an owner that never existed
(`collect_garbage()` sweeps them, as the real collector eventually does).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import datetime
import itertools
import json
import random
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, cast

import aiohttp.web
import attrs
import kmock

from tests.support import k8s_admission as admission
from tests.support import k8s_semantics as sem
from tests.support.k8s_records import ApiRequest, RequestLog
from tests.support.k8s_semantics import ApiError

CRD_KEY = ("apiextensions.k8s.io", "customresourcedefinitions")
_NAME_ALPHABET = (
    "bcdfghjklmnpqrstvwxz2456789"  # generateName suffixes, as the API server draws them
)
_IMMUTABLE_META = (
    "name",
    "namespace",
    "uid",
    "creationTimestamp",
    "generation",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "resourceVersion",
    "selfLink",
)

ObjKey = tuple[str | None, str]  # namespace, name
JSON = dict[str, Any]


def now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ResourceDef:
    """One served resource (from kmock's discovery registry or a registered CRD)."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    subresources: frozenset[str]
    custom: bool  # custom resources refuse strategic-merge patches

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """`jobs.batch`, `services`: how the API server names a resource in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


@dataclass(frozen=True)
class _Event:
    rv: int
    type: str
    rkey: tuple[str, str]
    obj: JSON
    old: JSON | None


@dataclass(frozen=True)
class Route:
    """A parsed resource URL; `rdef` is None when the resource is not served (404)."""

    rdef: ResourceDef | None
    group: str
    version: str
    plural: str
    namespace: str | None
    name: str | None
    subresource: str | None


@dataclass
class Result:
    code: int
    body: Any
    warnings: list[str]


def not_found(rdef: ResourceDef, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{rdef.qualified} "{name}" not found',
        {"name": name, "group": rdef.group, "kind": rdef.plural},
    )


def conflict(rdef: ResourceDef, name: str, why: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {rdef.qualified} "{name}": {why}',
        {"name": name, "group": rdef.group, "kind": rdef.plural},
    )


def invalid(rdef: ResourceDef, name: str, errors: list[tuple[str, str]]) -> ApiError:
    """422 Invalid naming each field, formatted as the API server does."""
    kind = f"{rdef.kind}.{rdef.group}" if rdef.group else rdef.kind
    text = [f"{f}: {m}" if f else m for f, m in errors]
    joined = text[0] if len(text) == 1 else "[" + ", ".join(text) + "]"
    causes = [{"reason": "FieldValueInvalid", "message": m, "field": f} for f, m in errors]
    return ApiError(
        422,
        "Invalid",
        f'{kind} "{name}" is invalid: {joined}',
        {"name": name, "group": rdef.group, "kind": rdef.kind, "causes": causes},
    )


def split_error(text: str) -> tuple[str, str]:
    """'spec.x: Invalid value: ...' -> ('spec.x', 'Invalid value: ...'); '<root>' -> ''."""
    field, sep, message = text.partition(": ")
    if not sep or " " in field:
        return "", text
    return ("" if field == "<root>" else field), message


@attrs.define(kw_only=True)
class ApiServerEmulator(kmock.KubernetesEmulator):
    """An API server in memory: see the module docstring for what it adds to kmock."""

    event_history: int = 20000  # watch events kept for resumption; older resourceVersions get 410

    _store: dict[tuple[str, str], dict[ObjKey, JSON]] = attrs.field(
        factory=lambda: collections.defaultdict(dict), init=False
    )
    _uids: dict[str, tuple[tuple[str, str], ObjKey]] = attrs.field(factory=dict, init=False)
    # owner uid -> dependents (by ownerReferences), and deletions the garbage collector has yet to process
    _owned: dict[str, set[tuple[tuple[str, str], ObjKey]]] = attrs.field(
        factory=lambda: collections.defaultdict(set), init=False
    )
    _gc_queue: collections.deque[JSON] = attrs.field(factory=collections.deque, init=False)
    _rv: int = attrs.field(default=1000, init=False)
    _events: collections.deque[_Event] = attrs.field(init=False)
    _compacted_rv: int = attrs.field(default=0, init=False)
    _watchers: dict[tuple[str, str], set[asyncio.Queue[_Event | None]]] = attrs.field(
        factory=lambda: collections.defaultdict(set), init=False
    )
    _crds: dict[tuple[str, str, str], admission.CrdAdmission] = attrs.field(
        factory=dict, init=False
    )
    _defs: dict[tuple[str, str, str], ResourceDef | None] = attrs.field(factory=dict, init=False)
    _ips: Iterator[int] = attrs.field(factory=lambda: itertools.count(10), init=False)
    requests_log: RequestLog = attrs.field(factory=RequestLog, init=False)
    # Fault injection: each callable sees the request about to be served and may return an error.
    faults: list[Callable[[ApiRequest], ApiError | None]] = attrs.field(factory=list, init=False)
    internal_errors: list[str] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._events = collections.deque(maxlen=self.event_history)

    # ------------------------------------------------------------------ resources

    def register_crd(self, crd: JSON) -> None:
        """Serve a CRD's resources: discovery, admission, printer columns; store the CRD object."""
        spec, names = crd["spec"], crd["spec"]["names"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            self.resources[f"{spec['group']}/{version['name']}/{names['plural']}"] = (
                kmock.ResourceInfo(
                    kind=names["kind"],
                    singular=names.get("singular") or names["kind"].lower(),
                    namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                    verbs={
                        "create",
                        "delete",
                        "deletecollection",
                        "get",
                        "list",
                        "patch",
                        "update",
                        "watch",
                    },
                    shortnames=set(names.get("shortNames") or []),
                    categories=set(names.get("categories") or []),
                    subresources=set(version.get("subresources") or {}),
                )
            )
            self._crds[(spec["group"], version["name"], names["plural"])] = admission.crd_admission(
                crd, version["name"]
            )
        self._defs.clear()
        if (None, crd["metadata"]["name"]) not in self._store[CRD_KEY]:
            obj = copy.deepcopy(crd)
            obj.setdefault("apiVersion", "apiextensions.k8s.io/v1")
            obj.setdefault("kind", "CustomResourceDefinition")
            self._stamp_new(obj["metadata"])
            self._commit(
                CRD_KEY, (None, obj["metadata"]["name"]), self._crd_status(obj), None, "ADDED"
            )

    async def _serve_version(self, request: kmock.Request) -> Any:
        """APIResourceList as a real server writes it: subresources carry no short names/categories.

        (kmock copies them onto `pods/status` etc., and kubectl then finds `ns` ambiguous.)
        """
        assert request.resource is not None
        group, version = request.resource.group or "", request.resource.version or ""
        entries = []
        for res, info in sorted(self._infos(), key=lambda ri: ri[0].plural or ""):
            if res.group != group or res.version != version:
                continue
            base = {
                "name": res.plural,
                "singularName": info.singular or "",
                "namespaced": bool(info.namespaced),
                "kind": info.kind,
                "verbs": sorted(info.verbs),
            }
            entries.append(
                {
                    **base,
                    "shortNames": sorted(info.shortnames),
                    "categories": sorted(info.categories),
                }
            )
            for sub in sorted(info.subresources):
                verbs = (
                    ["get", "patch", "update"] if sub in ("status", "scale") else ["create", "get"]
                )
                entries.append(
                    {**base, "name": f"{res.plural}/{sub}", "singularName": "", "verbs": verbs}
                )
        if not entries and group:
            raise kmock.KubernetesResourceNotFoundError()
        return {
            "apiVersion": "v1",
            "kind": "APIResourceList",
            "groupVersion": f"{group}/{version}".lstrip("/"),
            "resources": entries,
        }

    @staticmethod
    def _crd_status(crd: JSON) -> JSON:
        conditions = [
            {
                "type": t,
                "status": "True",
                "reason": r,
                "message": m,
                "lastTransitionTime": now_rfc3339(),
            }
            for t, r, m in (
                ("NamesAccepted", "NoConflicts", "no conflicts found"),
                ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
            )
        ]
        stored = [v["name"] for v in crd["spec"]["versions"] if v.get("storage")]
        return {
            **crd,
            "status": {
                "acceptedNames": crd["spec"]["names"],
                "storedVersions": stored,
                "conditions": conditions,
            },
        }

    def _infos(self) -> list[tuple[kmock.resource, kmock.ResourceInfo]]:
        return [(cast(kmock.resource, r), self.resources[r]) for r in self.resources]

    def resource_def(self, group: str, version: str, plural: str) -> ResourceDef | None:
        key = (group, version, plural)
        if key not in self._defs:
            ref = f"{group}/{version}/{plural}"
            info = self.resources[ref] if ref in self.resources else None  # noqa: SIM401 (auto-creates)
            self._defs[key] = (
                None
                if info is None
                else ResourceDef(
                    group,
                    version,
                    plural,
                    info.kind or plural.capitalize(),
                    bool(info.namespaced),
                    frozenset(info.subresources),
                    key in self._crds,
                )
            )
        return self._defs[key]

    def find_resource(self, name: str) -> ResourceDef:
        """Resolve 'jobs', 'job', 'Job', 'jobs.batch', 'batch/v1/jobs', 'spin' (core group first)."""
        candidates = []
        for res, info in self._infos():
            names = {
                res.plural,
                f"{res.plural}.{res.group}",
                f"{res.group}/{res.version}/{res.plural}",
                f"{res.version}/{res.plural}",
                (info.kind or "").lower(),
                info.singular or "",
            }
            if name.lower() in names | set(info.shortnames):
                candidates.append(res)
        if not candidates:
            raise KeyError(f"unknown resource {name!r}")
        best = min(candidates, key=lambda r: (r.group != "", r.group or "", r.version or ""))
        rdef = self.resource_def(best.group or "", best.version or "", best.plural or "")
        assert rdef is not None
        return rdef

    def resource_for(self, api_version: str, kind: str) -> ResourceDef:
        group, _, version = api_version.rpartition("/")
        for res, info in self._infos():
            if res.group == group and res.version == version and info.kind == kind:
                rdef = self.resource_def(group, version, res.plural or "")
                assert rdef is not None
                return rdef
        raise KeyError(f"no resource serves {api_version} {kind}")

    # ------------------------------------------------------------------ store

    @property
    def resource_version(self) -> int:
        return self._rv

    def stored_objects(self, rdef: ResourceDef, namespace: str | None = None) -> list[JSON]:
        """Stored objects of a resource, ordered by namespace and name (all namespaces if None)."""
        bucket = self._store[rdef.key]
        return [
            bucket[k]
            for k in sorted(bucket, key=lambda k: (k[0] or "", k[1]))
            if namespace is None or k[0] == namespace
        ]

    def stored(self, rdef: ResourceDef, namespace: str | None, name: str) -> JSON | None:
        return self._store[rdef.key].get((namespace if rdef.namespaced else None, name))

    @staticmethod
    def _stamp_new(meta: JSON, generation: int | None = None) -> None:
        for key in _IMMUTABLE_META[2:]:
            meta.pop(key, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        if generation is not None:
            meta["generation"] = generation

    def _commit(
        self, rkey: tuple[str, str], okey: ObjKey, obj: JSON, old: JSON | None, etype: str
    ) -> JSON:
        """Store (or remove, for DELETED) with a fresh resourceVersion and notify watchers."""
        self._rv += 1
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self._rv)}}
        uid = obj["metadata"]["uid"]
        before = self._store[rkey].get(okey)
        owners_before = {
            r.get("uid")
            for r in (before or {"metadata": {}})["metadata"].get("ownerReferences") or []
        }
        owners_after = (
            set()
            if etype == "DELETED"
            else {r.get("uid") for r in obj["metadata"].get("ownerReferences") or []}
        )
        for owner in owners_before - owners_after:
            self._owned[owner].discard((rkey, okey))
            if not self._owned[owner]:
                del self._owned[owner]
        for owner in owners_after - owners_before:
            self._owned[owner].add((rkey, okey))
        if etype == "DELETED":
            self._store[rkey].pop(okey, None)
            self._uids.pop(uid, None)
            self._gc_queue.append(obj)
        else:
            self._store[rkey][okey] = obj
            self._uids[uid] = (rkey, okey)
        if len(self._events) == self._events.maxlen:
            self._compacted_rv = self._events[0].rv
        event = _Event(self._rv, etype, rkey, obj, old)
        self._events.append(event)
        for queue in self._watchers.get(rkey, ()):
            queue.put_nowait(event)
        return obj

    # ------------------------------------------------------------------ HTTP

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Serve resource URLs here; discovery and the rest through kmock."""
        started = time.time()
        agent = raw.headers.get("User-Agent", "")
        route = self.route(raw.path)
        if route is None:
            response = await super().__call__(raw)
            self.requests_log.append(
                ApiRequest(
                    "get" if raw.method == "GET" else raw.method.lower(),
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    response.status,
                    agent,
                    raw.path,
                    started,
                )
            )
            return response
        verb = self.verb(raw.method, route, raw.query.get("watch") in ("true", "1"))
        record = ApiRequest(
            verb,
            route.group,
            route.version,
            route.plural,
            route.subresource,
            route.namespace,
            route.name,
            0,
            agent,
            raw.path,
            started,
            dry_run=raw.query.get("dryRun") == "All",
        )
        try:
            for fault in list(self.faults):
                if (error := fault(record)) is not None:
                    raise error
            if route.rdef is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            elif verb == "watch":  # logged when the stream starts (it may last the whole test)
                return await self.serve_watch(
                    raw, route, lambda: self.requests_log.append(replace(record, code=200))
                )
            else:
                body = await raw.read()
                result = self.handle(
                    verb,
                    route,
                    dict(raw.query),
                    body,
                    raw.headers.get("Content-Type", ""),
                )
                response = self._json(result.code, result.body, result.warnings)
                if verb == "create" and result.code == 201:  # log the name the server chose
                    record = replace(record, name=result.body["metadata"]["name"])
        except ApiError as e:
            response = self._json(e.code, e.status(), [])
        except Exception as e:  # an emulator bug: answer 500 and keep it for the fixture to report
            self.internal_errors.append("".join(traceback.format_exception(e)))
            response = self._json(500, ApiError(500, "InternalError", repr(e)).status(), [])
        self.requests_log.append(
            replace(record, code=response.status, duration=time.time() - started)
        )
        return response

    @staticmethod
    def _json(code: int, body: Any, warnings: list[str]) -> aiohttp.web.Response:
        headers = {"Warning": ", ".join(f'299 - "{w}"' for w in warnings)} if warnings else None
        return aiohttp.web.Response(
            body=json.dumps(body).encode(),
            status=code,
            content_type="application/json",
            headers=headers,
        )

    def route(self, path: str) -> Route | None:
        """Parse `/api/v1/...` or `/apis/g/v/...` resource URLs; None for discovery and others."""
        parts = [p for p in path.split("/") if p]
        if len(parts) >= 3 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 4 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace = None
        if (
            rest[0] == "namespaces"
            and len(rest) >= 3
            and not (len(rest) == 3 and rest[2] in ("status", "finalize"))
        ):
            namespace, rest = rest[1], rest[2:]
        name = rest[1] if len(rest) > 1 else None
        subresource = "/".join(rest[2:]) or None
        return Route(
            self.resource_def(group, version, rest[0]),
            group,
            version,
            rest[0],
            namespace,
            name,
            subresource,
        )

    @staticmethod
    def verb(method: str, route: Route | None, watch: bool) -> str:
        """The RBAC verb of a request."""
        named = route is not None and route.name is not None
        return {
            "GET": "watch" if watch else ("get" if named else "list"),
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if named else "deletecollection",
        }.get(method, method.lower())

    def handle(
        self,
        verb: str,
        route: Route,
        params: dict[str, str],
        body: bytes,
        content_type: str = "application/json",
    ) -> Result:
        """Serve one non-watch request (also used directly by the test helpers)."""
        rdef = route.rdef
        assert rdef is not None
        if (
            rdef.namespaced
            and route.namespace is None
            and verb not in ("list", "watch", "deletecollection")
        ):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        namespace = route.namespace if rdef.namespaced else None
        data = self._decode(body, content_type) if body else None
        if verb == "get":
            return Result(200, self._get(rdef, namespace, route.name or "", route.subresource), [])
        if verb == "list":
            return Result(200, self.list_objects(rdef, namespace, params), [])
        if verb == "create":
            if route.name is not None:
                raise ApiError(
                    405,
                    "MethodNotAllowed",
                    f"POST is not supported on {rdef.plural}/{route.subresource}",
                )
            return self.create_object(rdef, namespace, data, params)
        if verb == "update":
            return self.update_object(
                rdef, namespace, route.name or "", data, params, route.subresource
            )
        if verb == "patch":
            return self.patch_object(
                rdef, namespace, route.name or "", data, content_type, params, route.subresource
            )
        if verb == "delete":
            return self.delete_object(rdef, namespace, route.name or "", {**(data or {}), **params})
        if verb == "deletecollection":
            return self.delete_collection(rdef, namespace, {**(data or {}), **params})
        raise ApiError(
            405, "MethodNotAllowed", f"the server does not allow this method on {rdef.plural}"
        )

    @staticmethod
    def _decode(body: bytes, content_type: str) -> Any:
        if "yaml" in content_type:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the emulator does not implement server-side apply (application/apply-patch+yaml)",
            )
        try:
            return json.loads(body)
        except ValueError as e:
            raise sem.bad_request(f"the request body is not valid JSON: {e}") from None

    # ------------------------------------------------------------------ reads

    def _get(
        self, rdef: ResourceDef, namespace: str | None, name: str, subresource: str | None
    ) -> JSON:
        if subresource not in (None, "status") or (
            subresource and subresource not in rdef.subresources
        ):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        obj = self.stored(rdef, namespace, name)
        if obj is None:
            raise not_found(rdef, name)
        return obj

    def predicate(
        self,
        rdef: ResourceDef,
        namespace: str | None,
        params: dict[str, str],
        name: str | None = None,
    ) -> Callable[[JSON], bool]:
        labels = sem.parse_label_selector(params.get("labelSelector"))
        fields = sem.parse_field_selector(params.get("fieldSelector"), rdef.plural)

        def match(obj: JSON) -> bool:
            meta = obj["metadata"]
            return (
                (namespace is None or meta.get("namespace") == namespace)
                and (name is None or meta["name"] == name)
                and labels(obj)
                and fields(obj)
            )

        return match

    def list_objects(
        self, rdef: ResourceDef, namespace: str | None, params: dict[str, str]
    ) -> JSON:
        match = self.predicate(rdef, namespace, params)
        items = [o for o in self.stored_objects(rdef, namespace) if match(o)]
        meta: JSON = {"resourceVersion": str(self._rv)}
        limit = int(params.get("limit") or 0)
        if cont := params.get("continue"):
            start = int(cont)
            items = items[start:]
        else:
            start = 0
        if limit and len(items) > limit:
            items = items[:limit]
            meta["continue"] = str(start + limit)
        return {
            "kind": f"{rdef.kind}List",
            "apiVersion": rdef.api_version,
            "metadata": meta,
            "items": items,
        }

    async def serve_watch(
        self, raw: aiohttp.web.BaseRequest, route: Route, started: Callable[[], None] = lambda: None
    ) -> aiohttp.web.StreamResponse:
        """A watch stream: initial ADDED (no resourceVersion) or replay after one, then live events."""
        rdef = route.rdef
        assert rdef is not None
        params = dict(raw.query)
        match = self.predicate(
            rdef, route.namespace if rdef.namespaced else None, params, route.name
        )
        rv_param = params.get("resourceVersion") or "0"
        initial = params.get("sendInitialEvents") == "true" or rv_param == "0"
        try:
            since = int(rv_param)
        except ValueError:
            raise sem.bad_request(f"invalid resourceVersion {rv_param!r}") from None
        timeout = float(params.get("timeoutSeconds") or 0) or None
        queue: asyncio.Queue[_Event | None] = asyncio.Queue()
        # Subscribe and snapshot in one step (no await between): nothing is missed or doubled.
        self._watchers[rdef.key].add(queue)
        if initial:
            lines = [{"type": "ADDED", "object": o} for o in self.stored_objects(rdef) if match(o)]
            if params.get("sendInitialEvents") == "true":
                lines.append(
                    {
                        "type": "BOOKMARK",
                        "object": {
                            "kind": rdef.kind,
                            "apiVersion": rdef.api_version,
                            "metadata": {
                                "resourceVersion": str(self._rv),
                                "annotations": {"k8s.io/initial-events-end": "true"},
                            },
                        },
                    }
                )
            last = self._rv
        elif since < self._compacted_rv:
            lines = [
                {
                    "type": "ERROR",
                    "object": ApiError(
                        410, "Expired", f"too old resource version: {since} ({self._compacted_rv})"
                    ).status(),
                }
            ]
            last = -1
        else:
            lines = [
                line
                for e in self._events
                if e.rv > since and e.rkey == rdef.key
                if (line := self._translate(e, match)) is not None
            ]
            last = self._rv
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        started()
        try:
            await response.prepare(raw)
            for line in lines:
                await response.write(json.dumps(line).encode() + b"\n")
            deadline = None if timeout is None else time.monotonic() + timeout
            while last >= 0:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
                if event is None:
                    break
                if event.rv > last and (line := self._translate(event, match)) is not None:
                    await response.write(json.dumps(line).encode() + b"\n")
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client went away
        finally:
            self._watchers[rdef.key].discard(queue)
        return response

    @staticmethod
    def _translate(event: _Event, match: Callable[[JSON], bool]) -> JSON | None:
        """Selector-aware event type: an object leaving a selector is DELETED for that watch."""
        now = match(event.obj)
        before = event.old is not None and match(event.old)
        if event.type == "MODIFIED" and now != before:
            return {"type": "ADDED" if now else "DELETED", "object": event.obj}
        return {"type": event.type, "object": event.obj} if now else None

    def close_watches(self) -> None:
        for queues in self._watchers.values():
            for queue in queues:
                queue.put_nowait(None)

    # ------------------------------------------------------------------ writes

    def create_object(
        self, rdef: ResourceDef, namespace: str | None, body: Any, params: dict[str, str]
    ) -> Result:
        if not isinstance(body, dict):
            raise sem.bad_request("the body of the request must be an object")
        if (
            body.get("kind", rdef.kind) != rdef.kind
            or body.get("apiVersion", rdef.api_version) != rdef.api_version
        ):
            raise sem.bad_request(
                f"the API version in the data ({body.get('apiVersion')}) does not match the "
                f"expected API version ({rdef.api_version})"
            )
        obj = {**copy.deepcopy(body), "apiVersion": rdef.api_version, "kind": rdef.kind}
        meta = obj.setdefault("metadata", {})
        if rdef.namespaced:
            if meta.get("namespace", namespace) != namespace:
                raise sem.bad_request(
                    "the namespace of the provided object does not match the namespace "
                    "sent on the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise invalid(
                    rdef,
                    "",
                    [("metadata.name", "Required value: name or generateName is required")],
                )
            meta["name"] = meta["generateName"] + "".join(random.choices(_NAME_ALPHABET, k=5))
        self._stamp_new(meta, generation=1)
        if "status" in rdef.subresources:
            obj.pop("status", None)  # create cannot set status, as on a real server
        obj, warnings = self._admit(rdef, obj, None, params)
        okey = (meta.get("namespace"), meta["name"])
        if okey in self._store[rdef.key]:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{rdef.qualified} "{meta["name"]}" already exists',
                {"name": meta["name"], "group": rdef.group, "kind": rdef.plural},
            )
        if params.get("dryRun") == "All":
            return Result(201, obj, warnings)
        stored = self._commit(rdef.key, okey, obj, None, "ADDED")
        if rdef.key == CRD_KEY:
            self.register_crd(stored)
        return Result(201, stored, warnings)

    def _admit(
        self, rdef: ResourceDef, obj: JSON, old: JSON | None, params: dict[str, str]
    ) -> tuple[JSON, list[str]]:
        """Defaulting and validation; returns the object to store and warnings."""
        name = obj["metadata"]["name"]
        errors = sem.metadata_errors(rdef.plural, obj["metadata"])
        warnings: list[str] = []
        crd = self._crds.get((rdef.group, rdef.version, rdef.plural))
        if crd is not None:
            admitted, unknown, texts = crd.admit(obj)
            if unknown and params.get("fieldValidation") == "Strict":
                raise sem.bad_request(
                    f'{rdef.kind} in version "{rdef.version}" cannot be handled as a '
                    f"{rdef.kind}: strict decoding error: "
                    + ", ".join(f'unknown field "{u}"' for u in unknown)
                )
            if params.get("fieldValidation") != "Ignore":
                warnings += [f'unknown field "{u}"' for u in unknown]
            obj = admitted
            errors += [split_error(t) for t in texts]
        elif rdef.key == ("batch", "jobs"):
            obj = admission.default_job(obj) if old is None else obj
            errors += admission.job_errors(obj) + (
                admission.job_update_errors(old, obj) if old else []
            )
        elif rdef.key == ("", "services"):
            if old is None:
                ip = next(self._ips)
                obj = admission.default_service(obj, f"10.96.{ip // 250}.{ip % 250 + 1}")
            errors += admission.service_errors(obj) + (
                admission.service_update_errors(old, obj) if old else []
            )
        if errors:
            raise invalid(rdef, name, errors)
        return obj, warnings

    def update_object(
        self,
        rdef: ResourceDef,
        namespace: str | None,
        name: str,
        body: Any,
        params: dict[str, str],
        subresource: str | None,
    ) -> Result:
        """PUT: replace the object (or its status) with the body."""
        if not isinstance(body, dict):
            raise sem.bad_request("the body of the request must be an object")
        body_name = (body.get("metadata") or {}).get("name")
        if body_name != name:
            raise sem.bad_request(
                f"the name of the object ({body_name}) does not match the name on the URL ({name})"
            )
        old = self._get(rdef, namespace, name, subresource)
        return self._write(rdef, old, body, params, subresource)

    def patch_object(
        self,
        rdef: ResourceDef,
        namespace: str | None,
        name: str,
        patch: Any,
        content_type: str,
        params: dict[str, str],
        subresource: str | None,
    ) -> Result:
        old = self._get(rdef, namespace, name, subresource)
        kind = content_type.split(";")[0].strip()
        if kind == "application/merge-patch+json":
            candidate = sem.merge_patch(old, patch)
        elif kind == "application/json-patch+json":
            candidate = sem.json_patch(old, patch)
        elif kind == "application/strategic-merge-patch+json" and not rdef.custom:
            candidate = sem.strategic_merge_patch(old, patch)
        else:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types include: "
                f"application/json-patch+json, application/merge-patch+json"
                f"{'' if rdef.custom else ', application/strategic-merge-patch+json'}",
            )
        if not isinstance(candidate, dict):
            raise sem.bad_request("the patch does not produce an object")
        return self._write(rdef, old, candidate, params, subresource)

    def _write(
        self,
        rdef: ResourceDef,
        old: JSON,
        candidate: JSON,
        params: dict[str, str],
        subresource: str | None,
    ) -> Result:
        """The common update path: concurrency check, status isolation, admission, generation, GC."""
        name = old["metadata"]["name"]
        rv = (candidate.get("metadata") or {}).get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise conflict(
                rdef,
                name,
                "the object has been modified; please apply your changes to the "
                "latest version and try again",
            )
        if subresource == "status":
            new = {k: v for k, v in old.items() if k != "status"}
            if "status" in candidate:
                new["status"] = candidate["status"]
        else:
            new = {k: v for k, v in candidate.items() if k != "status"}
            if "status" not in rdef.subresources and "status" in candidate:
                new["status"] = candidate["status"]
            elif "status" in old and "status" in rdef.subresources:
                new["status"] = old["status"]
            meta = dict(candidate.get("metadata") or {})
            for key in _IMMUTABLE_META:
                if key in old["metadata"]:
                    meta[key] = old["metadata"][key]
                else:
                    meta.pop(key, None)
            new["metadata"] = meta
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        old_finalizers = old["metadata"].get("finalizers") or []
        if old["metadata"].get("deletionTimestamp") and set(
            new["metadata"].get("finalizers") or []
        ) - set(old_finalizers):
            raise invalid(
                rdef,
                name,
                [
                    (
                        "metadata.finalizers",
                        "Forbidden: no new finalizers can be added if the object is being deleted",
                    )
                ],
            )
        new, warnings = self._admit(rdef, new, old, params)
        strip = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
        if strip(new) != strip(old) and "generation" in old["metadata"]:
            new["metadata"] = {**new["metadata"], "generation": old["metadata"]["generation"] + 1}
        if new == old:
            return Result(200, old, warnings)  # a no-op write: no new resourceVersion, no event
        if params.get("dryRun") == "All":
            return Result(200, new, warnings)
        okey = (old["metadata"].get("namespace"), name)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            stored = self._commit(rdef.key, okey, new, old, "DELETED")
            self._collect_garbage()
        else:
            stored = self._commit(rdef.key, okey, new, old, "MODIFIED")
        return Result(200, stored, warnings)

    def delete_object(
        self, rdef: ResourceDef, namespace: str | None, name: str, options: JSON
    ) -> Result:
        obj = self._get(rdef, namespace, name, None)
        meta = obj["metadata"]
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != meta["uid"]:
            raise conflict(
                rdef,
                name,
                f"Precondition failed: UID in precondition: {pre['uid']}, "
                f"UID in object meta: {meta['uid']}",
            )
        if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
            raise conflict(
                rdef,
                name,
                f"Precondition failed: ResourceVersion in precondition: "
                f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                f"{meta['resourceVersion']}",
            )
        warnings = []
        policy = options.get("propagationPolicy")
        if policy is None and str(options.get("orphanDependents")).lower() == "true":
            policy = "Orphan"
        if policy is None and rdef.key == ("batch", "jobs"):
            policy = "Orphan"  # batch/v1 keeps the old default; a real server warns about it
            warnings.append(
                "child pods are preserved by default when jobs are deleted; set "
                "propagationPolicy=Background to remove them or set propagationPolicy=Orphan "
                "to suppress this warning"
            )
        if policy not in (None, "Orphan", "Background", "Foreground"):
            raise invalid(rdef, name, [("propagationPolicy", f"Unsupported value: {policy!r}")])
        if meta.get("deletionTimestamp") or options.get("dryRun") in ("All", ["All"]):
            return Result(200, obj, warnings)
        if policy == "Orphan":
            self._orphan(meta["uid"])
        if rdef.key == ("", "namespaces"):
            self._empty_namespace(name)
        finalizers = list(meta.get("finalizers") or [])
        if policy == "Foreground" and "foregroundDeletion" not in finalizers:
            finalizers.append("foregroundDeletion")
        okey = (meta.get("namespace"), name)
        if finalizers:
            marked = {
                **obj,
                "metadata": {
                    **meta,
                    "finalizers": finalizers,
                    "deletionTimestamp": now_rfc3339(),
                    "deletionGracePeriodSeconds": 0,
                },
            }
            stored = self._commit(rdef.key, okey, marked, obj, "MODIFIED")
            if policy == "Foreground":
                for dep_rkey, dep_okey in self._dependents(meta["uid"]):
                    self._delete_key(dep_rkey, dep_okey)
                self._collect_garbage()
                self._finish_foreground(meta["uid"])
                self._collect_garbage()
            return Result(200, self._store[rdef.key].get(okey, stored), warnings)
        stored = self._commit(rdef.key, okey, obj, obj, "DELETED")
        self._collect_garbage()
        return Result(200, stored, warnings)

    def delete_collection(self, rdef: ResourceDef, namespace: str | None, options: JSON) -> Result:
        match = self.predicate(
            rdef, namespace, {k: v for k, v in options.items() if isinstance(v, str)}
        )
        items = [
            self.delete_object(
                rdef, o["metadata"].get("namespace"), o["metadata"]["name"], options
            ).body
            for o in self.stored_objects(rdef, namespace)
            if match(o)
        ]
        return Result(
            200,
            {
                "kind": f"{rdef.kind}List",
                "apiVersion": rdef.api_version,
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            },
            [],
        )

    # ------------------------------------------------------------------ garbage collection

    def _dependents(self, uid: str) -> list[tuple[tuple[str, str], ObjKey]]:
        return sorted(self._owned.get(uid, ()))

    def _owner_alive(self, ref: JSON, namespace: str | None) -> bool:
        found = self._uids.get(ref.get("uid", ""))
        if found is None:
            return False
        (_, okey) = found
        return okey[1] == ref.get("name") and okey[0] in (None, namespace)

    def _delete_key(self, rkey: tuple[str, str], okey: ObjKey) -> None:
        """Delete as the garbage collector does (background): mark if finalizers hold it."""
        obj = self._store[rkey].get(okey)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return
        if obj["metadata"].get("finalizers"):
            marked = {
                **obj,
                "metadata": {
                    **obj["metadata"],
                    "deletionTimestamp": now_rfc3339(),
                    "deletionGracePeriodSeconds": 0,
                },
            }
            self._commit(rkey, okey, marked, obj, "MODIFIED")
        else:
            self._commit(rkey, okey, obj, obj, "DELETED")

    def _collect_garbage(self) -> None:
        """Process deletions queued by `_commit`, cascading until nothing changes.

        Dependents whose owners are all gone are deleted (background propagation); owners
        waiting in foreground deletion lose `foregroundDeletion` once their dependents are gone.
        """
        while self._gc_queue:
            gone = self._gc_queue.popleft()
            for rkey, okey in self._dependents(gone["metadata"]["uid"]):
                obj = self._store[rkey].get(okey)
                if obj is not None and not any(
                    self._owner_alive(r, okey[0])
                    for r in obj["metadata"].get("ownerReferences") or []
                ):
                    self._delete_key(rkey, okey)
            for ref in gone["metadata"].get("ownerReferences") or []:
                self._finish_foreground(ref.get("uid", ""))

    def _finish_foreground(self, uid: str) -> None:
        found = self._uids.get(uid)
        if found is None or self._owned.get(uid):
            return
        rkey, okey = found
        obj = self._store[rkey][okey]
        finalizers = obj["metadata"].get("finalizers") or []
        if obj["metadata"].get("deletionTimestamp") and "foregroundDeletion" in finalizers:
            rest = [f for f in finalizers if f != "foregroundDeletion"]
            self._commit(
                rkey,
                okey,
                {**obj, "metadata": {**obj["metadata"], "finalizers": rest}},
                obj,
                "MODIFIED" if rest else "DELETED",
            )

    def collect_garbage(self) -> None:
        """A full sweep, as the garbage collector eventually does: delete objects whose owners are
        all gone, including dependents created with an owner that never existed."""
        for rkey, bucket in list(self._store.items()):
            for okey, obj in list(bucket.items()):
                refs = obj["metadata"].get("ownerReferences") or []
                if refs and not any(self._owner_alive(r, okey[0]) for r in refs):
                    self._delete_key(rkey, okey)
        self._collect_garbage()

    def _orphan(self, uid: str) -> None:
        for rkey, okey in self._dependents(uid):
            obj = self._store[rkey][okey]
            refs = [r for r in obj["metadata"]["ownerReferences"] if r.get("uid") != uid]
            self._commit(
                rkey,
                okey,
                {**obj, "metadata": {**obj["metadata"], "ownerReferences": refs}},
                obj,
                "MODIFIED",
            )

    def _empty_namespace(self, namespace: str) -> None:
        for rkey, bucket in list(self._store.items()):
            for okey in [k for k in bucket if k[0] == namespace]:
                self._delete_key(rkey, okey)
        self._collect_garbage()

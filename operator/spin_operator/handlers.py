"""The thin kopf layer and `spinctl operator`.

Only watch handlers (`@kopf.on.event`) are registered: they feed the Controller's caches and
never make kopf write anything (no progress annotations, no kopf finalizer). The Controller owns
every decision and write; the operator's own finalizer exists only on runs with
`retention.onDelete: Delete` (docs/operations.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import kopf

    from spin_operator.controller import Controller
    from spin_operator.settings import Settings

log = logging.getLogger(__name__)


def login(**_: Any) -> Any:
    """In-cluster service account, else kubeconfig (KUBECONFIG or ~/.kube/config)."""
    import kopf

    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
        settings=settings
    )
    if info is None:
        raise kopf.LoginError(
            "no service account token and no kubeconfig: cannot reach the API server"
        )
    return info


def build_registry(controller: Controller) -> kopf.OperatorRegistry:
    """A registry with the operator's handlers bound to `controller` (tests build their own)."""
    import kopf

    from spin_operator.api import types as api
    from spin_operator.leader import LeaseElector, default_identity
    from spin_operator.naming import MANAGED_BY, MANAGED_BY_LABEL
    from spin_operator.resync import JOB_SELECTOR

    registry = kopf.OperatorRegistry()
    electors: list[LeaseElector] = []
    tasks: list[asyncio.Task[None]] = []

    @kopf.on.login(registry=registry)
    def authenticate(**kwargs: Any) -> Any:
        info = login(**kwargs)
        controller.kube.use(info)
        return info

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.INFO  # only the events the reconciler decides
        settings.watching.server_timeout = 600
        # Server-side filtering: the `labels=` of a handler only filters on the client, after the
        # API server sent every Job of the cluster; this selector makes the list and the watch
        # carry `labelSelector`, so only the operator's own Jobs travel. Lists come in pages.
        settings.watching.label_selectors["batch", "v1", "jobs"] = JOB_SELECTOR
        settings.watching.chunk_size = controller.settings.list_chunk_size
        await controller.prime()
        controller.start_resync()
        if controller.settings.leader_election:
            s = controller.settings
            identity = s.lease_identity or default_identity()
            elector = LeaseElector(
                controller.kube, s.lease_namespace, s.lease_name, identity, s.lease_seconds
            )
            electors.append(elector)
            tasks.append(asyncio.create_task(elector.run(controller.lead), name="leader election"))

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        for task in tasks:
            task.cancel()
        controller.leading = False  # nothing new starts while it stops
        await controller.close()
        for elector in electors:  # after close(): the Lease is given up once nothing reconciles
            await elector.release()
            await controller.kube.close()

    @kopf.on.event(api.GROUP, api.VERSION, api.PLURAL, registry=registry)
    async def spinrun_event(event: Any, **_: Any) -> None:
        controller.on_run(event.get("type"), event["object"])

    @kopf.on.event("batch", "v1", "jobs", labels={MANAGED_BY_LABEL: MANAGED_BY}, registry=registry)
    async def job_event(event: Any, **_: Any) -> None:
        controller.on_job(event.get("type"), event["object"])

    return registry


def make_controller(settings: Settings, **kwargs: Any) -> Controller:
    from spin_operator.controller import Controller
    from spin_operator.kube import Kube

    return Controller(settings, Kube(login), **kwargs)


def operator_kwargs(settings: Settings) -> dict[str, Any]:
    """kopf.operator()/kopf.run() arguments for these settings (namespaces, liveness probe)."""
    return {
        "standalone": True,  # no kopf peering objects: replicas coordinate through a Lease (leader.py)
        "clusterwide": settings.clusterwide,
        "namespaces": list(settings.namespaces),
        "liveness_endpoint": f"http://0.0.0.0:{settings.health_port}/healthz"
        if settings.health_port
        else None,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace",
        action="append",
        default=None,
        metavar="NS",
        help="watch only this namespace (repeatable; default: SPIN_NAMESPACES, else all)",
    )


def run(args: argparse.Namespace) -> int:
    """`spinctl operator`: run until SIGTERM/SIGINT."""
    import dataclasses

    import kopf

    from spin_operator.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "namespace", None):
        settings = dataclasses.replace(settings, namespaces=tuple(args.namespace))
    logging.getLogger().setLevel(settings.log_level)
    for noisy in ("kopf.objects", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))
    controller = make_controller(settings)
    controller.metrics.serve(settings.metrics_port)
    log.info(
        "spin-operator: %s",
        "all namespaces" if settings.clusterwide else ", ".join(settings.namespaces),
    )
    kopf.run(registry=build_registry(controller), **operator_kwargs(settings))
    return 0

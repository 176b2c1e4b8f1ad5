"""The Kubernetes API helpers every Forgeline controller and the ``target: kubernetes`` stages use: load
a configuration (a kubeconfig file, ``$KUBECONFIG`` or in-cluster), server-side apply through the dynamic
client with one field manager (``forgeline-operator``), owner references, status patches, reads and
deletes that treat 404 as "absent", API discovery (``has_api``) and polling with a deadline
(``wait_for``). No kopf here; the Kubernetes client is imported lazily so importing this module is cheap.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "FIELD_MANAGER",
    "Kube",
    "NoCluster",
    "connect",
    "owner_reference",
    "wait_for",
]

FIELD_MANAGER = "forgeline-operator"
T = TypeVar("T")


class NoCluster(RuntimeError):
    """No Kubernetes cluster is configured for this process."""


def _config_files(kubeconfig: str | Path | None) -> list[Path]:
    if kubeconfig:
        return [Path(kubeconfig).expanduser()]
    env = os.environ.get("KUBECONFIG")
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    return [Path("~/.kube/config").expanduser()]


def connect(kubeconfig: str | Path | None = None, context: str | None = None) -> Kube:
    """A :class:`Kube` for the configured cluster: ``kubeconfig`` (or ``$KUBECONFIG``, ``~/.kube/config``),
    else the in-cluster service account. Raises :class:`NoCluster` naming what was looked for."""
    from kubernetes import client, config

    files = _config_files(kubeconfig)
    existing = [f for f in files if f.is_file()]
    if existing:
        api = config.new_client_from_config(config_file=str(existing[0]), context=context)
        return Kube(api)
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return Kube(client.ApiClient(cfg))
    raise NoCluster(
        f"no Kubernetes cluster configured: no kubeconfig at {', '.join(map(str, files))} and not running "
        "in a pod (KUBERNETES_SERVICE_HOST unset); set KUBECONFIG (or pass a kubeconfig path), or use a "
        "local target instead of `target: kubernetes`"
    )


_DISCOVERY_DIR: list[str] = []


def _discovery_file() -> str:
    import atexit
    import shutil
    import tempfile
    import uuid

    if not _DISCOVERY_DIR:
        folder = tempfile.mkdtemp(prefix="forgeline-kube-discovery-")
        atexit.register(shutil.rmtree, folder, True)
        _DISCOVERY_DIR.append(folder)
    return os.path.join(_DISCOVERY_DIR[0], f"{uuid.uuid4().hex}.json")


def owner_reference(parent: dict[str, Any], controller: bool = True) -> dict[str, Any]:
    """The ownerReference that makes an object a garbage-collected child of ``parent`` (as read back)."""
    meta = parent["metadata"]
    if not meta.get("uid"):
        raise ValueError(
            f"{parent.get('kind')} {meta.get('name')} has no uid yet: read it from the server first"
        )
    return {
        "apiVersion": parent["apiVersion"],
        "kind": parent["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": controller,
        "blockOwnerDeletion": True,
    }


def wait_for(
    probe: Callable[[], T | None],
    timeout_s: float,
    what: str,
    interval_s: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``probe`` until it returns something truthy, and return that; ``TimeoutError`` naming ``what``
    (and the last value seen) at the deadline."""
    end = time.monotonic() + timeout_s
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what} (last seen: {last!r})")
        sleep(min(interval_s, left))


@dataclass
class Kube:
    """One API connection with its (lazily discovered) dynamic client."""

    api: Any
    _dyn: Any = field(default=None, repr=False)

    @property
    def dynamic(self) -> Any:
        if self._dyn is None:
            from kubernetes import dynamic

            # The client's default discovery cache is one file per API host shared by every process
            # (in $TMPDIR), so a CRD removed or added by someone else stays wrong there until it
            # expires: each connection discovers afresh into a file of its own.
            self._dyn = dynamic.DynamicClient(self.api, cache_file=_discovery_file())
        return self._dyn

    def resource(self, api_version: str, kind: str) -> Any:
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def has_api(self, group_version: str, kind: str) -> bool:
        """Whether the server serves ``kind`` in ``group_version`` (e.g. ``autoscaling/v2``,
        ``HorizontalPodAutoscaler``); discovery is refreshed once on a miss (a CRD just installed)."""
        from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError

        try:
            self.resource(group_version, kind)
        except (ResourceNotFoundError, NotFoundError):
            # NotFoundError: the group is still listed but its version 404s (a CRD being deleted).
            return False
        return True

    def apply(
        self, obj: dict[str, Any], field_manager: str = FIELD_MANAGER, force: bool = True
    ) -> dict[str, Any]:
        """Server-side apply ``obj`` as ``field_manager``; returns the object as stored."""
        res = self.resource(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        out = res.server_side_apply(
            body=obj,
            name=meta["name"],
            namespace=meta.get("namespace"),
            field_manager=field_manager,
            force_conflicts=force,
        )
        if out is None:  # kubernetes==37 returns None when SSA creates a custom object (FACTS.md)
            got = self.get(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"))
            if got is None:
                raise RuntimeError(f"applied {obj['kind']} {meta['name']} but cannot read it back")
            return got
        return dict(out.to_dict())

    def get(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        from kubernetes.dynamic.exceptions import NotFoundError

        try:
            return dict(self.resource(api_version, kind).get(name=name, namespace=namespace).to_dict())
        except NotFoundError:
            return None

    def list(
        self, api_version: str, kind: str, namespace: str | None = None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        got = self.resource(api_version, kind).get(namespace=namespace, label_selector=label_selector)
        return [dict(i) for i in got.to_dict()["items"]]

    def delete(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None = None,
        propagation: str = "Background",
    ) -> bool:
        """Delete (children by ``propagation``); False when it was already gone."""
        from kubernetes.dynamic.exceptions import NotFoundError

        try:
            self.resource(api_version, kind).delete(
                name=name, namespace=namespace, body={"propagationPolicy": propagation}
            )
        except NotFoundError:
            return False
        return True

    def patch_status(self, obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch the ``status`` subresource of ``obj`` (keys set to None are removed)."""
        res = self.resource(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        out = res.status.patch(
            body={"status": status},
            name=meta["name"],
            namespace=meta.get("namespace"),
            content_type="application/merge-patch+json",
        )
        return dict(out.to_dict())

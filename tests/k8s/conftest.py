"""Fixtures of the ``k8s`` tier: one real control plane per session (:mod:`kube_cluster`), a kubernetes
API client on it, and a fresh namespace per test. The binaries come from ``scripts/kube_binaries.sh``
and are never built here: without them the tier fails in CI (``CI=true``) and skips elsewhere, each
time naming the command that builds them."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kube_cluster import Cluster, binaries_dir, require_binaries

# Timings of the tier (fixture start-up), printed in the terminal summary for the report.
TIMINGS: dict[str, float] = {}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/k8s needs the control plane: marked k8s even if a module forgets pytestmark.
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.k8s)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.write_line(
            "k8s control plane: " + ", ".join(f"{k}={v:.1f}s" for k, v in sorted(TIMINGS.items()))
        )


@pytest.fixture(scope="session")
def kube_bin_dir() -> Path:
    return require_binaries(binaries_dir(), os.environ.get("CI") == "true")


@pytest.fixture(scope="session")
def kube(kube_bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A running etcd + kube-apiserver + kube-controller-manager; ``KUBECONFIG`` points at it."""
    cluster = Cluster(kube_bin_dir, tmp_path_factory.mktemp("kube"))
    old = os.environ.get("KUBECONFIG")
    try:
        cluster.start(before_controllers=_install_crds)
        TIMINGS.update(cluster.timings)
        os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
        # The client reads $KUBECONFIG once, at import (already done by collection): kopf's login
        # through the client (load_kube_config()) needs the module default pointed here too.
        from kubernetes.config import kube_config

        old_default = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(cluster.kubeconfig)
        yield cluster
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = old_default
    finally:
        t0 = time.monotonic()
        cluster.stop()
        TIMINGS.update(cluster.timings)
        TIMINGS["stop_s"] = time.monotonic() - t0
        if old is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old


@pytest.fixture(scope="session")
def api_client(kube: Cluster) -> Iterator[object]:
    from kubernetes import client, config

    c = config.new_client_from_config(config_file=str(kube.kubeconfig))
    yield c
    c.close()
    del client


@pytest.fixture
def namespace(api_client: object, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of its own for each test, deleted afterwards (the namespace controller empties it)."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)  # type: ignore[arg-type]
    name = f"t-{request.node.name[:40].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:6]}"
    name = "".join(ch for ch in name if ch.isalnum() or ch == "-")
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


def _install_crds(cluster: Cluster) -> None:
    import crds as crd_files
    from kubernetes import config

    t0 = time.monotonic()
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    try:
        cluster.crds = crd_files.install(api, crd_files.crd_documents())
    finally:
        api.close()
    TIMINGS["crds_s"] = time.monotonic() - t0


@pytest.fixture(scope="session")
def crds(kube: Cluster) -> list[str]:
    """The forgeline.dev CRDs, installed at start-up before the controller manager (for the GC)."""
    return kube.crds


@pytest.fixture
def kuberay_crd(api_client: object) -> Iterator[None]:
    """KubeRay's RayJob CRD (v1.7.0 schema) for one test; the KubeRay operator itself is not run."""
    import crds as crd_files
    from kubernetes import client

    from forgeline_operators.lib.kube_client import Kube, wait_for

    ext = client.ApiextensionsV1Api(api_client)  # type: ignore[arg-type]

    def gone() -> bool:
        try:
            ext.read_custom_resource_definition("rayjobs.ray.io")
        except client.ApiException as e:
            return e.status == 404
        return False

    ext.create_custom_resource_definition(crd_files.rayjob_crd())
    objects = client.CustomObjectsApi(api_client)  # type: ignore[arg-type]

    def served() -> bool:
        # A real request (not possibly cached discovery), then discovery itself: right after a CRD is
        # (re)created the server can answer /apis/ray.io/v1/rayjobs while /apis/ray.io/v1 still says
        # 404 (seen in CI), and the dynamic client resolves kinds through the latter.
        try:
            objects.list_cluster_custom_object("ray.io", "v1", "rayjobs")
        except client.ApiException:
            return False
        return Kube(api_client).has_api("ray.io/v1", "RayJob")  # a fresh discovery each time

    wait_for(served, 30, "RayJob CRD served")
    yield
    ext.delete_custom_resource_definition("rayjobs.ray.io")
    wait_for(gone, 60, "the RayJob CRD deleted (its objects go first)")

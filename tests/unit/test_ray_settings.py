"""How Forgeline starts or joins Ray (issue 24): the embedded Ray on loopback without a dashboard, a
cluster joined by address with Ray's own authentication left as the cluster has it."""

from __future__ import annotations

from typing import Any

import pytest

from forgeline.runtime._ray import RaySettings, ensure_ray


@pytest.fixture
def init_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    import ray

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    return calls


def test_embedded_ray_is_loopback_only_without_a_dashboard(
    init_calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    assert ensure_ray(RaySettings(num_cpus=2)) is True
    (kw,) = init_calls
    assert kw["_node_ip_address"] == "127.0.0.1" and kw["dashboard_host"] == "127.0.0.1"
    assert kw["include_dashboard"] is False
    assert (
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
    )
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


def test_an_explicit_auth_mode_is_kept_for_the_embedded_ray(
    init_calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    ensure_ray(RaySettings())
    assert os.environ["RAY_AUTH_MODE"] == "token"


def test_a_cluster_keeps_its_authentication(init_calls: list[dict[str, Any]]) -> None:
    import os

    ensure_ray(RaySettings(address="ray://head:10001"))
    (kw,) = init_calls
    assert kw == {"address": "ray://head:10001", "log_to_driver": False}
    assert "RAY_AUTH_MODE" not in os.environ  # Ray's default (token auth where the cluster has a token)
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ  # workers must reach the driver

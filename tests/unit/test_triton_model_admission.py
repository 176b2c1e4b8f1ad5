"""The CPU engine model's admission (serve/triton_model.py) with the engine faked: a batch that Triton
hands to ``execute`` enters the engine at one step boundary, however long parsing takes.

The real ``step()`` holds the GIL, so ``execute`` runs between steps; here a fake pipeline stands in and
parsing is slowed down (it sleeps, releasing the GIL) so that an engine thread free to step would step
between two requests of the batch. tritonserver is not needed: ``triton_python_backend_utils`` is faked.
"""

from __future__ import annotations

import importlib.util
import json
import queue
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest

MODEL_PY = Path(__file__).resolve().parents[2] / "operators/forgeline_operators/serve/triton_model.py"


class _Handle:
    def can_read(self) -> bool:
        return False

    def get_status(self) -> str:
        return "RUNNING"


class _Pipe:
    """Records at which step each request was added; every step takes 10 ms."""

    def __init__(self) -> None:
        self.steps = 0
        self.added_at: dict[int, int] = {}

    def add_request(self, rid: int, prompt: Any, cfg: Any) -> _Handle:
        self.added_at[rid] = self.steps
        return _Handle()

    def step(self) -> None:
        time.sleep(0.01)
        self.steps += 1

    def has_non_finished_requests(self) -> bool:
        return bool(self.added_at)

    def get_metrics(self) -> Any:
        return types.SimpleNamespace(cache_usage=0.0)


class _Metric:
    def set(self, value: float) -> None: ...

    def increment(self, value: float) -> None: ...


def _load_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    """serve/triton_model.py as Triton's python stub loads it, with ``triton_python_backend_utils`` faked."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("forgeline_test_triton_model", MODEL_PY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> Any:
    module = _load_module(monkeypatch)
    m = module.TritonPythonModel()  # initialize() needs an IR and a server: set what the loop uses
    m.pipe, m._ov = _Pipe(), types.SimpleNamespace(GenerationStatus=types.SimpleNamespace(RUNNING="RUNNING"))
    m._events_per_s, m._tokens, m._steps, m._cancelled, m._published, m._dirty = 500.0, 0, 0, 0, 0.0, False
    m._queue, m._outbox = queue.Queue(), queue.Queue()
    m._stop, m._draining = threading.Event(), threading.Event()
    m._admission, m._executed, m._last_step_s, m._next_id = threading.Lock(), threading.Event(), 0.0, 0
    m._m_kv = m._m_running = m._m_tokens = m._m_steps = m._m_cancelled = _Metric()

    def slow_parse(request: Any, sender: Any) -> tuple[Any, Any, Any]:
        time.sleep(0.005)  # releases the GIL, as the real parse does at each switch interval
        m._next_id += 1
        return module._Live(rid=m._next_id, sender=sender, request=request, stream=True, max_tokens=8,
                            prompt_tokens=3), None, None  # fmt: skip

    m._parse = slow_parse
    thread = threading.Thread(target=m._engine, daemon=True)
    thread.start()
    yield m
    m._stop.set()
    thread.join(timeout=5)


class _Request:
    def get_response_sender(self) -> object:
        return object()


def test_a_batch_enters_the_engine_at_one_step(model: Any) -> None:
    model.execute([_Request()])  # one request running: the engine steps continuously
    deadline = time.monotonic() + 5
    while model.pipe.steps < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert model.pipe.steps >= 3
    model.execute([_Request() for _ in range(10)])  # 50 ms of parsing, 5 steps' worth
    deadline = time.monotonic() + 5
    while len(model.pipe.added_at) < 11 and time.monotonic() < deadline:
        time.sleep(0.005)
    batch = [model.pipe.added_at[rid] for rid in range(2, 12)]
    assert len(set(batch)) == 1, batch  # without the admission lock: spread over ~5 steps


def test_the_engine_waits_a_grace_period_for_the_next_batch(model: Any) -> None:
    model.execute([_Request()])
    deadline = time.monotonic() + 5
    while model.pipe.steps < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    # Two batches back to back, as Triton hands them over: the second comes after the first's execute
    # returned, within the grace period (here 0.5 ms: 5 % of a 10 ms step), so both join the same step.
    done = threading.Event()

    def triton() -> None:
        model.execute([_Request() for _ in range(3)])
        time.sleep(0.0002)
        model.execute([_Request() for _ in range(3)])
        done.set()

    threading.Thread(target=triton).start()
    assert done.wait(5)
    deadline = time.monotonic() + 5
    while len(model.pipe.added_at) < 7 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len({model.pipe.added_at[rid] for rid in range(2, 8)}) == 1, model.pipe.added_at


@pytest.mark.parametrize(("threads", "cpus"), [(1, {0, 1}), (2, {0})])
def test_bf16_on_one_thread_fails_the_load_with_a_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, threads: int, cpus: set[int]
) -> None:
    """OpenVINO 2026.4 kills the stub (SIGFPE) compiling a one-thread bf16 model, and it clamps the
    threads to the CPUs the process may use: a hand-written config, or a 2-thread model pinned to one
    CPU, must fail the load with the reason before OpenVINO is asked to compile anything."""
    module = _load_module(monkeypatch)
    monkeypatch.setattr(module.os, "sched_getaffinity", lambda pid: cpus)
    params = {"inference_precision": {"string_value": "bf16"}, "num_threads": {"string_value": str(threads)}}
    config = json.dumps({"name": "m", "parameters": params})
    with pytest.raises(RuntimeError, match="2 or more engine threads on 2 or more CPUs"):
        module.TritonPythonModel().initialize(
            {"model_config": config, "model_repository": str(tmp_path), "model_version": "1"}
        )

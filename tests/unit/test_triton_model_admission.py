"""The CPU engine model (engines/openvino/triton_model.py) without a server: its admission with the
engine faked (a batch that Triton hands to ``execute`` enters the engine at one step boundary, however
long parsing takes), its refusal of one-thread bf16, and its incremental detokenisation with the real
tokenizer.

The real ``step()`` holds the GIL, so ``execute`` runs between steps; here a fake pipeline stands in and
parsing is slowed down (it sleeps, releasing the GIL) so that an engine thread free to step would step
between two requests of the batch. tritonserver is not needed: ``triton_python_backend_utils`` is faked.
"""

from __future__ import annotations

import importlib.util
import json
import queue
import random
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest

MODEL_PY = (
    Path(__file__).resolve().parents[2] / "operators/forgeline_operators/engines/openvino/triton_model.py"
)


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
    """engines/openvino/triton_model.py as Triton's python stub loads it (``triton_python_backend_utils``
    faked)."""
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


def _stream(module: Any, ids: list[int]) -> tuple[list[tuple[int, str]], str]:
    """Feed ``ids`` one token at a time as the sender does: (tokens so far, text) per non-empty delta,
    and what the final response adds."""
    from tokenizers import Tokenizer

    from forgeline_operators.models.tiny_llama import CHECKPOINT_DIR

    tok = Tokenizer.from_file(str(CHECKPOINT_DIR / "tokenizer.json"))
    m = module.TritonPythonModel()
    m._decode = lambda part: tok.decode(part, skip_special_tokens=True)
    live = module._Live(rid=1, sender=None, request=None, stream=True, max_tokens=len(ids), prompt_tokens=1)
    deltas = []
    for upto in range(1, len(ids) + 1):
        live.ids = ids[:upto]
        if text := m._incremental(live, upto):
            deltas.append((upto, text))
    sent = "".join(t for _, t in deltas)
    whole = m._decode(ids)
    rest = whole[len(sent) :] if whole.startswith(sent) else m._incremental(live, len(ids), flush=True)
    return deltas, rest


def test_streamed_text_equals_the_full_decode_for_multibyte_characters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tokenizers import Tokenizer

    from forgeline_operators.models.tiny_llama import CHECKPOINT_DIR

    tok = Tokenizer.from_file(str(CHECKPOINT_DIR / "tokenizer.json"))
    text = "héllo wörld 😀 ok"  # é and ö: 2 byte tokens each, the emoji 4
    ids = tok.encode(text, add_special_tokens=False).ids
    deltas, rest = _stream(_load_module(monkeypatch), ids)
    assert "".join(t for _, t in deltas) + rest == text
    assert "\ufffd" not in "".join(t for _, t in deltas)  # never a half character on the wire


def test_bytes_that_never_form_utf8_do_not_stall_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lone UTF-8 lead byte repeated (what the ~30M bench model emitted): before, nothing streamed
    until the last token; now the bytes go out as U+FFFD after a bounded wait, and text after them
    streams as it comes."""
    from tokenizers import Tokenizer

    from forgeline_operators.models.tiny_llama import CHECKPOINT_DIR

    tok = Tokenizer.from_file(str(CHECKPOINT_DIR / "tokenizer.json"))
    module = _load_module(monkeypatch)
    head = tok.encode("hello", add_special_tokens=False).ids
    junk = [tok.token_to_id("Ë")] * 12  # 0xCB: starts a 2-byte character, never continued
    tail = tok.encode(" world and more words", add_special_tokens=False).ids
    deltas, rest = _stream(module, head + junk + tail)
    streamed = "".join(t for _, t in deltas)
    assert streamed.startswith("hello")
    assert next(n for n, t in deltas if "\ufffd" in t) <= len(head) + 9  # within 8 tokens of waiting
    assert " world" in streamed  # before the final response
    assert (streamed + rest).endswith(" world and more words")
    # A request whose output ends in such bytes: before, its stream stayed silent to the last token.
    deltas, rest = _stream(module, head + junk)
    assert next(n for n, t in deltas if "\ufffd" in t) <= len(head) + 9
    assert "".join(t for _, t in deltas) + rest == tok.decode(head + junk)


class _TokenHandle:
    """A request that makes one token per step for ``n`` steps."""

    def __init__(self, pipe: _GilPipe, n: int) -> None:
        self.pipe, self.n, self.read_upto = pipe, n, 0

    def _made(self) -> int:
        return min(self.n, self.pipe.steps)

    def can_read(self) -> bool:
        return self._made() > self.read_upto

    def read(self) -> dict[int, Any]:
        ids = list(range(self.read_upto, self._made()))
        self.read_upto = self._made()
        return {0: types.SimpleNamespace(generated_ids=ids)}

    def get_status(self) -> str:
        return "FINISHED" if self.pipe.steps >= self.n else "RUNNING"


class _GilPipe(_Pipe):
    """Each step holds the GIL for ~20 ms, as OpenVINO GenAI's does (list.sort of ints runs no bytecode)."""

    def __init__(self) -> None:
        super().__init__()
        self.data = [random.random() for _ in range(150_000)]
        self.step_ends: list[float] = []

    def add_request(self, rid: int, prompt: Any, cfg: Any) -> Any:
        self.added_at[rid] = self.steps
        return _TokenHandle(self, 40)

    def step(self) -> None:
        sorted(self.data)
        self.steps += 1
        self.step_ends.append(time.monotonic())

    def has_non_finished_requests(self) -> bool:
        return self.steps < 40


class _Sender:
    def __init__(self) -> None:
        self.sent: list[float] = []

    def send(self, response: Any, flags: int = 0) -> None:
        time.sleep(0.0002)  # the IPC round trip: the real send releases the GIL while it waits
        self.sent.append(time.monotonic())

    def is_cancelled(self) -> bool:
        time.sleep(0.0002)
        return False


def test_the_sender_keeps_up_with_a_gil_holding_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """20 streams: every one gets its first response within a few steps of its first token. Before the
    engine let the sender run between steps, each send's IPC handed the GIL back to the engine, which
    then held it for a whole step: about one response per step, a backlog of seconds."""
    module = _load_module(monkeypatch)
    pb = sys.modules["triton_python_backend_utils"]
    pb.Tensor = lambda name, array: (name, array)  # type: ignore[attr-defined]
    pb.InferenceResponse = lambda output_tensors=None, error=None: output_tensors  # type: ignore[attr-defined]
    m = module.TritonPythonModel()
    m.pipe = _GilPipe()
    status = types.SimpleNamespace(RUNNING="RUNNING", FINISHED="FINISHED")
    m._ov = types.SimpleNamespace(GenerationStatus=status)
    m._events_per_s, m._tokens, m._steps, m._cancelled, m._published, m._dirty = 500.0, 0, 0, 0, 0.0, False
    m._queue, m._outbox = queue.Queue(), queue.Queue()
    m._stop, m._draining = threading.Event(), threading.Event()
    m._admission, m._executed, m._last_step_s, m._next_id = threading.Lock(), threading.Event(), 0.0, 0
    m._m_kv = m._m_running = m._m_tokens = m._m_steps = m._m_cancelled = _Metric()
    m._decode, m._eos = (lambda ids: "x" * len(ids)), -1
    senders = [_Sender() for _ in range(20)]
    for rid, sender in enumerate(senders, 1):
        live = module._Live(rid=rid, sender=sender, request=None, stream=True, max_tokens=40, prompt_tokens=3)
        m._queue.put((live, None, None))
    sender_thread = threading.Thread(target=m._send_loop, daemon=True)
    sender_thread.start()
    m._engine_thread = threading.Thread(target=m._engine, daemon=True)
    m._engine_thread.start()
    deadline = time.monotonic() + 30
    while m.pipe.steps < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    m._stop.set()
    m._engine_thread.join(timeout=10)
    m._outbox.put(None)
    sender_thread.join(timeout=10)
    ends = m.pipe.step_ends
    assert len(ends) >= 40
    late = [s.sent[0] for s in senders if not s.sent or s.sent[0] > ends[4]]
    assert not late, f"{len(late)} of 20 streams got no response within 4 steps of their first token"

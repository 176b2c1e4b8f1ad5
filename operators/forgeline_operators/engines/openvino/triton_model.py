"""Triton python-backend model: OpenVINO GenAI continuous batching, fed one engine step at a time.

Copied verbatim into a model repository as ``<model>/1/model.py`` by :mod:`.repository`; it runs in
Triton's python stub, so it imports nothing from Forgeline. The model is *decoupled*: ``execute``
only parses each request and queues it; one engine thread owns the ``ContinuousBatchingPipeline`` and
loops ``add_request`` (new arrivals join the running batch) → ``step`` → ``read`` (stream each
request's new tokens) → drop finished or cancelled requests. Per-request sampling parameters become a
``GenerationConfig``; a request whose client went away is cancelled in the engine, which frees its KV
blocks on the next step.

Inputs (all optional; one of ``text_input`` / ``messages``): ``text_input``, ``messages`` (JSON list
of chat messages, rendered with the tokenizer's chat template), ``max_tokens``, ``temperature``,
``top_p``, ``top_k``, ``seed``, ``stop`` (strings), ``ignore_eos``, ``stream``, ``lora_name``.
Outputs: ``text_output`` (the new text), ``output_ids`` (the new token ids), ``finish_reason``
(empty until the last response), ``prompt_tokens``, ``completion_tokens``.

OpenVINO GenAI's ``step()`` holds the GIL for the whole step (2026.4 binding; measured: a spinning
Python thread gets no iteration during a 0.4 s step), so no Python runs in this process while the
engine computes: requests are parsed (``execute``) and responses sent *between* steps. Two things
follow. The model is batched in Triton (``dynamic_batching``, see repository.py), so every request
that arrived during a step enters in one ``execute`` after it; with one request per ``execute``, 64
simultaneous requests took ~4 s to enter the engine. And the Python work between steps is kept
short: the engine thread makes only engine calls (``add_request``, ``step``, ``read``, ``cancel``)
and queues what each request should receive; a second thread (``forgeline-sender``) decodes text,
builds the responses, sends them and polls cancellation (measured on the ~30M model, 64 streams:
1.5-1.8 ms between two steps, ~3 % of the run):

- every call into the server (``send``, ``is_cancelled``, metric updates) is an IPC round trip, so they
  are rate-limited: streaming responses are coalesced so that all live requests *together* get at most
  ``max_stream_events_per_s`` responses (a lone stream still gets each token as it is made; under load
  one response carries several tokens); cancellation is polled round-robin at a bounded rate;
  metrics are published at most every 100 ms and once more when the engine goes idle;
- text is detokenised incrementally (only the tokens since the last response, with a few tokens of
  look-back) with the HF ``tokenizers`` decoder when the IR ships ``tokenizer.json``; the last
  response checks the streamed text against one decode of the whole output, so streamed text always
  equals the non-streamed text; a non-streaming request is decoded once, at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
DEFAULT_MAX_TOKENS = 64
DEFAULT_EVENTS_PER_S = 500.0  # streaming responses per second, all live requests together
CANCEL_CHECKS_PER_S = 200.0  # is_cancelled() round trips per second, all live requests together
MIN_CANCEL_CHECK_S = 0.02
METRICS_INTERVAL_S = 0.1
LOOKBACK_TOKENS = 4
# Longest wait for text to become clean UTF-8: a character spans at most 4 bytes, so past this the
# bytes will never form text (see _incremental).
MAX_PENDING_TOKENS = 8
# How long the engine waits before a step for more requests after an execute() (see _await_arrivals).
GRACE_FRACTION = 0.05  # of the last step's time
MIN_GRACE_S, MAX_GRACE_S = 0.0005, 0.005
MAX_ARRIVAL_WAIT_S = 0.02
# After a step, the engine lets the sender thread send what the step produced, for at most this
# share of the step's time (at least MIN_SENDER_WAIT_S), polling every SENDER_POLL_S (see _let_sender_run).
SENDER_SHARE = 0.1
MIN_SENDER_WAIT_S = 0.002
SENDER_POLL_S = 0.0002


@dataclass
class _Live:
    """One request inside the engine."""

    rid: int
    sender: Any
    request: Any
    stream: bool
    max_tokens: int
    prompt_tokens: int
    handle: Any = None
    ids: list[int] = field(default_factory=list)
    sent_ids: int = 0  # ids[:sent_ids] went out in responses
    read_offset: int = 0  # ids[:read_offset] are already turned into text
    sent_text: list[str] = field(default_factory=list)  # streaming: text already sent
    last_send: float = 0.0  # engine thread: when it last queued a streamed response
    queued_ids: int = 0  # engine thread: ids[:queued_ids] are queued for the sender
    next_cancel_check: float = 0.0  # engine thread: when to queue its next cancellation poll
    cancel_requested: bool = False  # sender thread: the client went away (the engine cancels)
    cancelled: bool = False


def _param(params: dict[str, Any], key: str, default: str) -> str:
    value = params.get(key, {}).get("string_value", "")
    return value if value not in ("", None) else default


def _scalar(request: Any, name: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    arr = tensor.as_numpy().reshape(-1)
    if arr.size == 0:
        return None
    value = arr[0]
    return value.decode("utf-8") if isinstance(value, bytes) else value.item()


def _strings(request: Any, name: str) -> list[str]:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return []
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in tensor.as_numpy().reshape(-1)]


def _is_cancelled(live: _Live) -> bool:
    checker = getattr(live.sender, "is_cancelled", None) or getattr(live.request, "is_cancelled", None)
    try:
        return bool(checker()) if checker else False
    except Exception:  # the request object may already be released by the server
        return True


def _codec(engine_dir: Path, ov_tokenizer: Any) -> tuple[Any, Any]:
    """(encode, decode) with the HF ``tokenizers`` library when the IR ships ``tokenizer.json``.

    ``encode(text, add_special_tokens) -> input_ids tensor`` and ``decode(ids) -> str``. HF's are much
    cheaper per call than OpenVINO's tokenizer models and run in the calling thread. The encoder is
    used only if it gives OpenVINO's ids on probe strings (the IR's tokenizer is a conversion of the
    same tokenizer.json); otherwise, and without tokenizer.json, OpenVINO's (exact, slower) are used.
    """

    def ov_encode(text: str, special: bool) -> Any:
        return ov_tokenizer.encode(text, add_special_tokens=special).input_ids

    def ov_decode(ids: list[int]) -> str:
        return str(ov_tokenizer.decode(ids, skip_special_tokens=True))

    path = engine_dir / "tokenizer.json"
    if not path.exists():
        return ov_encode, ov_decode
    import openvino as ov
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(path))

    def hf_encode(text: str, special: bool) -> Any:
        return ov.Tensor(np.array([hf.encode(text, add_special_tokens=special).ids], dtype=np.int64))

    def hf_decode(ids: list[int]) -> str:
        return str(hf.decode(ids, skip_special_tokens=True))

    probes = ["Hello, world!", " leading space", "héllo wörld 😀\n\tend", "", "1234 + 5678 = ?"]
    same = all(
        list(hf_encode(t, sp).data[0]) == list(ov_encode(t, sp).data[0])
        for t in probes
        for sp in (True, False)
    )
    return (hf_encode if same else ov_encode), hf_decode


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import openvino_genai as ov_genai

        self._ov = ov_genai
        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        self.name = config.get("name", "model")
        version_dir = Path(args["model_repository"]) / args["model_version"]
        engine_dir = Path(_param(params, "engine_dir", "engine"))
        if not engine_dir.is_absolute():
            engine_dir = version_dir / engine_dir
        threads = int(_param(params, "num_threads", "1"))
        precision = _param(params, "inference_precision", "f32")
        cpus = len(os.sched_getaffinity(0))
        if precision == "bf16" and min(threads, cpus) < 2:
            # OpenVINO 2026.4 kills the process (SIGFPE) compiling a bf16 model on one thread, and it
            # clamps the threads to the CPUs the process may use (seen under taskset -c 0): fail the
            # load with a reason instead (openvinotoolkit/openvino#33300).
            raise RuntimeError(
                f"inference_precision bf16 needs 2 or more engine threads on 2 or more CPUs; this model "
                f"has num_threads {threads} and the process may use {cpus} CPU(s) (OpenVINO 2026.4 "
                "crashes compiling a one-thread bf16 model): serve with inference_precision f32"
            )
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        # step() holds the GIL; between steps the engine thread takes turns with execute() and the
        # sender, and with the default 5 ms switch interval it waited up to 5 ms per step for them
        # (measured: a busy Python thread doubled step() time at 5 ms, +12 % at 0.5 ms).
        sys.setswitchinterval(float(_param(params, "gil_switch_interval_s", "0.0005")))

        sched = ov_genai.SchedulerConfig()
        sched.max_num_seqs = int(_param(params, "max_num_seqs", "64"))
        sched.max_num_batched_tokens = int(_param(params, "max_num_batched_tokens", "1024"))
        sched.enable_prefix_caching = _param(params, "enable_prefix_caching", "true") == "true"
        sched.dynamic_split_fuse = True
        kv_gb = float(_param(params, "kv_cache_gb", "0"))
        if kv_gb > 0:
            sched.cache_size = max(1, round(kv_gb))
        else:
            sched.num_kv_blocks = int(_param(params, "num_kv_blocks", "512"))
        properties: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": precision,
            "KV_CACHE_PRECISION": _param(params, "kv_cache_precision", "f32"),
        }
        self._adapters: dict[str, Any] = {}
        adapter_spec = json.loads(_param(params, "adapters", "{}"))
        if adapter_spec:
            for aname, spec in adapter_spec.items():
                path = Path(spec["path"])
                if not path.is_absolute():
                    path = version_dir / path
                self._adapters[aname] = (ov_genai.Adapter(str(path)), float(spec.get("alpha", 1.0)))
            # The pipeline must know every adapter up front. The step API does not switch adapters per
            # request: an engine serves one adapter, applied at load (see lora_router.py).
            properties["adapters"] = ov_genai.AdapterConfig([(a, 0.0) for a, _ in self._adapters.values()])
        # Speculative decoding (forgeline serve.speculative): the draft proposes num_assistant_tokens per
        # step; with a draft, a request must set it (the pipeline rejects one that does not).
        self._draft_tokens = int(_param(params, "num_assistant_tokens", "0"))
        draft = _param(params, "draft_model", "")
        if draft:
            draft_props = {k: v for k, v in properties.items() if k != "adapters"}
            properties["draft_model"] = ov_genai.draft_model(str(version_dir / draft), "CPU", **draft_props)
        self.pipe = ov_genai.ContinuousBatchingPipeline(str(engine_dir), sched, "CPU", properties)
        if self._adapters:
            # add_request()/step() ignore a request's adapters (OpenVINO GenAI 2026.4): only generate()
            # applies them, and they then hold for every later step. So each engine model serves one
            # adapter (lora_router.py routes by lora_name), applied here once.
            warm = ov_genai.GenerationConfig()
            warm.max_new_tokens = 1
            warm.adapters = ov_genai.AdapterConfig(list(self._adapters.values()))
            if self._draft_tokens:
                warm.num_assistant_tokens = self._draft_tokens
            self.pipe.generate(["warm-up"], [warm])
        self.tokenizer = self.pipe.get_tokenizer()
        self._encode, self._decode = _codec(engine_dir, self.tokenizer)
        self._eos = int(self.pipe.get_config().eos_token_id)
        self._events_per_s = float(_param(params, "max_stream_events_per_s", str(DEFAULT_EVENTS_PER_S)))
        self._tokens = self._steps = self._cancelled = 0
        self._published = 0.0
        self._dirty = False
        self._queue: queue.Queue[_Live | tuple[_Live, Any, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._drain_timeout_s = float(_param(params, "drain_timeout_s", "600"))
        self._next_id = 0
        self._admission = threading.Lock()  # held by execute(): no step starts while it parses
        self._executed = threading.Event()  # set when an execute() returns
        self._last_step_s = 0.0
        self._metrics()
        # (kind, request, ids up to, reason): what the sender thread turns into responses, in order
        self._outbox: queue.Queue[tuple[str, _Live, int, str] | None] = queue.Queue()
        self._sender = threading.Thread(target=self._send_loop, name="forgeline-sender", daemon=True)
        self._sender.start()
        self._thread = threading.Thread(target=self._engine, name="forgeline-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------- metrics

    def _metrics(self) -> None:
        # Families must outlive their metrics: keep both on the instance.
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        specs = {
            "kv": ("forgeline_engine_kv_cache_usage_ratio", "KV cache blocks in use (0..1)", gauge),
            "running": ("forgeline_engine_requests_running", "Requests inside the engine", gauge),
            "tokens": ("forgeline_engine_generated_tokens", "Tokens generated", counter),
            "steps": ("forgeline_engine_steps", "Engine steps", counter),
            "cancelled": ("forgeline_engine_cancelled_requests", "Requests cancelled", counter),
        }
        self._families = {
            k: pb_utils.MetricFamily(name=n, description=d, kind=kind) for k, (n, d, kind) in specs.items()
        }
        m = {k: f.Metric(labels={"model": self.name}) for k, f in self._families.items()}
        self._m_kv, self._m_running, self._m_tokens = m["kv"], m["running"], m["tokens"]
        self._m_steps, self._m_cancelled = m["steps"], m["cancelled"]

    # ------------------------------------------------------------------------------------- requests

    def execute(self, requests: list[Any]) -> None:
        # Under the admission lock the engine starts no step, so a batch is parsed in one go and enters
        # the engine together; without it the engine thread took the GIL back every switch interval
        # and ran a whole step, and 62 requests took 2.6 s to parse (measured), one or two per step.
        with self._admission:
            for request in requests:
                sender = request.get_response_sender()
                try:
                    live, prompt, cfg = self._parse(request, sender)
                except Exception as e:  # a bad request fails alone, never the model
                    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))), flags=FINAL)
                    continue
                self._queue.put((live, prompt, cfg))
        self._executed.set()
        return None

    def _await_arrivals(self) -> None:
        """Before a step: let a batch of requests that Triton is handing over enter it.

        Triton sends the next batch only once the stub has acknowledged the last ``execute``, and that
        (our reading of the python backend) needs the GIL again: a step started in between delayed
        the next batch by a whole step or more. Measured in a 64-request burst with a log in the stub:
        ``execute`` returned at 0.19 s and the next one, with the remaining 40 requests (all in
        Triton since 0.1 s, per Triton's trace), began only at 1.4 s. So after an ``execute``, the
        engine waits a grace period -- a small fraction of its last step, 0.5-5 ms -- for the next
        one, and again after each that comes, up to ``MAX_ARRIVAL_WAIT_S`` in all. With no arrivals
        there is no wait at all.
        """
        grace = min(MAX_GRACE_S, max(MIN_GRACE_S, GRACE_FRACTION * self._last_step_s))
        deadline = time.monotonic() + MAX_ARRIVAL_WAIT_S
        while True:
            with self._admission:  # an execute under way finishes before the step
                pass
            if not self._executed.is_set() or time.monotonic() >= deadline:
                return
            self._executed.clear()
            self._executed.wait(grace)  # releases the GIL: the stub acknowledges, Triton sends more

    def _parse(self, request: Any, sender: Any) -> tuple[_Live, Any, Any]:
        ov_genai = self._ov
        text = _scalar(request, "text_input")
        messages = _scalar(request, "messages")
        if messages:
            rendered = self.tokenizer.apply_chat_template(json.loads(messages), add_generation_prompt=True)
            prompt = self._encode(rendered, False)
        elif text is not None:
            prompt = self._encode(text, True)
        else:
            raise ValueError("one of text_input or messages is required")
        cfg = ov_genai.GenerationConfig()
        max_tokens = _scalar(request, "max_tokens")
        cfg.max_new_tokens = int(max_tokens) if max_tokens else DEFAULT_MAX_TOKENS
        cfg.apply_chat_template = False
        cfg.eos_token_id = self._eos
        if self._draft_tokens:
            cfg.num_assistant_tokens = self._draft_tokens
        temperature = _scalar(request, "temperature")
        if temperature is not None and float(temperature) > 0:
            cfg.do_sample = True
            cfg.temperature = float(temperature)
            top_p = _scalar(request, "top_p")
            if top_p is not None:
                cfg.top_p = float(top_p)
            top_k = _scalar(request, "top_k")
            if top_k:
                cfg.top_k = int(top_k)
            seed = _scalar(request, "seed")
            if seed is not None and int(seed) >= 0:  # negative: no seed (the front always sends one)
                cfg.rng_seed = int(seed)
        stop = [s for s in _strings(request, "stop") if s]
        if stop:
            cfg.stop_strings = set(stop)
            cfg.include_stop_str_in_output = False
        if _scalar(request, "ignore_eos"):
            cfg.ignore_eos = True
        lora = _scalar(request, "lora_name")
        if self._adapters:
            if lora and lora not in self._adapters:
                raise ValueError(f"unknown LoRA adapter {lora!r}; loaded: {sorted(self._adapters)}")
            cfg.adapters = ov_genai.AdapterConfig(
                [(a, alpha if name == lora else 0.0) for name, (a, alpha) in self._adapters.items()]
            )
        elif lora:
            raise ValueError(f"LoRA adapter {lora!r} requested but the model has no adapters")
        stream = _scalar(request, "stream")
        self._next_id += 1
        live = _Live(
            rid=self._next_id,
            sender=sender,
            request=request,
            stream=bool(stream) if stream is not None else True,
            max_tokens=cfg.max_new_tokens,
            prompt_tokens=int(prompt.shape[1]),
        )
        return live, prompt, cfg

    # --------------------------------------------------------------------------------------- engine

    def _engine(self) -> None:
        live: dict[int, _Live] = {}
        while not self._stop.is_set():
            try:
                # A cancelled request leaves ``live`` at once but the pipeline frees its KV blocks on
                # the next step: keep stepping while the pipeline holds anything.
                if not live and not self.pipe.has_non_finished_requests():
                    if self._dirty:
                        # cache_usage is measured when a step schedules; one step with nothing to run
                        # makes the engine report the cache as it is now, after the last free.
                        self.pipe.step()
                        self._dirty = False
                        self._publish(live, force=True)
                    if self._draining.is_set() and self._queue.empty():
                        return
                    self._admit(live, block=True)
                    continue
                self._await_arrivals()
                self._admit(live, block=False)
                started = time.perf_counter()
                self.pipe.step()
                self._last_step_s = time.perf_counter() - started
                self._dirty = True
                self._steps += 1
                self._collect(live)
                self._publish(live)
                self._let_sender_run()
            except Exception:  # keep serving: fail the requests in flight, not the server
                err = traceback.format_exc()
                for item in list(live.values()):
                    self._outbox.put(("fail", item, 0, err))
                live.clear()

    def _let_sender_run(self) -> None:
        """Give the sender thread the GIL until it has sent what this step queued (bounded).

        ``step()`` holds the GIL. Each ``send`` releases it for its IPC round trip, and the engine
        thread, waiting for it, then took it for a whole step: about one response per step while
        ~50 were queued (tests/unit/test_triton_model_admission.py reproduces it: 18 of 20 streams
        late). The backlog grew to seconds (seen with 64 streams: requests whose tokens were made in
        the first second got their first response at the end of the run, and p99 TTFT was 2.3x the
        in-process engine's). Sleeping releases the GIL; the wait is capped at ``SENDER_SHARE`` of
        the last step, so a slow server side cannot stall generation, and is nothing when the
        sender has nothing queued.
        """
        deadline = time.perf_counter() + max(MIN_SENDER_WAIT_S, SENDER_SHARE * self._last_step_s)
        while self._outbox.qsize() and time.perf_counter() < deadline:
            time.sleep(SENDER_POLL_S)

    def _admit(self, live: dict[int, _Live], block: bool) -> None:
        try:
            item = self._queue.get(timeout=0.2) if block else self._queue.get_nowait()
        except queue.Empty:
            return
        while True:
            req, prompt, cfg = item  # type: ignore[misc]
            req.handle = self.pipe.add_request(req.rid, prompt, cfg)
            live[req.rid] = req
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break

    def _publish(self, live: dict[int, _Live], force: bool = False) -> None:
        """Metrics to the server (each update is an IPC): at most every METRICS_INTERVAL_S."""
        now = time.monotonic()
        if not force and now - self._published < METRICS_INTERVAL_S:
            return
        self._published = now
        self._m_running.set(len(live))
        self._m_kv.set(float(self.pipe.get_metrics().cache_usage) / 100.0)
        if self._tokens:
            self._m_tokens.increment(self._tokens)
            self._tokens = 0
        if self._steps:
            self._m_steps.increment(self._steps)
            self._steps = 0
        if self._cancelled:
            self._m_cancelled.increment(self._cancelled)
            self._cancelled = 0

    def _collect(self, live: dict[int, _Live]) -> None:
        """Read every live request's new tokens and queue its responses for the sender thread.

        Only engine calls happen here (read, status, cancel): the responses (decoding, tensors, the
        IPC of ``send``) and the cancellation polls run on the sender thread (py-spy: they were 7 %
        of this thread's time).
        """
        done: list[int] = []
        now = time.monotonic()
        # The streaming budget is shared by all live requests: per-request intervals grow with the batch.
        send_gap = len(live) / self._events_per_s
        running = self._ov.GenerationStatus.RUNNING
        for rid, req in live.items():
            if req.cancel_requested and not req.cancelled:
                self._cancel(req)
            if req.cancelled:
                self._outbox.put(("cancelled", req, len(req.ids), "cancelled"))
                done.append(rid)
                continue
            handle = req.handle
            if handle.can_read():
                before = len(req.ids)
                for out in handle.read().values():
                    req.ids.extend(out.generated_ids)
                self._tokens += len(req.ids) - before
            status = handle.get_status()
            if status != running and not handle.can_read():
                self._outbox.put(("final", req, len(req.ids), self._reason(req, status)))
                done.append(rid)
            elif (
                req.stream
                and len(req.ids) > req.queued_ids
                and (
                    req.queued_ids == 0 or now - req.last_send >= send_gap  # first token: at once (TTFT)
                )
            ):
                self._outbox.put(("stream", req, len(req.ids), ""))
                req.queued_ids, req.last_send = len(req.ids), now
        for rid in done:
            live.pop(rid)
        self._poll_cancellations(live, now)

    def _poll_cancellations(self, live: dict[int, _Live], now: float) -> None:
        """Ask the sender thread to poll a few requests' cancellation (each poll is an IPC)."""
        check_gap = max(MIN_CANCEL_CHECK_S, len(live) / CANCEL_CHECKS_PER_S)
        for req in live.values():
            if not req.cancel_requested and now >= req.next_cancel_check:
                req.next_cancel_check = now + check_gap
                self._outbox.put(("poll", req, 0, ""))

    def _cancel(self, req: _Live) -> None:
        req.cancelled = True
        req.handle.cancel()
        self._cancelled += 1

    # ------------------------------------------------------------------------------------- responses

    def _send_loop(self) -> None:
        """The sender thread: responses in the order the engine queued them; ``None`` ends it."""
        while True:
            item = self._outbox.get()
            if item is None:
                return
            kind, req, upto, reason = item
            try:
                if kind == "poll":
                    if _is_cancelled(req):
                        req.cancel_requested = True
                elif kind == "stream":
                    # Everything made by now, not only what was made when this was queued: a backlog
                    # collapses into fewer, larger responses (the later queued ones find nothing new).
                    self._stream(req, max(upto, len(req.ids)))
                elif kind == "final":
                    self._finish(req, upto, reason)
                elif kind == "cancelled":
                    self._send(req, "", [], "cancelled", final=True)
                else:
                    self._fail(req, reason)
            except Exception:  # one response failing must not stop the others
                self._fail(req, traceback.format_exc())

    def _stream(self, req: _Live, upto: int) -> None:
        if upto <= req.sent_ids:
            return
        text = self._incremental(req, upto)
        if text or req.sent_ids == 0:
            self._send(req, text, req.ids[req.sent_ids : upto], "", final=False)
            req.sent_text.append(text)
            req.sent_ids = upto

    def _reason(self, req: _Live, status: Any) -> str:
        if status != self._ov.GenerationStatus.FINISHED:
            return "cancelled"
        if len(req.ids) >= req.max_tokens and (not req.ids or req.ids[-1] != self._eos):
            return "length"
        return "stop"

    def _incremental(self, req: _Live, upto: int, flush: bool = False) -> str:
        """Text of ``ids[read_offset:upto]``, decoding only a short window (look-back for merges).

        It waits (returns "") while the window ends in an incomplete UTF-8 sequence or a merge changed
        text already sent, but for at most ``MAX_PENDING_TOKENS`` tokens, and not at all on ``flush``
        (the request's last tokens). A model can emit byte tokens that never form UTF-8 (seen: the
        ~30M bench model repeating a lone lead byte, whose stream then sent nothing until its last
        token); those bytes go out as U+FFFD once the wait is over, as the full decode renders them.
        """
        ids, start = req.ids, max(0, req.read_offset - LOOKBACK_TOKENS)
        prefix = self._decode(ids[start : req.read_offset]) if req.read_offset > start else ""
        text = self._decode(ids[start:upto])
        clean = text.startswith(prefix) and not text.endswith("\ufffd")
        if not clean and not flush and upto - req.read_offset <= MAX_PENDING_TOKENS:
            return ""
        req.read_offset = upto
        return text[len(prefix) :]

    def _finish(self, req: _Live, upto: int, reason: str) -> None:
        ids = req.ids[:upto]
        whole = self._decode(ids)
        if not req.stream:
            self._send(req, whole, ids, reason, final=True)
            return
        sent = "".join(req.sent_text)
        # One full decode per request keeps streamed text equal to the non-streamed text.
        rest = whole[len(sent) :] if whole.startswith(sent) else self._incremental(req, upto, flush=True)
        self._send(req, rest, ids[req.sent_ids :], reason, final=True)

    def _send(self, req: _Live, text: str, ids: list[int], reason: str, final: bool) -> None:
        # Shapes [1, ...]: the model is batched (Triton's dynamic batcher), each request a batch of one.
        tensors = [
            pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
            pb_utils.Tensor("output_ids", np.array([ids], dtype=np.int32)),
            pb_utils.Tensor("finish_reason", np.array([[reason.encode()]], dtype=np.object_)),
            pb_utils.Tensor("prompt_tokens", np.array([[req.prompt_tokens]], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([[len(req.ids)]], dtype=np.int32)),
        ]
        try:
            req.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if final else 0)
        except Exception:  # the client is gone: the engine cancels it on its next pass
            if not final:
                req.cancel_requested = True

    def _fail(self, req: _Live, message: str) -> None:
        with contextlib.suppress(Exception):
            req.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)

    def finalize(self) -> None:
        # On reload, Triton 2.51 keeps the replaced instance alive while its response senders live
        # (seen: it generated to the last token after the swap; finalize came only after that), so
        # this normally finds nothing in flight. Draining is the safety net for an earlier finalize.
        # Streams cut on reload were the HTTP frontend losing events during an HTTP load call, see
        # forgeline_operators/deploy/triton.py.
        self._draining.set()
        self._thread.join(timeout=float(self._drain_timeout_s))
        self._stop.set()
        self._thread.join(timeout=10)
        self._outbox.put(None)  # after everything the engine queued
        self._sender.join(timeout=10)

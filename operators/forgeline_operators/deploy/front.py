"""The OpenAI-compatible HTTP front over Triton's ``generate_stream`` (FastAPI).

Routes: ``/v1/completions``, ``/v1/chat/completions`` (chat template applied in the model from the
tokenizer), streaming as server-sent events, ``/v1/models``, NIM-style ``/v1/health/live`` and
``/v1/health/ready``, ``/metrics`` (Prometheus: the front's request, TTFT, inter-token latency,
token and queue-depth series, followed by Triton's own metrics including the engine's KV-cache
usage). Admission is bounded: beyond ``max_queue`` requests in flight the front answers 429 with
``Retry-After``. An optional bearer token guards every ``/v1`` route but the health probes. Errors use
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``. A client that disconnects closes
its Triton stream, which cancels the request inside the engine.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FrontSettings", "create_app", "sse_events"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True)
class FrontSettings:
    """How the front reaches Triton and what it admits."""

    triton_url: str
    triton_model: str
    served_name: str
    triton_metrics_url: str | None = None
    adapters: tuple[str, ...] = ()  # LoRA adapters, served as model ids of their own
    # adapter ("" = base) -> the Triton engine model serving it (a repository with adapters): requests
    # go straight to their engine, so a client that leaves cancels the request in that engine.
    routes: dict[str, str] = field(default_factory=dict)
    max_queue: int = 256  # requests admitted at once (in the engine or waiting for it)
    retry_after_s: int = 1
    api_key: str | None = None
    request_timeout_s: float = 600.0
    owned_by: str = "forgeline"
    extra: dict[str, Any] = field(default_factory=dict)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1, le=1)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


class _Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "forgeline_requests", "Requests by route and status", ["route", "status"], registry=r
        )
        self.ttft = Histogram(
            "forgeline_time_to_first_token_seconds", "TTFT", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "forgeline_inter_token_latency_seconds", "ITL", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "forgeline_request_latency_seconds", "End to end", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("forgeline_prompt_tokens", "Prompt tokens", registry=r)
        self.completion_tokens = Counter("forgeline_generation_tokens", "Generated tokens", registry=r)
        self.queue = Gauge("forgeline_queue_depth", "Requests admitted and not finished", registry=r)
        self.rejected = Counter("forgeline_rejected_requests", "Requests refused with 429", registry=r)


@dataclass
class _Outcome:
    text: str = ""
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def create_app(settings: FrontSettings) -> FastAPI:
    """The front for one served model (and its adapters)."""
    metrics = _Metrics()
    state = {"inflight": 0}
    model_ids = [settings.served_name, *settings.adapters]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # httpx for the probes and metrics; one pooled aiohttp connection per admitted request (a fresh
        # TCP connection per request costs more than the request's own events).
        pool = settings.max_queue + 8
        app.state.client = httpx.AsyncClient(
            base_url=settings.triton_url,
            timeout=httpx.Timeout(10, connect=5),
            limits=httpx.Limits(max_connections=8),
        )
        # The per-token hot path goes through aiohttp: httpcore's pool scans every pooled connection
        # for each request (py-spy: over half the front's CPU with 64 streams in flight).
        session = aiohttp.ClientSession(
            base_url=settings.triton_url,
            connector=aiohttp.TCPConnector(limit=pool),
            timeout=aiohttp.ClientTimeout(total=settings.request_timeout_s, connect=5),
        )
        app.state.generate = functools.partial(_triton_events, session, settings.triton_model)
        try:
            yield
        finally:
            await app.state.client.aclose()
            await session.close()

    app = FastAPI(title="Forgeline OpenAI-compatible endpoint", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return ApiError(400, msg or "invalid request", "invalid_request_error", param=param).response()

    def _auth(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {settings.api_key}":
            raise ApiError(
                401, "Incorrect API key provided.", "invalid_request_error", code="invalid_api_key"
            )

    def _lora(model: str) -> str | None:
        if model == settings.served_name:
            return None
        if model in settings.adapters:
            return model
        raise ApiError(
            404, f"The model `{model}` does not exist.", "invalid_request_error", "model_not_found", "model"
        )

    @app.get("/v1/health/live")
    async def live() -> dict[str, str]:
        return {"object": "health.response", "message": "live"}

    @app.get("/v1/health/ready")
    async def ready() -> JSONResponse:
        try:
            r = await app.state.client.get(f"/v2/models/{settings.triton_model}/ready", timeout=2)
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        return JSONResponse(
            {"object": "health.response", "message": "ready" if ok else "not ready"},
            status_code=200 if ok else 503,
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        body = generate_latest(metrics.registry)
        if settings.triton_metrics_url:
            try:
                r = await app.state.client.get(settings.triton_metrics_url, timeout=2)
                body += b"\n" + r.content
            except httpx.HTTPError:
                pass
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _auth(request)
        created = int(time.time())
        data = [
            {
                "id": m,
                "object": "model",
                "created": created,
                "owned_by": settings.owned_by,
                "root": settings.served_name,
            }
            for m in model_ids
        ]
        return {"object": "list", "data": data}

    def _payload(body: _Sampling, lora: str | None, default_max: int) -> dict[str, Any]:
        # Every request carries the same inputs (neutral values for what the client left out): Triton's
        # dynamic batcher puts only requests with the same set of inputs in one ``execute``, and the
        # engine model takes new requests only between engine steps (see engines/openvino/repository.py).
        payload: dict[str, Any] = {
            "text_input": "",
            "messages": "",
            "max_tokens": body.max_completion_tokens or body.max_tokens or default_max,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k or 0,  # 0: no top-k
            "seed": body.seed if body.seed is not None else -1,  # negative: no seed
            "stop": body.stops() or [""],  # empty strings are ignored
            "ignore_eos": body.ignore_eos,
            "stream": True,
            "lora_name": "",
        }
        route = settings.routes.get(lora or "")
        if route:
            payload[_TARGET] = route
        elif lora:
            payload["lora_name"] = lora
        return payload

    async def _events(payload: dict[str, Any], out: _Outcome) -> AsyncIterator[str]:
        """Deltas from Triton; updates ``out``; raises ApiError on a Triton error."""
        generate: Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]] = app.state.generate
        async for event in generate(payload):
            if "error" in event:
                raise ApiError(500, f"inference server: {event['error']}", "server_error")
            ids = event.get("output_ids", [])
            out.ids.extend([ids] if isinstance(ids, int) else ids)
            out.prompt_tokens = int(event.get("prompt_tokens", 0))
            out.completion_tokens = int(event.get("completion_tokens", 0))
            out.finish_reason = event.get("finish_reason") or None
            delta = event.get("text_output", "")
            out.text += delta
            yield delta

    async def _serve(route: str, body: _Sampling, payload: dict[str, Any], chat: bool) -> Response:
        if state["inflight"] >= settings.max_queue:
            metrics.rejected.inc()
            metrics.requests.labels(route, "429").inc()
            err = ApiError(429, "The server is at capacity; retry later.", "rate_limit_error", "queue_full")
            return err.response({"Retry-After": str(settings.retry_after_s)})
        state["inflight"] += 1
        metrics.queue.inc()
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        started = time.perf_counter()
        out = _Outcome()
        timing = {"last": 0.0, "first": 0.0}

        def observe_token() -> None:
            now = time.perf_counter()
            if not timing["first"]:
                timing["first"] = now
                metrics.ttft.observe(now - started)
            else:
                metrics.itl.observe(now - timing["last"])
            timing["last"] = now

        def finish(status: str) -> None:
            state["inflight"] -= 1
            metrics.queue.dec()
            metrics.requests.labels(route, status).inc()
            metrics.e2e.observe(time.perf_counter() - started)
            metrics.prompt_tokens.inc(out.prompt_tokens)
            metrics.completion_tokens.inc(out.completion_tokens)

        def usage() -> dict[str, int]:
            return {
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens,
            }

        # Every chunk of a stream shares its envelope: encode it once, then only the delta per chunk.
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = json.dumps({"id": rid, "object": obj, "created": created, "model": body.model})[:-1]
        head = "data: " + head + ', "choices": [{"index": 0, '
        key = '"delta": {' if chat else '"text": '

        def chunk(delta: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                d = '"role": "assistant", "content": ""' if first else ""
                if delta:
                    d += (", " if d else "") + '"content": ' + json.dumps(delta)
                text = key + d + "}"
            else:
                text = key + json.dumps(delta or "")
            return f'{head}{text}, "logprobs": null, "finish_reason": {json.dumps(reason)}}}]}}\n\n'

        if not body.stream:
            payload["stream"] = False  # one response from the model: the whole text, decoded once
            try:
                async for delta in _events(payload, out):
                    if delta or out.ids:
                        observe_token()
            except ApiError:
                finish("error")
                raise
            finish("200")
            reason = _openai_reason(out.finish_reason)
            if chat:
                choice: dict[str, Any] = {
                    "index": 0,
                    "message": {"role": "assistant", "content": out.text},
                    "logprobs": None,
                    "finish_reason": reason,
                }
            else:
                choice = {"index": 0, "text": out.text, "logprobs": None, "finish_reason": reason}
            result = {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": body.model,
                "choices": [choice],
                "usage": usage(),
            }
            return JSONResponse(result)

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def sse() -> AsyncIterator[str]:
            status = "200"
            try:
                if chat:
                    yield chunk(None, None, first=True)
                async for delta in _events(payload, out):
                    observe_token()
                    if delta:
                        yield chunk(delta, None)
                yield chunk(None, _openai_reason(out.finish_reason))
                if include_usage:
                    tail: dict[str, Any] = {
                        "id": rid,
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created,
                        "model": body.model,
                        "choices": [],
                        "usage": usage(),
                    }
                    yield "data: " + json.dumps(tail) + "\n\n"
                yield "data: [DONE]\n\n"
            except ApiError as e:
                status = "error"
                yield (
                    "data: "
                    + json.dumps({"error": {"message": e.message, "type": e.type, "code": e.code}})
                    + "\n\n"
                )
            except (asyncio.CancelledError, GeneratorExit):
                status = "cancelled"  # client went away: closing the Triton stream cancels in the engine
                raise
            finally:
                finish(status)

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _auth(request)
        lora = _lora(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(
                400, "exactly one prompt per request is supported", "invalid_request_error", param="prompt"
            )
        payload = _payload(body, lora, default_max=16)
        payload["text_input"] = prompts[0]
        return await _serve("completions", body, payload, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        _auth(request)
        lora = _lora(body.model)
        payload = _payload(body, lora, default_max=256)
        payload["messages"] = json.dumps([{"role": m.role, "content": m.text()} for m in body.messages])
        return await _serve("chat", body, payload, chat=True)

    return app


_TARGET = "_forgeline_target_model"  # set by the front's routing, never sent to Triton


async def _triton_events(
    session: aiohttp.ClientSession, model: str, payload: dict[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    """Triton's ``generate_stream`` events for ``payload`` (on the engine its route names, else on
    ``model``). Leaving early closes the connection, which cancels the request in the engine."""
    model = payload.pop(_TARGET, model)
    try:
        async with session.post(f"/v2/models/{model}/generate_stream", json=payload) as r:
            if r.status != 200:
                raise ApiError(502, f"inference server: {await r.text(errors='replace')}", "server_error")
            async for event in sse_events(r.content.iter_any()):
                yield event
    except aiohttp.ClientError as e:
        raise ApiError(503, f"inference server unreachable: {e}", "server_error") from e


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream (``data:`` lines; Triton sends one per event)."""
    buffer = b""
    async for raw in chunks:
        buffer += raw
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    yield json.loads(line[5:])
    if buffer.strip().startswith(b"data:"):
        yield json.loads(buffer.strip()[5:])


def _openai_reason(reason: str | None) -> str | None:
    if reason in ("stop", "length"):
        return reason
    return "stop" if reason else None

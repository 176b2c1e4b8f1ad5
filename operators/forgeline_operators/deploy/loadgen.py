"""A bounded, seeded load generator for OpenAI-compatible endpoints (``forgeline bench endpoint``).

It sends ``requests`` streaming completions with at most ``concurrency`` in flight; prompt and output
lengths are drawn from uniform ranges with a fixed seed (output length enforced with ``ignore_eos``),
so two runs send the same workload. It reports what TRT-LLM's and vLLM's benchmark tools report:
output tokens/s, requests/s, time to first token, inter-token latency and end-to-end latency
percentiles (p50/p90/p99), and errors by kind.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["LoadReport", "LoadSpec", "percentile", "run_load", "workload"]

_WORDS = Path(__file__).resolve().parents[1] / "models" / "corpus" / "stdlib_docs.txt"


@dataclass(frozen=True)
class LoadSpec:
    requests: int = 64
    concurrency: int = 16
    prompt_words: tuple[int, int] = (8, 96)
    output_tokens: tuple[int, int] = (8, 64)
    seed: int = 0
    model: str | None = None  # default: the first id of /v1/models
    api_key: str | None = None
    timeout_s: float = 300.0


@dataclass
class LoadReport:
    requests: int
    completed: int
    errors: dict[str, int]
    duration_s: float
    output_tokens: int
    prompt_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    texts: list[str] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("texts")
        return out


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``q`` in [0, 100]; NaN when empty."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _summary(values: list[float]) -> dict[str, float]:
    return {f"p{q}": round(percentile(values, q) * 1000, 3) for q in (50, 90, 95, 99)} | {
        "mean": round(sum(values) / len(values) * 1000, 3) if values else float("nan")
    }


def workload(spec: LoadSpec) -> list[tuple[str, int]]:
    """(prompt, output tokens) per request: deterministic for a seed."""
    words = _WORDS.read_text().split() if _WORDS.exists() else ["the", "quick", "brown", "fox"]
    rng = random.Random(spec.seed)
    out = []
    for _ in range(spec.requests):
        n = rng.randint(*spec.prompt_words)
        start = rng.randrange(0, max(1, len(words) - n))
        out.append((" ".join(words[start : start + n]), rng.randint(*spec.output_tokens)))
    return out


async def _one(
    session: aiohttp.ClientSession, model: str, prompt: str, max_tokens: int, sink: dict[str, Any]
) -> None:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    stamps: list[float] = []
    text = []
    usage: dict[str, int] = {}
    try:
        async with session.post("v1/completions", json=body) as r:
            if r.status != 200:
                await r.read()
                sink["errors"][f"http_{r.status}"] = sink["errors"].get(f"http_{r.status}", 0) + 1
                return
            # One SSE event per line pair; ``data: [DONE]`` and blank separators are skipped.
            async for raw in r.content:
                if not raw.startswith(b"data: {"):
                    continue
                event = json.loads(raw[6:])
                if "error" in event:
                    sink["errors"]["stream_error"] = sink["errors"].get("stream_error", 0) + 1
                    return
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices", ()):
                    if choice.get("text"):
                        stamps.append(time.perf_counter())
                        text.append(choice["text"])
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:  # ValueError: an over-long line
        kind = type(e).__name__
        sink["errors"][kind] = sink["errors"].get(kind, 0) + 1
        return
    end = time.perf_counter()
    if stamps:
        sink["ttft"].append(stamps[0] - start)
        sink["itl"].extend(b - a for a, b in itertools.pairwise(stamps))
    sink["e2e"].append(end - start)
    sink["out_tokens"] += int(usage.get("completion_tokens", len(stamps)))
    sink["prompt_tokens"] += int(usage.get("prompt_tokens", 0))
    sink["completed"] += 1
    sink["texts"].append("".join(text))


async def _run(url: str, spec: LoadSpec) -> LoadReport:
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    # aiohttp, not httpx: the client shares the CPU with the endpoint it measures when both run on one
    # machine, and httpx costs several times more CPU per streamed event (py-spy, 64 streams).
    async with aiohttp.ClientSession(
        base_url=url.rstrip("/") + "/",  # relative paths below keep a path prefix of ``url``
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=spec.timeout_s),
        connector=aiohttp.TCPConnector(limit=spec.concurrency + 2),
    ) as session:
        model = spec.model
        if model is None:
            async with session.get("v1/models") as r:
                r.raise_for_status()
                model = (await r.json())["data"][0]["id"]
        sink: dict[str, Any] = {
            "ttft": [], "itl": [], "e2e": [], "errors": {}, "out_tokens": 0, "prompt_tokens": 0,
            "completed": 0, "texts": [],
        }  # fmt: skip
        gate = asyncio.Semaphore(spec.concurrency)

        async def bounded(prompt: str, n: int) -> None:
            async with gate:
                await _one(session, str(model), prompt, n, sink)

        started = time.perf_counter()
        await asyncio.gather(*(bounded(p, n) for p, n in workload(spec)))
        duration = time.perf_counter() - started
    return LoadReport(
        requests=spec.requests,
        completed=sink["completed"],
        errors=sink["errors"],
        duration_s=round(duration, 3),
        output_tokens=sink["out_tokens"],
        prompt_tokens=sink["prompt_tokens"],
        output_tokens_per_s=round(sink["out_tokens"] / duration, 2),
        requests_per_s=round(sink["completed"] / duration, 3),
        ttft_ms=_summary(sink["ttft"]),
        itl_ms=_summary(sink["itl"]),
        e2e_ms=_summary(sink["e2e"]),
        texts=sink["texts"],
    )


def run_load(url: str, spec: LoadSpec) -> LoadReport:
    return asyncio.run(_run(url, spec))

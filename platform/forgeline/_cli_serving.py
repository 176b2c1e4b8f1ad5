"""Serving commands of the ``forgeline`` CLI: ``serve``, ``endpoints``, ``bench endpoint``.

Registered on the main Typer app by :func:`register` (one line in ``cli.py``). The serving machinery
(the engines facade ``forgeline_operators.engines``, ``.deploy``) is imported inside each command, so
the rest of the CLI starts without it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["register"]

out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home", help="State directory (default ./.forgeline or FORGELINE_HOME).", show_default=False
    ),
]
bench_app = typer.Typer(help="Benchmarks.", no_args_is_help=True)


def _home(home: Path | None) -> Path:
    from forgeline.tracking import default_home

    return home.resolve() if home else default_home()


def _die(message: str) -> typer.Exit:
    err.print(f"error: {message}", markup=False, highlight=False, style="red")
    return typer.Exit(1)


def _repository_for(uri: str, home: Path, threads: int, precision: str = "f32") -> Path:
    """Build (once, cached by the model's fingerprint and the engine settings) the Triton repository
    serving ``uri``, through the engine that serves it on this machine's CPU."""
    import hashlib
    import tempfile

    from forgeline.runtime import model_store
    from forgeline_operators.engines import MANIFEST, SchedulerSpec, ServingSettings, default_engines

    store = model_store(home)  # the planner's store: registry URIs (mlflow://, models:/) resolve too
    settings = ServingSettings(
        name="model", scheduler=SchedulerSpec(inference_precision=precision), threads=threads
    )
    # The engine settings live in the repository's config.pbtxt: they are part of what is cached.
    key_settings = f"threads={threads} precision={precision}"
    key = hashlib.sha256(f"{store.fingerprint(uri, Path.cwd())} {key_settings}".encode()).hexdigest()[:16]
    target = home / "serving" / key / "repository"
    if (target / MANIFEST).exists():
        return target
    model_dir = store.materialize(uri, Path.cwd())
    engine = default_engines().select(model_dir, "cpu")
    if not engine.server.runs_here:
        raise ValueError(f"{uri} is served by {engine.name}, which runs in {engine.server.image}, not here")
    engine.check(settings)  # bad settings fail here, before any export
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        artifact = engine.prepare(model_dir, Path(tmp), threads=threads)
        if artifact != model_dir:
            err.print(f"prepared {uri} for {engine.name}", highlight=False)
        staging = Path(tmp) / "repository"
        engine.write_repository(staging, artifact, settings)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def serve(
    model_uri: Annotated[
        str,
        typer.Argument(
            help="Model URI: builtin://tiny-llama, a directory, hf://, s3://, mlflow://models/NAME@ALIAS "
            "or /VERSION, models:/NAME/VERSION or models:/NAME@ALIAS."
        ),
    ],
    port: Annotated[int, typer.Option("--port", "-p", help="Port of the OpenAI-compatible API.")] = 8000,
    name: Annotated[str | None, typer.Option("--name", help="Endpoint name (default: from the URI).")] = None,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Leave it running in the background.")
    ] = False,
    max_queue: Annotated[int, typer.Option(help="Requests admitted at once; more get 429.")] = 256,
    api_key_env: Annotated[
        str | None, typer.Option(help="Environment variable holding a bearer token to require.")
    ] = None,
    threads: Annotated[int, typer.Option(help="Engine threads.")] = 1,
    precision: Annotated[
        str,
        typer.Option(
            help="Engine compute precision: f32 (greedy equals transformers) or bf16 (faster on CPUs "
            "with AMX / AVX512-BF16; needs --threads 2 or more)."
        ),
    ] = "f32",
    home: HomeOpt = None,
) -> None:
    """Serve a model with a real Triton Inference Server and an OpenAI-compatible API."""
    from forgeline_operators.deploy.endpoint import EndpointError, serve_foreground, start_detached

    h = _home(home)
    endpoint = name or _endpoint_name(model_uri)
    try:
        from forgeline.artifacts import single_name

        single_name(endpoint, what="endpoint name (--name)")  # it names files under the home
        if precision not in ("f32", "bf16"):
            raise ValueError(f"--precision must be f32 or bf16, got {precision!r}")
        repo = _repository_for(model_uri, h, threads, precision)
        if detach:
            rec = start_detached(
                h, repo, endpoint, port, served_name=endpoint, max_queue=max_queue,
                api_key_env=api_key_env, threads=threads,
            )  # fmt: skip
            out.print(f"endpoint {endpoint} at {rec.url} (pid {rec.pid})", highlight=False)
            _print_try(rec.url, endpoint)
            return
    except (EndpointError, OSError, ValueError, RuntimeError) as e:
        raise _die(str(e)) from None
    url = f"http://127.0.0.1:{port}"
    out.print(f"serving {model_uri} as {endpoint!r} at {url} (Ctrl-C stops)", highlight=False)
    _print_try(url, endpoint)
    api_key = os.environ.get(api_key_env) if api_key_env else None
    serve_foreground(repo, endpoint, port, h, endpoint, max_queue, api_key, threads)


def _endpoint_name(uri: str) -> str:
    """The default endpoint name: a registered model's name, else the URI's last path segment."""
    from forgeline.artifacts import UriError, parse_uri

    try:
        ref = parse_uri(uri).ref
    except UriError:  # building the repository reports it
        ref = None
    # Without this, models:/NAME/3 would serve as an endpoint named "3".
    base = ref.name if ref else uri.rstrip("/").rsplit("/", 1)[-1].split("@")[0]
    return base.replace(".", "-") or "model"


def _print_try(url: str, model: str) -> None:
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 16})
    out.print(
        f"try: curl {url}/v1/completions -H 'Content-Type: application/json' -d '{body}'",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def endpoints(
    action: Annotated[str | None, typer.Argument(help="`stop` to stop endpoints; omit to list.")] = None,
    name: Annotated[str | None, typer.Argument(help="Endpoint to stop.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Stop every endpoint.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable list.")] = False,
    home: HomeOpt = None,
) -> None:
    """List local endpoints, or stop one (`forgeline endpoints stop NAME`) or all (`stop --all`)."""
    from forgeline_operators.deploy.endpoint import list_endpoints, stop_all, stop_endpoint

    h = _home(home)
    if action is None:
        from forgeline_operators.promote.local import live_dir, serving_state

        def version_of(r: Any) -> str | None:
            # Production endpoints (promotion-managed) say which registered version they serve.
            live = Path(r.repository) == live_dir(h, r.name) / "repository"
            state = serving_state(h, r.name) if live else None
            return f"{state['registered_model']}/{state['version']}" if state else None

        recs = list_endpoints(h)
        if as_json:
            print(json.dumps([{**r.__dict__, "serving_version": version_of(r)} for r in recs], indent=2))
            return
        table = Table(title=f"endpoints ({h})")
        for col in ("name", "url", "model", "version", "pid", "ready", "repository"):
            table.add_column(col)
        for r in recs:
            ready = "yes" if r.ready else "no"
            table.add_row(r.name, r.url, r.model, version_of(r) or "-", str(r.pid), ready, r.repository)
        out.print(table)
        return
    if action != "stop":
        raise _die(f"unknown action {action!r}; use `forgeline endpoints stop NAME|--all`")
    if all_:
        stopped = stop_all(h)
        out.print(f"stopped {len(stopped)} endpoint(s){': ' + ', '.join(stopped) if stopped else ''}")
        return
    if not name:
        raise _die("name the endpoint to stop, or pass --all")
    try:
        found = stop_endpoint(h, name)
    except ValueError as e:  # a name that is not one plain file name
        raise _die(str(e)) from None
    if not found:
        raise _die(f"no endpoint named {name!r}")
    out.print(f"stopped {name}")


@bench_app.command("endpoint")
def bench_endpoint(
    url: Annotated[str, typer.Argument(help="Base URL of an OpenAI-compatible endpoint.")],
    requests: Annotated[int, typer.Option("--requests", "-n", min=1, help="Requests to send.")] = 64,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, help="Requests in flight.")] = 16,
    prompt_words: Annotated[str, typer.Option(help="Prompt length range in words, MIN:MAX.")] = "8:96",
    output_tokens: Annotated[str, typer.Option(help="Output length range in tokens, MIN:MAX.")] = "8:64",
    seed: Annotated[int, typer.Option(help="Workload seed.")] = 0,
    model: Annotated[str | None, typer.Option(help="Model id (default: the first of /v1/models).")] = None,
    api_key_env: Annotated[str | None, typer.Option(help="Environment variable holding the token.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable report.")] = False,
) -> None:
    """Load-test an endpoint: throughput, TTFT and inter-token latency percentiles, errors."""
    from forgeline_operators.deploy.loadgen import LoadSpec, run_load

    def span(text: str) -> tuple[int, int]:
        lo, _, hi = text.partition(":")
        return int(lo), int(hi or lo)

    spec = LoadSpec(
        requests=requests,
        concurrency=concurrency,
        prompt_words=span(prompt_words),
        output_tokens=span(output_tokens),
        seed=seed,
        model=model,
        api_key=os.environ.get(api_key_env) if api_key_env else None,
    )
    try:
        report = run_load(url, spec)
    except Exception as e:
        raise _die(f"{type(e).__name__}: {e}") from None
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        out.print(
            f"{report.completed}/{report.requests} requests in {report.duration_s:.2f}s, "
            f"{report.output_tokens} output tokens: {report.output_tokens_per_s:.1f} tok/s, "
            f"{report.requests_per_s:.2f} req/s; errors {report.errors or 0}",
            highlight=False,
        )
        table = Table()
        for col in ("ms", "p50", "p90", "p99", "mean"):
            table.add_column(col)
        for label, values in (("TTFT", report.ttft_ms), ("ITL", report.itl_ms), ("E2E", report.e2e_ms)):
            table.add_row(label, *(f"{values[k]:.1f}" for k in ("p50", "p90", "p99", "mean")))
        out.print(table)
    if report.errors:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(endpoints)
    app.add_typer(bench_app, name="bench")

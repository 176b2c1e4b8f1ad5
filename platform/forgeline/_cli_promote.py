"""CLI commands of promotion: ``promote``, ``rollback``, ``history``, ``approve``, ``models``.

Thin: each parses its arguments and calls :mod:`forgeline_operators.promote.service` (imported inside
the command, so ``forgeline --help`` stays fast), then renders the promotion record.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

out = Console()
err = Console(stderr=True)

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="Forgeline state directory (default: ./.forgeline or $FORGELINE_HOME)."),
]
TrackingOpt = Annotated[
    str | None, typer.Option("--tracking-uri", help="MLflow tracking URI (default: the home's SQLite store).")
]


def _context(home: Path | None, tracking_uri: str | None) -> tuple[Path, str]:
    from forgeline.tracking import default_home, resolve_settings

    h = home.resolve() if home else default_home()
    return h, tracking_uri or resolve_settings(None, "", h).uri


def _die(message: str, code: int = 1) -> typer.Exit:
    err.print(f"error: {message}", markup=False, highlight=False, style="red")
    return typer.Exit(code)


def _print_record(record: Any) -> None:
    for gate in record.gates:
        mark = "[green]pass[/green]" if gate["passed"] else "[red]FAIL[/red]"
        out.print(f"  gate {gate['name']}: {mark} {gate['message']}", highlight=False)
    if record.endpoint and record.endpoint.get("url"):
        out.print(f"  endpoint {record.endpoint['name']}: {record.endpoint['url']}", highlight=False)
    out.print(f"{record.message}  ({record.duration_s:.1f}s, record {record.run_id})", highlight=False)


def _load_gates(path: Path | None) -> Any:
    from forgeline_operators.promote.service import PromotionGates

    if path is None:
        return None
    from ruamel.yaml import YAML

    data = YAML(typ="safe").load(path.read_text())
    try:
        return PromotionGates.model_validate(data or {})
    except ValueError as e:
        raise _die(f"{path}: {e}") from None


def promote(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[int | None, typer.Option("--version", "-v", help="Version (default: --from).")] = None,
    from_alias: Annotated[str, typer.Option("--from", help="Alias to promote.")] = "candidate",
    to_alias: Annotated[str, typer.Option("--to", help="Alias to move.")] = "production",
    endpoint: Annotated[
        str | None,
        typer.Option("--endpoint", help="Local production endpoint (default: the one this alias used)."),
    ] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port if the endpoint must start.")] = None,
    target: Annotated[
        str | None,
        typer.Option(
            "--target", help="`local` (tritonserver here) or `kubernetes` (the ModelEndpoint NAME)."
        ),
    ] = None,
    namespace: Annotated[str, typer.Option("--namespace", help="ModelEndpoint namespace.")] = "default",
    gates: Annotated[
        Path | None, typer.Option("--gates", help="YAML file of gates (the promote stage's `gates:`).")
    ] = None,
    candidate_endpoint: Annotated[
        str | None, typer.Option("--candidate-url", help="Endpoint serving the version, for the SLO gate.")
    ] = None,
    home: HomeOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Run the gates, point the production endpoint at the version, then move the alias."""
    from forgeline_operators.promote import service
    from forgeline_operators.promote.service import PromoteEndpointSpec

    h, uri = _context(home, tracking_uri)
    if target not in (None, "local", "kubernetes"):
        raise _die(f"--target {target!r}: use local or kubernetes")
    spec: Any = endpoint
    if endpoint and (port or target or namespace != "default"):
        spec = PromoteEndpointSpec(name=endpoint, port=port, target=target, namespace=namespace)
    try:
        record = service.promote(
            h,
            uri,
            model,
            version=version,
            from_alias=from_alias,
            to_alias=to_alias,
            gates=_load_gates(gates),
            endpoint=spec,
            candidate_endpoint=candidate_endpoint,
        )
    except service.GateFailed as e:
        if e.record:
            for gate in e.record.gates:
                mark = "pass" if gate["passed"] else "FAIL"
                err.print(f"  gate {gate['name']}: {mark} {gate['message']}", markup=False, highlight=False)
        raise _die(str(e), 2) from None
    except service.ConflictError as e:
        raise _die(str(e), 3) from None
    except service.PromotionError as e:
        raise _die(str(e)) from None
    _print_record(record)


def rollback(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    to_alias: Annotated[str, typer.Option("--alias", help="Alias to roll back.")] = "production",
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", help="Endpoint (default: remembered).")
    ] = None,
    home: HomeOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Return the alias and its endpoint to the version before the last promotion."""
    from forgeline_operators.promote import service

    h, uri = _context(home, tracking_uri)
    try:
        record = service.rollback(h, uri, model, to_alias=to_alias, endpoint=endpoint)
    except service.ConflictError as e:
        raise _die(str(e), 3) from None
    except service.PromotionError as e:
        raise _die(str(e)) from None
    _print_record(record)


def history(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable records.")] = False,
    home: HomeOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Who promoted what, when, with which gate results (newest first)."""
    from forgeline_operators.promote import service

    _, uri = _context(home, tracking_uri)
    records = service.history(uri, model)
    if as_json:
        print(json.dumps([r.model_dump() for r in records], indent=2))
        return
    table = Table(title=f"promotions of {model}")
    for col in ("when", "action", "version", "alias", "from", "actor", "outcome", "gates", "seconds"):
        table.add_column(col)
    for r in records:
        when = dt.datetime.fromtimestamp(r.started_at).strftime("%Y-%m-%d %H:%M:%S")
        gates = ", ".join(f"{g['name']}={'pass' if g['passed'] else 'FAIL'}" for g in r.gates) or "-"
        table.add_row(
            when,
            r.action,
            str(r.version),
            r.to_alias,
            str(r.previous_version or "-"),
            r.actor,
            r.outcome,
            gates,
            f"{r.duration_s:.1f}",
        )
    out.print(table)


def approve(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[int, typer.Option("--version", "-v", help="Version to approve.")],
    note: Annotated[str, typer.Option("--note", help="Why (kept on the version).")] = "",
    home: HomeOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Approve a version for promotion (the `approval` gate)."""
    from forgeline_operators.promote import service

    _, uri = _context(home, tracking_uri)
    try:
        service.approve(uri, model, version, note=note)
    except service.PromotionError as e:
        raise _die(str(e)) from None
    out.print(f"approved {model} version {version}")


def models(
    name: Annotated[str | None, typer.Argument(help="A model: list its versions.")] = None,
    home: HomeOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Registered models and their aliases, or one model's versions."""
    from forgeline.tracking import Tracker, list_models, list_versions

    _, uri = _context(home, tracking_uri)
    tracker = Tracker(uri)
    if name is None:
        table = Table(title="registered models")
        for col in ("name", "latest", "aliases"):
            table.add_column(col)
        for m in list_models(tracker):
            aliases = ", ".join(f"{a}={v}" for a, v in sorted(m["aliases"].items()))
            table.add_row(m["name"], str(m["latest_version"] or "-"), aliases or "-")
        out.print(table)
        return
    table = Table(title=f"versions of {name}")
    for col in ("version", "aliases", "uri", "sha256"):
        table.add_column(col)
    for v in list_versions(tracker, name):
        sha = v.tags.get("forgeline.sha256", "")[:12]
        table.add_row(str(v.version), ", ".join(v.aliases) or "-", v.uri, sha)
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command()(promote)
    app.command()(rollback)
    app.command()(history)
    app.command()(approve)
    app.command()(models)

"""CLI of the REST API: ``forgeline api`` serves it; ``forgeline api token create`` issues a token.

Thin and lazy: FastAPI, MLflow and the promotion service are imported only when the server starts, so
``forgeline --help`` stays fast.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

out = Console()
err = Console(stderr=True)

api_app = typer.Typer(
    help="The REST API: `forgeline api` serves it; `forgeline api token create` issues tokens.",
    invoke_without_command=True,
    no_args_is_help=False,
)
token_app = typer.Typer(help="Bearer tokens of the API (stored as sha256 only).", no_args_is_help=True)
api_app.add_typer(token_app, name="token")

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="Forgeline state directory (default: ./.forgeline or $FORGELINE_HOME)."),
]
TokensOpt = Annotated[
    Path | None,
    typer.Option("--tokens", help="Tokens file (default: <home>/api/tokens.json)."),
]


def _home(home: Path | None) -> Path:
    from forgeline.tracking import default_home

    return home.resolve() if home else default_home()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@api_app.callback()
def serve(
    ctx: typer.Context,
    port: Annotated[int, typer.Option("--port", help="Port.")] = 8300,
    host: Annotated[str, typer.Option("--host", help="Bind address.")] = "127.0.0.1",
    tokens: TokensOpt = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="No tokens: every caller is the local user (127.0.0.1 only).")
    ] = False,
    data_root: Annotated[
        Path | None,
        typer.Option(
            "--data-root", help="Relative dataset paths of submissions resolve here (default: cwd)."
        ),
    ] = None,
    max_body: Annotated[int, typer.Option("--max-body", help="Request body limit in bytes.")] = 1 << 20,
    home: HomeOpt = None,
) -> None:
    """Serve the REST API (OpenAPI at /openapi.json, resources under /v1)."""
    if ctx.invoked_subcommand is not None:
        return
    h = _home(home)
    tokens_file = (tokens or h / "api" / "tokens.json").resolve()
    if no_auth and not _loopback(host):
        err.print(f"error: --no-auth is allowed only on a loopback address, not {host!r}", style="red")
        raise typer.Exit(2)
    if not no_auth and not tokens_file.is_file():
        err.print(
            f"error: no tokens file {tokens_file}: create a token with "
            f"`forgeline api token create NAME --scopes read,submit,promote` (or use --no-auth on 127.0.0.1)",
            style="red",
            markup=False,
        )
        raise typer.Exit(2)
    import uvicorn

    from forgeline.api import ApiSettings, TokenFileError, create_app
    from forgeline.tracking import prepare, resolve_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tracking = resolve_settings(None, "Default", h)
    prepare(tracking)  # create/migrate the store once, before any submitted driver races to do it
    settings = ApiSettings(
        home=h,
        tracking_uri=tracking.uri,
        data_root=(data_root or Path.cwd()).resolve(),
        tokens_file=None if no_auth else tokens_file,
        no_auth=no_auth,
        max_body_bytes=max_body,
    )
    try:
        app = create_app(settings)
    except (TokenFileError, ValueError) as e:
        err.print(f"error: {e}", style="red", markup=False)
        raise typer.Exit(2) from None
    if no_auth:
        err.print("WARNING: --no-auth: anyone who can reach this port acts as you", style="bold red")
    out.print(f"Forgeline API on http://{host}:{port}  (OpenAPI: /openapi.json, home {h})", highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="info")


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="Subject of the token (recorded as submitter / actor).")],
    scopes: Annotated[str, typer.Option("--scopes", help="Comma-separated: read, submit, promote.")] = "read",
    tokens: TokensOpt = None,
    home: HomeOpt = None,
) -> None:
    """Create a token, add its sha256 to the tokens file, and print the token (shown only once)."""
    from forgeline.api import SCOPES, TokenFileError, create_token

    wanted = [s.strip() for s in scopes.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SCOPES]
    if unknown or not wanted:
        err.print(f"error: scopes must be among {', '.join(SCOPES)} (got {scopes!r})", style="red")
        raise typer.Exit(2)
    path = (tokens or _home(home) / "api" / "tokens.json").resolve()
    try:
        raw = create_token(path, name, wanted)  # type: ignore[arg-type]
    except TokenFileError as e:
        err.print(f"error: {e}", style="red", markup=False)
        raise typer.Exit(2) from None
    err.print(f"token for {name!r} with scopes {', '.join(sorted(set(wanted)))} added to {path}")
    err.print("it is shown only this once; store it now:")
    sys.stdout.write(raw + "\n")


def register(app: typer.Typer) -> None:
    app.add_typer(api_app, name="api")

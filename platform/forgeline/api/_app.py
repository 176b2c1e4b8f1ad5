"""The FastAPI application: routers under ``/v1``, one error shape, the body limit, and the auth mode.

:func:`create_app` is the only constructor; it has no side effects beyond reading the tokens file, so a
test builds as many apps as it likes (each with its own settings and, if needed, a stand-in launcher).
"""

from __future__ import annotations

import getpass
import logging
import subprocess
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from forgeline.api._auth import TokenStore
from forgeline.api._errors import BodyLimit, install_error_handlers
from forgeline.api._routes_models import router as models_router
from forgeline.api._routes_runs import router as runs_router
from forgeline.api._settings import ApiSettings
from forgeline.api._submit import Launcher, launch_detached

log = logging.getLogger("forgeline.api")

API_VERSION = "1"


class Health(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: str = Field(description="`ok` when the server answers.")
    auth: bool = Field(description="Whether bearer tokens are required.")


def create_app(settings: ApiSettings, launcher: Launcher | None = None) -> FastAPI:
    """The API over ``settings.home``; ``launcher`` starts a submitted run (default: detached
    ``forgeline run``)."""
    if not settings.no_auth and settings.tokens_file is None:
        raise ValueError(
            "the API needs a tokens file (create one with `forgeline api token create NAME --scopes read`) "
            "or --no-auth on 127.0.0.1"
        )
    app = FastAPI(
        title="Forgeline API",
        version=API_VERSION,
        description="Submit workflows, follow runs, promote models. Bearer tokens with scopes "
        "read / submit / promote (see docs/api.md).",
        openapi_url="/openapi.json",
    )
    app.state.settings = settings
    app.state.tokens = None if settings.no_auth else TokenStore(settings.tokens_file)  # type: ignore[arg-type]
    app.state.anonymous_subject = f"{getpass.getuser()}@local"
    app.state.launcher = launcher or launch_detached
    processes: dict[str, subprocess.Popen[Any]] = {}  # submission id -> driver, polled so it is reaped
    app.state.processes = processes
    if settings.no_auth:
        log.warning("AUTHENTICATION IS OFF: every request acts as %s", app.state.anonymous_subject)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.get("/v1/health", response_model=Health, summary="Liveness (no token needed)")
    def health() -> Health:
        return Health(status="ok", auth=not settings.no_auth)

    app.include_router(runs_router)
    app.include_router(models_router)
    _text_responses_without_json(app)
    return app


def _text_responses_without_json(app: FastAPI) -> None:
    """FastAPI adds an empty ``application/json`` to a 200 documented as ``text/plain`` (the logs
    route); drop it so clients and schema checks see the one real media type."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for item in schema.get("paths", {}).values():
                for op in item.values():
                    for resp in op.get("responses", {}).values():
                        content = resp.get("content", {})
                        if "text/plain" in content and content.get("application/json") == {"schema": {}}:
                            del content["application/json"]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

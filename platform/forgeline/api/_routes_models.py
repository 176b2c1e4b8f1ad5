"""Routes for registered models and endpoints: list models, versions and aliases; promote, roll back
and read the promotion history through :mod:`forgeline_operators.promote.service` (the same functions
``forgeline promote|rollback|history`` call, with the token's subject as the actor); list endpoints.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlparse

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field, field_validator

from forgeline.api._auth import Principal, require
from forgeline.api._errors import ERROR_RESPONSES, ApiError, ErrorBody
from forgeline.api._settings import ApiSettings
from forgeline.spec import ALIAS_PATTERN, REGISTERED_NAME_PATTERN
from forgeline.tracking import Tracker, list_models, list_versions, model_aliases
from forgeline_operators.promote import service
from forgeline_operators.promote.service import PromoteEndpointSpec, PromotionGates, PromotionRecord

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)

ModelName = Annotated[
    str,
    PathParam(pattern=REGISTERED_NAME_PATTERN, description="Registered model name."),
]
ALIAS = ALIAS_PATTERN


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelOut(_In):
    name: str = Field(description="Registered model name.")
    aliases: dict[str, int] = Field(description="Alias -> version.")
    latest_version: int | None = Field(description="Newest version.")
    description: str | None = Field(description="Model description.")


class VersionOut(_In):
    version: int = Field(description="Version number.")
    aliases: list[str] = Field(description="Aliases naming it.")
    uri: str = Field(description="Where its files are (registered by reference).")
    sha256: str | None = Field(description="Digest of its files.")
    run_id: str | None = Field(description="Run that registered it.")
    tags: dict[str, str] = Field(description="Version tags (lineage, metrics, gate results).")


class PromoteIn(_In):
    version: int | None = Field(default=None, ge=1, description="Version to promote (default: from_alias).")
    from_alias: str = Field(
        default="candidate", pattern=ALIAS, description="Alias whose version is promoted."
    )
    to_alias: str = Field(default="production", pattern=ALIAS, description="Alias to move.")
    endpoint: PromoteEndpointSpec | None = Field(
        default=None, description="Production endpoint (default: the one this alias used before)."
    )
    gates: PromotionGates | None = Field(default=None, description="Gates, as in a promote stage.")
    candidate_endpoint: str | None = Field(
        default=None, max_length=500, description="http(s) URL serving the version, for the SLO gate."
    )

    @field_validator("candidate_endpoint")
    @classmethod
    def _http_only(cls, value: str | None) -> str | None:
        if value is not None:
            parsed = urlparse(value)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError("must be an http:// or https:// URL")
        return value


class RollbackIn(_In):
    to_alias: str = Field(default="production", pattern=ALIAS, description="Alias to roll back.")
    endpoint: str | None = Field(
        default=None, pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="Endpoint (default: remembered)."
    )


class EndpointOut(_In):
    name: str = Field(description="Endpoint name.")
    url: str = Field(description="OpenAI-compatible base URL.")
    port: int = Field(description="Port.")
    model: str = Field(description="Model name it serves.")
    ready: bool = Field(description="Whether it reported ready.")
    alive: bool = Field(description="Whether its supervisor process is alive.")
    started_at: float = Field(description="Unix time it started.")


def _settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


def _not_found(name: str, e: MlflowException) -> ApiError:
    if e.error_code == "RESOURCE_DOES_NOT_EXIST":
        return ApiError(404, "not_found", f"no registered model {name!r}")
    return ApiError(400, "registry_error", f"model {name!r}: {e.message}")


@router.get("/models", response_model=list[ModelOut], summary="Registered models")
def get_models(request: Request, who: Annotated[Principal, require("read")]) -> list[dict[str, Any]]:
    return list_models(Tracker(_settings(request).tracking_uri))


@router.get("/models/{name}/versions", response_model=list[VersionOut], summary="Versions, newest first")
def get_versions(
    request: Request, name: ModelName, who: Annotated[Principal, require("read")]
) -> list[VersionOut]:
    try:
        versions = list_versions(Tracker(_settings(request).tracking_uri), name)
    except MlflowException as e:
        raise _not_found(name, e) from None
    return [
        VersionOut(
            version=v.version,
            aliases=list(v.aliases),
            uri=v.uri,
            sha256=v.tags.get("forgeline.sha256"),
            run_id=v.run_id,
            tags=v.tags,
        )
        for v in versions
    ]


@router.get("/models/{name}/aliases", response_model=dict[str, int], summary="Alias -> version")
def get_aliases(
    request: Request, name: ModelName, who: Annotated[Principal, require("read")]
) -> dict[str, int]:
    try:
        return model_aliases(Tracker(_settings(request).tracking_uri), name)
    except MlflowException as e:
        raise _not_found(name, e) from None


def _record_error(e: Exception) -> ApiError:
    record = getattr(e, "record", None)
    details = {"record": record.model_dump(mode="json")} if record is not None else None
    if isinstance(e, service.GateFailed):
        gates = record.gates if record is not None else []
        return ApiError(412, "gate_failed", str(e), {**(details or {}), "gates": gates})
    if isinstance(e, service.ConflictError):
        return ApiError(409, "conflict", str(e), details)
    return ApiError(400, "promotion_refused", str(e), details)


_PROMOTE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Promotion impossible (unknown version, rollout failed)."},
    409: {"model": ErrorBody, "description": "Another promotion of this model is in progress."},
    412: {"model": ErrorBody, "description": "A gate blocked it; details.gates has the numbers."},
}


@router.post(
    "/models/{name}/promote",
    summary="Run the gates, point the production endpoint at the version, move the alias",
    response_model=PromotionRecord,
    responses=_PROMOTE_ERRORS,
)
def promote(
    request: Request, name: ModelName, body: PromoteIn, who: Annotated[Principal, require("promote")]
) -> PromotionRecord:
    settings = _settings(request)
    try:
        record = service.promote(
            settings.home,
            settings.tracking_uri,
            name,
            version=body.version,
            from_alias=body.from_alias,
            to_alias=body.to_alias,
            gates=body.gates,
            endpoint=body.endpoint,
            candidate_endpoint=body.candidate_endpoint,
            actor=who.subject,
        )
    except service.PromotionError as e:
        raise _record_error(e) from None
    except MlflowException as e:
        raise _not_found(name, e) from None
    return record


@router.post(
    "/models/{name}/rollback",
    summary="Return the alias and its endpoint to the previous version",
    response_model=PromotionRecord,
    responses=_PROMOTE_ERRORS,
)
def rollback(
    request: Request,
    name: ModelName,
    who: Annotated[Principal, require("promote")],
    body: RollbackIn | None = None,
) -> PromotionRecord:
    settings = _settings(request)
    body = body or RollbackIn()
    try:
        record = service.rollback(
            settings.home,
            settings.tracking_uri,
            name,
            to_alias=body.to_alias,
            endpoint=body.endpoint,
            actor=who.subject,
        )
    except service.PromotionError as e:
        raise _record_error(e) from None
    except MlflowException as e:
        raise _not_found(name, e) from None
    return record


@router.get(
    "/models/{name}/history",
    response_model=list[PromotionRecord],
    summary="Promotions and rollbacks, newest first",
)
def history(
    request: Request, name: ModelName, who: Annotated[Principal, require("read")]
) -> list[PromotionRecord]:
    return service.history(_settings(request).tracking_uri, name)


@router.get("/endpoints", response_model=list[EndpointOut], summary="Local endpoints")
def endpoints(request: Request, who: Annotated[Principal, require("read")]) -> list[EndpointOut]:
    from forgeline_operators.deploy.endpoint import list_endpoints

    return [
        EndpointOut(
            name=r.name,
            url=r.url,
            port=r.port,
            model=r.model,
            ready=r.ready,
            alive=r.alive,
            started_at=r.started_at,
        )
        for r in list_endpoints(_settings(request).home)
    ]

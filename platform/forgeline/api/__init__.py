"""The REST API (``forgeline api``): submit workflow YAML, follow runs and their stages, cancel, read
logs, list models / versions / aliases / endpoints, promote and roll back -- over the same services
the CLI uses (spec loader, planner, ``forgeline run``, MLflow tracking, the promotion service).

Resources live under ``/v1``, the OpenAPI document at ``/openapi.json``; every error is
``{"error": {"code", "message", "details"}}``. Bearer tokens carry scopes ``read``, ``submit`` and
``promote``; their subject is recorded as the submitter of runs and the actor of promotions.
"""

from forgeline.api._app import create_app
from forgeline.api._auth import SCOPES, TokenFileError, create_token, load_tokens, token_hash
from forgeline.api._settings import ApiSettings

__all__ = [
    "SCOPES",
    "ApiSettings",
    "TokenFileError",
    "create_app",
    "create_token",
    "load_tokens",
    "token_hash",
]

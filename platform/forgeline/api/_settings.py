"""Settings of the REST API server: where state lives, who may call, and the request limits.

One typed object built by ``forgeline api`` (or a test) and handed to :func:`forgeline.api.create_app`;
routes read it from ``app.state.settings`` and never from the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from forgeline.runtime import CANCEL_WAIT_S


class ApiSettings(BaseModel):
    """What the API serves and how strictly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    home: Path = Field(description="Forgeline state directory (MLflow store, artifacts, endpoints, logs).")
    tracking_uri: str = Field(description="MLflow tracking URI every route reads and every run writes.")
    data_root: Path = Field(
        description="Relative dataset paths of a submitted workflow resolve here; no dataset outside it."
    )
    tokens_file: Path | None = Field(
        default=None, description="Bearer tokens (sha256 -> subject, scopes); None only with no_auth."
    )
    no_auth: bool = Field(
        default=False, description="Accept every request as the local user (only on a loopback bind)."
    )
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="Larger request bodies get 413.")
    max_yaml_nodes: int = Field(
        default=100_000, ge=100, description="YAML nodes after expanding aliases (alias bombs get 422)."
    )
    cancel_wait_s: float = Field(
        default=CANCEL_WAIT_S,
        gt=0,
        description="How long a cancel waits for the driver before a second SIGINT.",
    )
    submit_wait_s: float = Field(
        default=60.0, gt=0, description="How long POST /v1/workflows waits for the run id."
    )

    @property
    def artifact_root(self) -> Path:
        return self.home / "artifacts"

    @property
    def submissions_dir(self) -> Path:
        return self.home / "api" / "submissions"

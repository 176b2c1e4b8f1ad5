"""Bearer-token authentication with scopes (``read``, ``submit``, ``promote``).

The tokens file maps the sha256 of each token to its subject and scopes; raw tokens are never stored,
only shown once by ``forgeline api token create``. The file is re-read when it changes, so a new token
works without restarting the server. The subject of the token is the actor of a promotion and the
submitter recorded on a workflow run.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from forgeline.api._errors import ApiError
from forgeline.errors import ForgelineError

Scope = Literal["read", "submit", "promote"]
SCOPES: tuple[Scope, ...] = ("read", "submit", "promote")
TOKEN_PREFIX = "flt_"


class TokenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subject: str = Field(min_length=1, max_length=200, description="Who holds the token (the actor).")
    scopes: list[Scope] = Field(min_length=1, description="What the token may do.")
    created_at: float | None = Field(default=None, description="Unix time the token was created.")


_FILE = TypeAdapter(dict[str, TokenEntry])


class TokenFileError(ForgelineError, ValueError):
    """The tokens file is unreadable or malformed; the message names the file and the fix."""


@dataclass(frozen=True)
class Principal:
    subject: str
    scopes: frozenset[str]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: Path) -> dict[str, TokenEntry]:
    from ruamel.yaml import YAML  # safe loader: YAML is a superset of JSON, so both formats work

    try:
        data = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise TokenFileError(f"cannot read tokens file {path}: {e.strerror or e}") from None
    except Exception as e:
        raise TokenFileError(f"tokens file {path} is not valid YAML/JSON: {e}") from None
    try:
        tokens = _FILE.validate_python(data)
    except ValidationError as e:
        raise TokenFileError(
            f"tokens file {path}: expected `<sha256>: {{subject, scopes}}` entries: {e}"
        ) from None
    bad = [k for k in tokens if len(k) != 64 or any(c not in "0123456789abcdef" for c in k)]
    if bad:
        raise TokenFileError(f"tokens file {path}: keys must be sha256 hex digests, not {bad[0][:16]!r}…")
    return tokens


def create_token(path: Path, subject: str, scopes: list[Scope]) -> str:
    """Add a new token for ``subject`` to the tokens file (created 0600 if absent); return it once."""
    import json

    tokens = load_tokens(path) if path.exists() else {}
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    tokens[token_hash(raw)] = TokenEntry(subject=subject, scopes=sorted(set(scopes)), created_at=time.time())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = {k: v.model_dump(exclude_none=True) for k, v in tokens.items()}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return raw


class TokenStore:
    """The tokens file, re-read when its mtime or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._tokens: dict[str, TokenEntry] = {}
        self.reload()

    def reload(self) -> None:
        st = self.path.stat()
        stamp = (st.st_mtime, st.st_size)
        if stamp != self._stamp:
            self._tokens = load_tokens(self.path)
            self._stamp = stamp

    def lookup(self, token: str) -> TokenEntry | None:
        # A broken edit of the file keeps the last good tokens rather than locking everyone out.
        with contextlib.suppress(OSError, TokenFileError):
            self.reload()
        digest = token_hash(token)
        for key, entry in self._tokens.items():
            if hmac.compare_digest(key, digest):
                return entry
        return None


_bearer = HTTPBearer(auto_error=False, description="A token from `forgeline api token create`.")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="forgeline"'}


def principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """Who is calling: the token's subject, or the local user when the server runs with --no-auth."""
    store: TokenStore | None = request.app.state.tokens
    if store is None:  # --no-auth, allowed only on a loopback bind (checked at startup)
        return Principal(request.app.state.anonymous_subject, frozenset(SCOPES))
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise ApiError(
            401,
            "unauthenticated",
            "missing bearer token: send `Authorization: Bearer <token>` "
            "(create one with `forgeline api token create NAME --scopes read`)",
            headers=_CHALLENGE,
        )
    entry = store.lookup(credentials.credentials)
    if entry is None:
        raise ApiError(
            401,
            "unauthenticated",
            "unknown bearer token",
            headers={"WWW-Authenticate": 'Bearer realm="forgeline", error="invalid_token"'},
        )
    return Principal(entry.subject, frozenset(entry.scopes))


def require(scope: Scope) -> Any:
    """A dependency that lets the call through only with ``scope``; returns the :class:`Principal`."""

    def check(who: Annotated[Principal, Depends(principal)]) -> Principal:
        if scope not in who.scopes:
            raise ApiError(
                403,
                "forbidden",
                f"token of {who.subject!r} lacks the {scope!r} scope "
                f"(has: {', '.join(sorted(who.scopes))}); create one with --scopes {scope}",
                details={"required_scope": scope, "scopes": sorted(who.scopes)},
            )
        return who

    return Depends(check)

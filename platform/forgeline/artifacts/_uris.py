"""Model URIs: parse, fingerprint (for cache keys) and materialize to a local directory.

Schemes: a local path or ``file://`` (a directory, or a model file such as ``.gguf`` that a
registered :class:`~forgeline.registry.ModelFormat` converts once into a verified HF checkpoint);
``builtin://NAME`` (a registered ``ModelSource``, written into the store once per fingerprint);
``hf://ORG/NAME[@REVISION]`` (``huggingface_hub.snapshot_download`` into the hub's cache, then copied
file by file through the confinement checks); ``hf://ORG/NAME/FILE.gguf[@REVISION]`` (that one file,
converted); ``s3://BUCKET/PREFIX`` (boto3; fingerprinted by a digest of the object listing, so a
changed object changes the cache keys without a download). A registered version --
``mlflow://models/NAME/VERSION`` or ``mlflow://models/NAME@ALIAS``, and MLflow's own spellings
``models:/NAME/VERSION`` / ``models:/NAME@ALIAS`` for the same (what a register stage prints) -- is
parsed here into a :class:`RegistryRef` and resolved by a :class:`SchemeResolver` that the layer owning
tracking plugs into :attr:`ModelStore.schemes` (``forgeline.runtime.model_store`` builds every store
that way). Remote downloads land in the store's ``models/`` cache, published atomically, so a second
use is a directory lookup.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from forgeline.artifacts._confine import PathEscapeError, check_tree, confined, safe_relpath
from forgeline.artifacts._manifest import (
    MANIFEST_NAME,
    dir_digest,
    new_staging_dir,
    publish,
    read_manifest,
    sha256_file,
)
from forgeline.errors import ForgelineError
from forgeline.registry import ModelSource, OperatorRegistry


class UriError(ForgelineError, ValueError):
    """A model URI that cannot be resolved; the message says what to change."""


MODELS_PREFIX = "models:/"  # MLflow's registry URIs; the same versions as mlflow://models/...
REGISTRY_FORMS = (
    "mlflow://models/NAME/VERSION, mlflow://models/NAME@ALIAS, models:/NAME/VERSION or models:/NAME@ALIAS"
)


@dataclass(frozen=True)
class RegistryRef:
    """A registered model version named by a URI: by version number or by alias (exactly one)."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return f"mlflow://models/{self.name}" + (f"@{self.alias}" if self.alias else f"/{self.version}")


@dataclass(frozen=True)
class ParsedUri:
    scheme: str  # "local" | "builtin" | "hf" | "s3" | "mlflow"
    target: str  # path, name, repo id, bucket/prefix, or registry reference
    revision: str | None = None
    ref: RegistryRef | None = None  # scheme "mlflow": the version it names
    uri: str = field(default="", compare=False)  # as written, for messages


def _registry_ref(uri: str, path: str) -> RegistryRef:
    """``NAME/VERSION`` or ``NAME@ALIAS`` (the part after ``models/``); every other form is refused
    here, at parse time, so ``plan`` reports it on the stage instead of a worker failing later."""
    bad = f"{uri!r}: expected {REGISTRY_FORMS}"
    if "@" in path:
        name, _, alias = path.partition("@")
        if not name or "/" in name or not alias or "/" in alias or "@" in alias:
            raise UriError(bad)
        return RegistryRef(name, alias=alias)
    name, _, version = path.rpartition("/")
    if not name or "/" in name:
        raise UriError(bad)
    if not version.isdigit() or int(version) < 1:
        # MLflow's stage form (models:/NAME/Production) and `latest` name no fixed version: say so.
        raise UriError(f"{bad}; {version!r} is not a version number (name an alias with @ALIAS instead)")
    return RegistryRef(name, version=int(version))


def parse_uri(uri: str, base_dir: Path | None = None) -> ParsedUri:
    if uri.startswith(MODELS_PREFIX):
        # MLflow's spelling: a path without "://" would otherwise be read as a relative directory.
        ref = _registry_ref(uri, uri[len(MODELS_PREFIX) :])
        return ParsedUri("mlflow", str(ref).removeprefix("mlflow://"), ref=ref, uri=uri)
    if "://" not in uri:
        p = Path(uri).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        return ParsedUri("local", str(p.resolve()), uri=uri)
    scheme, _, rest = uri.partition("://")
    if scheme == "file":
        return ParsedUri("local", str(Path(urlparse(uri).path).resolve()), uri=uri)
    if scheme == "builtin":
        return ParsedUri("builtin", rest.strip("/"), uri=uri)
    if scheme == "hf":
        repo, _, rev = rest.partition("@")
        if repo.count("/") < 1 or not all(repo.split("/")):
            raise UriError(
                f"{uri!r}: expected hf://ORG/NAME[@REVISION] or hf://ORG/NAME/FILE.gguf[@REVISION]"
            )
        return ParsedUri("hf", repo, rev or None, uri=uri)
    if scheme == "s3":
        if not rest or rest.startswith("/"):
            raise UriError(f"{uri!r}: expected s3://BUCKET/PREFIX")
        return ParsedUri("s3", rest, uri=uri)
    if scheme == "mlflow":
        if not rest.startswith("models/"):
            raise UriError(f"{uri!r}: expected {REGISTRY_FORMS}")
        ref = _registry_ref(uri, rest[len("models/") :])
        return ParsedUri("mlflow", rest, ref=ref, uri=uri)
    raise UriError(
        f"{uri!r}: unknown scheme {scheme!r} (use a path, builtin://, hf://, s3://, mlflow:// or models:/)"
    )


class SchemeResolver(Protocol):
    """A URI scheme resolved outside this package (``mlflow``: the runtime, which owns tracking)."""

    def fingerprint(self, parsed: ParsedUri) -> str:
        """A cheap, stable identity of the content the URI names now (for cache keys)."""
        ...

    def materialize(self, parsed: ParsedUri) -> Path:
        """The local directory holding the model the URI names."""
        ...


@dataclass
class ModelStore:
    """Materializes model URIs into ``root/models`` and fingerprints them for cache keys."""

    root: Path
    registry: OperatorRegistry
    # Schemes resolved by other layers, by scheme name (forgeline.runtime.model_store adds ``mlflow``).
    schemes: dict[str, SchemeResolver] = field(default_factory=dict)
    # The Hugging Face cache hf:// reads through (None: the hub's default, HF_HUB_CACHE).
    hf_cache_dir: Path | None = None

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def fingerprint(self, uri: str, base_dir: Path | None = None) -> str:
        """A cheap, stable identity of the model's content for cache keys."""
        parsed = parse_uri(uri, base_dir)
        if parsed.scheme in self.schemes:
            return self.schemes[parsed.scheme].fingerprint(parsed)
        if parsed.scheme == "builtin":
            return f"builtin:{parsed.target}:{self._builtin(parsed.target).fingerprint()}"
        if parsed.scheme == "local":
            path = Path(parsed.target)
            fmt = self.registry.format_for(path) if path.is_file() else None
            if fmt is not None:
                return f"{fmt.name}:{fmt.version}:{self._local_digest(path)}"
            return f"local:{self._local_digest(path)}"
        if parsed.scheme == "hf":
            # Unpinned revisions move; the plan reports that the cache cannot see such changes.
            return f"hf:{parsed.target}@{parsed.revision or 'main'}"
        if parsed.scheme == "s3":
            return f"s3:{parsed.target}:{self._s3_listing(parsed)[0]}"
        # Never a fingerprint of the name alone: an alias that moved would keep its old cache keys.
        raise self._unresolvable(parsed)

    def materialize(self, uri: str, base_dir: Path | None = None) -> Path:
        parsed = parse_uri(uri, base_dir)
        if parsed.scheme in self.schemes:
            return self.schemes[parsed.scheme].materialize(parsed)
        if parsed.scheme == "local":
            p = Path(parsed.target)
            if not p.exists():
                raise UriError(f"model path does not exist: {p}")
            if p.is_file():
                return self._converted(p, uri)
            return p
        if parsed.scheme == "builtin":
            source = self._builtin(parsed.target)
            final = self.models_dir / f"builtin-{parsed.target}-{source.fingerprint()[:16]}"
            if read_manifest(final) is None:
                staging = new_staging_dir(final)
                source.materialize(staging)
                publish(staging, final, {"uri": uri})
            return final
        if parsed.scheme == "hf":
            return self._hf(parsed)
        if parsed.scheme == "s3":
            return self._s3(parsed)
        raise self._unresolvable(parsed)

    def _unresolvable(self, parsed: ParsedUri) -> UriError:
        return UriError(
            f"{parsed.uri!r}: scheme {parsed.scheme!r} is not resolvable by this model store (it resolves "
            f"{', '.join(sorted(self.schemes)) or 'no registry URIs'}); build it with "
            "forgeline.runtime.model_store"
        )

    def _builtin(self, name: str) -> ModelSource:
        source = self.registry.model(name)
        if source is None:
            known = ", ".join(m.name for m in self.registry.models()) or "none installed"
            raise UriError(f"unknown builtin model {name!r} (known: {known})")
        return source

    def _local_digest(self, path: Path) -> str:
        if not path.exists():
            raise UriError(f"model path does not exist: {path}")
        m = read_manifest(path)
        if m is not None:
            return m.digest
        # Hashing a multi-GB checkpoint on every plan is slow: remember it by (size, mtime) per file.
        stat_key = hashlib.sha256()
        if path.is_file():  # a model file (.gguf): its own bytes
            st = path.stat()
            stat_key.update(f"file:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for name in sorted(filenames):
                st = (Path(dirpath) / name).stat()
                stat_key.update(f"{dirpath}/{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        memo = self.root / "fingerprints" / f"{stat_key.hexdigest()}.json"
        try:
            return str(json.loads(memo.read_text())["digest"])
        except (OSError, ValueError, KeyError):
            pass
        digest = sha256_file(path) if path.is_file() else dir_digest(path)
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps({"path": str(path), "digest": digest}))
        return digest

    def _converted(self, path: Path, uri: str) -> Path:
        """The HF checkpoint converted (once, published) from a model file such as a ``.gguf``."""
        fmt = self.registry.format_for(path)
        if fmt is None:
            raise UriError(
                f"{path} is a file, not a model directory; model files Forgeline converts: "
                f"{', '.join(self.registry.format_suffixes()) or 'none installed'}"
            )
        digest = self._local_digest(path)
        final = self.models_dir / f"{fmt.name}-{path.stem[:60]}-{fmt.version}-{digest[:16]}"
        if read_manifest(final) is None:
            staging = new_staging_dir(final)
            try:
                fmt.convert(path, staging)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            publish(staging, final, {"uri": uri, "format": fmt.name, "source_sha256": digest})
        return final

    def _hf_file(self, parsed: ParsedUri) -> Path:
        """``hf://ORG/NAME/PATH.gguf``: that one file from the hub (through its cache), converted."""
        from huggingface_hub import hf_hub_download

        org, name, file = parsed.target.split("/", 2)
        try:
            safe_relpath(file, what=f"hf://{parsed.target}: file")
        except PathEscapeError as e:
            raise UriError(str(e)) from None
        try:
            local = hf_hub_download(
                repo_id=f"{org}/{name}", filename=file, revision=parsed.revision, cache_dir=self.hf_cache_dir
            )
        except Exception as e:
            raise UriError(
                f"cannot download hf://{parsed.target}: {e}. Offline? Pre-download it and use its local path."
            ) from e
        return self._converted(Path(local), f"hf://{parsed.target}")

    def _hf(self, parsed: ParsedUri) -> Path:
        from huggingface_hub import snapshot_download

        if parsed.target.count("/") > 1:
            return self._hf_file(parsed)
        final = self.models_dir / f"hf-{parsed.target.replace('/', '--')}-{parsed.revision or 'main'}"
        if read_manifest(final) is not None:
            return final
        try:
            # Into (or, offline, from) the Hugging Face cache, then copied here file by file.
            snapshot = Path(
                snapshot_download(
                    repo_id=parsed.target, revision=parsed.revision, cache_dir=self.hf_cache_dir
                )
            )
        except Exception as e:
            raise UriError(
                f"cannot download hf://{parsed.target}: {e}. Offline? Pre-download it and use its local path."
            ) from e
        staging = new_staging_dir(final)
        try:
            _copy_snapshot(snapshot, staging, what=f"hf://{parsed.target}: file")
        except PathEscapeError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise UriError(f"{e}; refusing to use hf://{parsed.target}") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        publish(staging, final, {"uri": f"hf://{parsed.target}", "revision": parsed.revision})
        return final

    def _s3_listing(self, parsed: ParsedUri) -> tuple[str, list[tuple[str, str, int]]]:
        """(content digest, [(relative path, key, size)]) of the objects under an s3:// prefix.

        The digest hashes every object's key, size and ETag, so a changed object changes the model's
        fingerprint (and the cache keys of the stages using it) without downloading anything. The
        endpoint, region and credentials come from boto3's usual sources (``AWS_ENDPOINT_URL`` for an
        S3-compatible store such as MinIO).
        """
        bucket, _, prefix = parsed.target.partition("/")
        # The prefix is a folder: `s3://b/model` must not take `model-old/...` along with it.
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        objects: list[tuple[str, str, int]] = []
        h = hashlib.sha256()
        try:
            paginator = self._s3_client().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    rel = key[len(prefix) :]
                    if not rel or rel.endswith("/") or rel == MANIFEST_NAME:
                        continue
                    objects.append((rel, key, int(obj["Size"])))
                    h.update(f"{rel}\0{obj['Size']}\0{obj.get('ETag', '')}\n".encode())
        except Exception as e:  # botocore: no credentials, no such bucket, endpoint unreachable
            raise UriError(f"cannot list s3://{parsed.target}: {e}") from e
        for rel, key, _ in objects:
            # A listed key becomes a file name: one that would land outside the download directory
            # (`model/../../x`, an absolute or encoded path) fails the listing, before any download.
            try:
                safe_relpath(rel, what=f"s3://{bucket}/{key}: object key")
            except PathEscapeError as e:
                raise UriError(
                    f"{e}; refusing to download s3://{parsed.target} (remove or rename that object)"
                ) from None
        if not objects:
            raise UriError(f"s3://{parsed.target}: no objects under that prefix")
        return h.hexdigest(), objects

    @staticmethod
    def _s3_client() -> Any:
        import boto3

        return boto3.client("s3")

    def _s3(self, parsed: ParsedUri) -> Path:
        digest, objects = self._s3_listing(parsed)
        bucket = parsed.target.partition("/")[0]
        safe = parsed.target.strip("/").replace("/", "--")
        final = self.models_dir / f"s3-{safe}-{digest[:16]}"
        if read_manifest(final) is not None:
            return final
        staging = new_staging_dir(final)
        client = self._s3_client()
        try:
            for rel, key, size in objects:
                dest = confined(staging, rel, what=f"s3://{bucket}/{key}: object key")
                dest.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, key, str(dest))
                if dest.stat().st_size != size:
                    raise UriError(f"s3://{bucket}/{key}: got {dest.stat().st_size} bytes, listed {size}")
        except UriError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        except PathEscapeError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise UriError(str(e)) from None
        except Exception as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise UriError(f"cannot download s3://{parsed.target}: {e}") from e
        publish(staging, final, {"uri": f"s3://{parsed.target}", "listing_sha256": digest})
        return final


def _copy_snapshot(snapshot: Path, dest: Path, *, what: str) -> None:
    """Copy a hub-cache snapshot into ``dest``: every file name confined, every file a plain file or a
    symlink into the repository's own cache folder (``blobs/``); anything else is refused."""
    repo_root = snapshot.resolve().parent.parent  # <cache>/models--ORG--NAME
    for dirpath, dirnames, filenames in os.walk(snapshot):
        for name in [*dirnames, *filenames]:
            src = Path(dirpath) / name
            rel = src.relative_to(snapshot).as_posix()
            real = src.resolve()
            if not real.is_relative_to(repo_root):
                raise PathEscapeError(f"{what} {rel!r}: points outside the hub cache ({real})")
            if src.is_dir():
                if src.is_symlink():
                    raise PathEscapeError(f"{what} {rel!r}: a directory symlink")
                continue
            if not real.is_file():
                raise PathEscapeError(f"{what} {rel!r}: not a regular file")
            target = confined(dest, rel, what=what)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(real, target)  # same filesystem: no second copy of a multi-GB blob
            except OSError:
                shutil.copyfile(real, target)
    check_tree(dest, what=what)

"""Artifacts: checkpoint manifests (sha256 per file, atomic publish) and model URIs.

A leaf package: it depends on no other forgeline layer except the plain registry of model sources.
"""

from forgeline.artifacts._manifest import (
    MANIFEST_NAME,
    Manifest,
    clean_staging,
    digest_of,
    dir_digest,
    file_table,
    new_staging_dir,
    pid_alive,
    publish,
    read_manifest,
    sha256_file,
    verify,
    write_text_atomic,
)
from forgeline.artifacts._stages import StageRecord, StageStore
from forgeline.artifacts._uris import ModelStore, ParsedUri, UriError, parse_uri

__all__ = [
    "MANIFEST_NAME",
    "Manifest",
    "ModelStore",
    "ParsedUri",
    "StageRecord",
    "StageStore",
    "UriError",
    "clean_staging",
    "digest_of",
    "dir_digest",
    "file_table",
    "new_staging_dir",
    "parse_uri",
    "pid_alive",
    "publish",
    "read_manifest",
    "sha256_file",
    "verify",
    "write_text_atomic",
]

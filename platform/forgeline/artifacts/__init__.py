"""Artifacts: checkpoint manifests (sha256 per file, atomic publish), model URIs, and the confinement
of every file written by a name from outside (object keys, archive members, record names).

A leaf package: it depends on no other forgeline layer except the plain registry of model sources.
"""

from forgeline.artifacts._confine import (
    PathEscapeError,
    check_tree,
    confined,
    extract_zip,
    safe_relpath,
    single_name,
)
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
from forgeline.artifacts._uris import (
    MODELS_PREFIX,
    ModelStore,
    ParsedUri,
    RegistryRef,
    SchemeResolver,
    UriError,
    parse_uri,
)

__all__ = [
    "MANIFEST_NAME",
    "MODELS_PREFIX",
    "Manifest",
    "ModelStore",
    "ParsedUri",
    "PathEscapeError",
    "RegistryRef",
    "SchemeResolver",
    "StageRecord",
    "StageStore",
    "UriError",
    "check_tree",
    "clean_staging",
    "confined",
    "digest_of",
    "dir_digest",
    "extract_zip",
    "file_table",
    "new_staging_dir",
    "parse_uri",
    "pid_alive",
    "publish",
    "read_manifest",
    "safe_relpath",
    "sha256_file",
    "single_name",
    "verify",
    "write_text_atomic",
]

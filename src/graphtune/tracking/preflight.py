"""The tracking store, checked up front: before any data is read, within seconds, in one line.

    check_store(uri) -> the resolved URI, or ConfigError naming the store and what is wrong

- sqlite: the database folder (or the nearest folder that exists above it) must be a writable folder, an
  existing database file must be writable and take a write lock, and its schema must be one this MLflow
  knows (a store upgraded by a newer MLflow is refused rather than half-read). The artifact folder beside
  it (`mlartifacts/`) must be creatable.
- http(s) servers: GET /health must answer within HTTP_TIMEOUT_S seconds (HTTP_ATTEMPTS tries), and the
  server's /version is compared with ours (another major version is refused). MLflow's own client would
  otherwise retry for minutes against an address that does not answer; the check also sets MLflow's
  request timeout and retry environment variables (MLFLOW_HTTP_REQUEST_TIMEOUT, ..._MAX_RETRIES) to short
  values unless the user set them.

Imports no mlflow (the check must be quick, and it runs before anything heavy).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

from graphtune.errors import ConfigError
from graphtune.tracking.tags import _sqlite_path, resolve_tracking_uri

HTTP_TIMEOUT_S = 5.0
HTTP_ATTEMPTS = 2
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def check_store(tracking_uri: str | None = None) -> str:
    uri = resolve_tracking_uri(tracking_uri)
    db = _sqlite_path(uri)
    if db is not None:
        _check_sqlite(uri, db)
    elif uri.startswith(("http://", "https://")):
        _check_http(uri.rstrip("/"))
    return uri


def _existing_ancestor(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path("/")


def _check_folder(uri: str, folder: Path, what: str) -> None:
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise ConfigError(f"tracking store {uri}: cannot create {what} {folder}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"tracking store {uri}: cannot write {what} {folder}: {base} is not writable")


def _known_revisions() -> set[str]:
    spec = importlib.util.find_spec("mlflow")
    if spec is None or not spec.submodule_search_locations:
        return set()
    versions = Path(next(iter(spec.submodule_search_locations))) / "store" / "db_migrations" / "versions"
    revisions = set()
    for file in versions.glob("*.py"):
        head = file.read_text(errors="replace")
        for line in head.splitlines():
            if line.startswith("revision ="):
                revisions.add(line.split("=", 1)[1].strip().strip("\"'"))
                break
    return revisions


def _check_sqlite(uri: str, db: Path) -> None:
    _check_folder(uri, db.parent, "the database folder")
    _check_folder(uri, db.parent / "mlartifacts", "the artifact folder")
    if not db.exists():
        return
    if not db.is_file():
        raise ConfigError(f"tracking store {uri}: {db} is not a file")
    if not os.access(db, os.R_OK | os.W_OK) or not os.access(db.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"tracking store {uri}: {db} is not writable (its file or its folder)")
    try:
        con = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=10)
        try:
            con.execute("BEGIN IMMEDIATE")  # the write lock MLflow will need
            con.execute("ROLLBACK")
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            revision = None
            if "alembic_version" in tables:
                row = con.execute("SELECT version_num FROM alembic_version").fetchone()
                revision = row[0] if row else None
        finally:
            con.close()
    except sqlite3.DatabaseError as err:
        raise ConfigError(f"tracking store {uri}: {db} is not a usable sqlite database ({err})") from None
    if tables and "experiments" not in tables:
        raise ConfigError(f"tracking store {uri}: {db} is a sqlite file but not an MLflow store")
    known = _known_revisions()
    if revision and known and revision not in known:
        raise ConfigError(f"tracking store {uri}: its schema ({revision}) was written by another MLflow than the "
                          "installed one; use that MLflow's version or another store")


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:  # noqa: S310 - the user's own server
        return response.read()


def _check_http(uri: str) -> None:
    for key, value in HTTP_ENV.items():
        os.environ.setdefault(key, value)
    error = None
    for attempt in range(HTTP_ATTEMPTS):
        try:
            _get(f"{uri}/health")
            break
        except (urllib.error.URLError, OSError, ValueError) as err:
            error = getattr(err, "reason", None) or err
            if attempt + 1 < HTTP_ATTEMPTS:
                time.sleep(0.5)
    else:
        raise ConfigError(f"tracking store {uri}: not reachable ({error}); start the server, or point "
                          "MLFLOW_TRACKING_URI / tracking.tracking_uri at a reachable store")
    try:
        theirs = _get(f"{uri}/version").decode().strip().strip('"')
    except (urllib.error.URLError, OSError, ValueError, json.JSONDecodeError):
        return  # an older server without /version: the API calls themselves will tell
    from importlib.metadata import version

    ours = version("mlflow")
    if theirs and theirs.split(".")[0] != ours.split(".")[0]:
        raise ConfigError(f"tracking store {uri}: the server runs MLflow {theirs}, this client {ours}; use "
                          "matching major versions")

"""`graphtune server`: one MLflow tracking server that a team (or a cluster's jobs) logs to and reads from.

It runs `mlflow server` as a child process: runs and metrics go to a database (--backend-store-uri), artifacts
(checkpoints, plots, results files) go through the server to --artifacts-destination, so that clients need the
server's address and nothing else: no access to its disk, and no object-store credentials of their own.

The options are checked before anything starts, each failure one line: the database URI (a scheme MLflow
supports, its Python driver installed, a sqlite file's folder existing and writable, a schema this MLflow
knows), the artifact destination (a storage MLflow has a repository for, with its client library installed),
and the address (an interface of this machine, a port nobody listens on). MLflow itself would report most of
these only as a traceback, or, for a missing object-store library, not before the first artifact upload.

The child runs in its own session and this process forwards SIGINT, SIGTERM (and SIGHUP, as SIGTERM) to it,
then exits with its exit status: Ctrl-C or `kill` stop the server cleanly, exactly once, whether graphtune or
MLflow is the process a supervisor sees.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import click

from graphtune.cli import cli, load_params, params_option, set_option, user_errors

DEFAULT_STORE = "sqlite:///mlflow.db"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")
# The Python package each of MLflow's object-store artifact repositories imports, and what to install for it.
CLIENT_LIBRARIES = {
    "s3": ("boto3", "boto3"), "r2": ("boto3", "boto3"), "b2": ("boto3", "boto3"),
    "gs": ("google.cloud.storage", "google-cloud-storage"),
    "wasbs": ("azure.storage.blob", "azure-storage-blob"),
    "abfss": ("azure.storage.filedatalake", "azure-storage-file-datalake"),
    "hdfs": ("pyarrow", "pyarrow"), "viewfs": ("pyarrow", "pyarrow"),
    "sftp": ("pysftp", "pysftp"),
}
DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}  # the servers' default ports
DB_CONNECT_TIMEOUT_S = 5.0
# The pip package of each database driver module SQLAlchemy imports (postgresql:// means psycopg 3 in SQLAlchemy 2.1).
DRIVER_PACKAGES = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient, or write "
                   "mysql+pymysql:// and pip install pymysql", "pymysql": "pymysql", "pyodbc": "pyodbc",
                   "pymssql": "pymssql", "asyncpg": "asyncpg"}
# Schemes MLflow resolves to another store, not storage: a destination must be where the bytes live.
NOT_STORAGE = ("runs", "models", "mlflow-artifacts")
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP")


@cli.command()
@params_option
@set_option
@click.option("--backend-store-uri", "--backend_store_uri", default=None, metavar="URI",
              help="the database runs and metrics go to: sqlite:///path/mlflow.db, postgresql://user:pass@host/db, "
              "mysql+pymysql://user:pass@host/db, ... (default: tracking.tracking_uri or $MLFLOW_TRACKING_URI when "
              f"it names a database, else {DEFAULT_STORE}).")
@click.option("--artifacts-destination", "--artifacts_destination", default="./mlartifacts", show_default=True,
              metavar="URI", help="where the server keeps artifacts: a folder, or an MLflow artifact URI such as "
              "s3://bucket/path, gs://bucket/path, wasbs://container@account.blob.core.windows.net/path.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="the interface to listen on: 0.0.0.0 for every interface (clients on other machines).")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True, help="the port to listen on.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="server worker processes (default: MLflow's, 4).")
@click.option("--allowed-hosts", "--allowed_hosts", default=None, metavar="HOSTS",
              help="Host headers the server answers, comma-separated, e.g. mlflow.example.com,mlflow.example.com:5000 "
              "(MLflow's default: localhost and private IP addresses only; needed when clients use a name).")
@click.argument("mlflow_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- MLFLOW_SERVER_OPTIONS...]")
@user_errors
def server(params_path, overrides, backend_store_uri, artifacts_destination, host, port, workers, allowed_hosts,
           mlflow_args):
    """A shared MLflow tracking server (runs in a database, artifacts served through it).

    Prints the URI clients set (export MLFLOW_TRACKING_URI=http://HOST:PORT), then runs `mlflow server` until
    it is stopped. Options after `--` go to `mlflow server` unchanged, e.g. `-- --static-prefix /mlflow`.
    """
    # MLflow asks GitPython for commits; without git it would warn on import (here and in the server)
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    params = load_params(params_path, overrides, optional=True)
    store = check_backend_store(backend_store_uri or default_store(params.tracking.tracking_uri),
                                "--backend-store-uri")
    destination = check_artifacts_destination(artifacts_destination)
    check_address(host, port)
    local_artifact_notice(store, host)

    command = [sys.executable, "-m", "mlflow", "server", "--artifacts-destination", destination, "--host", host,
               "--port", str(port)]
    if redact(store) == store:
        command[4:4] = ["--backend-store-uri", store]
    else:  # a password stays out of the process list (`ps`): mlflow server reads the option from its variable
        os.environ["MLFLOW_BACKEND_STORE_URI"] = store
    if workers is not None:
        command += ["--workers", str(workers)]
    if allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts]
    command += list(mlflow_args)

    client_uri = f"http://{client_host(host)}:{port}"
    click.echo(f"graphtune: MLflow tracking server on {host}:{port}; runs in {redact(store)}, artifacts in "
               f"{destination}")
    click.echo(f"clients: export MLFLOW_TRACKING_URI={client_uri}")
    if host not in LOOPBACK and not allowed_hosts:
        click.echo(f"(clients that reach it by name need --allowed-hosts {client_host(host)}:{port}: MLflow answers "
                   "only localhost and private IP addresses by default)")
    sys.stdout.flush()
    sys.exit(run_forwarding_signals(command))


def default_store(configured: str | None) -> str:
    """The tracking section's store (tracking.tracking_uri, else $MLFLOW_TRACKING_URI) when it is a database.

    A client setting that points at a server (http://...), often this very one, is not a place to keep runs:
    the default store then stands in.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri or uri.startswith(("http://", "https://")) or uri == "databricks" or uri.startswith("databricks:"):
        return DEFAULT_STORE
    return uri


def check_backend_store(uri: str, option: str) -> str:
    """The store URI made ready for `mlflow server` (a relative sqlite path made absolute), or ConfigError.

    Accepts what MLflow's server accepts as a tracking database (its DATABASE_ENGINES, with an optional
    +driver). A database server must be reachable and its driver module importable (SQLAlchemy's choice for
    the URI); a sqlite file's folder must exist (the server would otherwise fail on its first request), and
    the file, if there, must be an MLflow store this MLflow can open (graphtune's pre-flight check).
    """
    from graphtune.errors import ConfigError
    from graphtune.tracking.tags import _sqlite_path, resolve_tracking_uri

    if uri.startswith(("http://", "https://")):
        raise ConfigError(f"{option} {uri}: that is a tracking server's address; give the database the server keeps "
                          "its runs in, e.g. sqlite:///mlflow.db or postgresql://user:password@host/db")
    try:
        resolved = resolve_tracking_uri(uri)  # a relative sqlite path, a bare *.db path; refuses MLflow's file store
    except ConfigError as err:
        raise ConfigError(f"{option}: {err}") from None
    scheme = urlparse(resolved).scheme
    engine = scheme.split("+", 1)[0]
    from mlflow.store.db.db_types import DATABASE_ENGINES

    if scheme.count("+") > 1 or engine not in DATABASE_ENGINES:
        hint = "; write postgresql://" if engine == "postgres" else ""
        raise ConfigError(f"{option} {redact(resolved)}: not a database MLflow keeps runs in (expected "
                          f"{', '.join(e + '://' for e in DATABASE_ENGINES)}, optionally with +driver){hint}")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        dialect = make_url(resolved).get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as err:
        raise ConfigError(f"{option} {redact(resolved)}: not a database URI SQLAlchemy can read ({err})") from None
    if engine != "sqlite":
        check_reachable(make_url(resolved), option, redact(resolved))
    try:
        dialect.import_dbapi()
    except ImportError as err:
        package = DRIVER_PACKAGES.get((err.name or "").split(".")[0], err.name)
        raise ConfigError(f"{option} {redact(resolved)}: its database driver {err.name} is not installed where the "
                          f"server runs (pip install {package})") from None
    if engine == "sqlite":
        db = _sqlite_path(resolved)
        if db is None:
            raise ConfigError(f"{option} {resolved}: an in-memory database would lose every run when the server "
                              "stops; give a file, e.g. sqlite:///mlflow.db")
        if not db.parent.is_dir():
            raise ConfigError(f"{option} {resolved}: the folder {db.parent} does not exist (create it, or give "
                              "another path)")
        from graphtune.tracking.preflight import check_store

        check_store(resolved)
    return resolved


def check_reachable(url, option: str, shown: str) -> None:
    """ConfigError unless the database server of `url` accepts a TCP connection within DB_CONNECT_TIMEOUT_S.

    MLflow would retry an unreachable database for minutes, printing a traceback each time. Only the network
    is checked here (a socket path in the URI's query is left alone); a wrong password or database name is
    reported by the database itself, through MLflow, when the server starts.
    """
    from graphtune.errors import ConfigError

    if not url.host:
        return
    port = url.port or DB_PORTS.get(url.get_backend_name())
    try:
        socket.create_connection((url.host, port), timeout=DB_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise ConfigError(f"{option} {shown}: cannot reach the database server {url.host}:{port} ({reason})") from None


def check_artifacts_destination(destination: str) -> str:
    """The destination for `mlflow server`: a local folder as an absolute path, a URI as given; or ConfigError.

    A folder must be creatable (its nearest existing parent a writable folder). A URI's scheme must be one
    MLflow has an artifact repository for (plugins included), and that repository's client library must be
    installed here, where the server runs: MLflow would only fail on the first upload, inside a client's run.
    """
    from graphtune.errors import ConfigError

    parsed = urlparse(destination)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):  # a path (C:\... on Windows)
        from urllib.request import url2pathname

        folder = Path(url2pathname(parsed.path) if scheme == "file" else destination).expanduser().resolve()
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--artifacts-destination {destination}: {folder} is a file, not a folder")
        base = next(p for p in (folder, *folder.parents) if p.exists())
        if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
            raise ConfigError(f"--artifacts-destination {destination}: cannot create or write {folder} ({base} is "
                              "not a writable folder)")
        return str(folder)
    from mlflow.store.artifact.artifact_repository_registry import get_registered_artifact_repositories

    known = sorted(s for s in get_registered_artifact_repositories() if s and s not in NOT_STORAGE)
    if scheme not in known:
        raise ConfigError(f"--artifacts-destination {destination}: MLflow has no artifact storage for {scheme}:// "
                          f"(it knows {', '.join(s + '://' for s in known if s != 'file')} and folders)")
    module, package = CLIENT_LIBRARIES.get(scheme, (None, None))
    if module is not None and not _importable(module):
        raise ConfigError(f"--artifacts-destination {destination}: {scheme}:// needs the {package} package where the "
                          f"server runs (pip install {package})")
    return destination


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package (google in google.cloud.storage)
        return False


def check_address(host: str, port: int) -> None:
    """ConfigError unless `host` is an address of this machine and nobody listens on `port` there yet.

    The socket is bound with SO_REUSEADDR, as the server will bind it: a port a stopped server left in
    TIME_WAIT is free, one with a listener is not.
    """
    from graphtune.errors import ConfigError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise ConfigError(f"--host {host}: not an address this machine can listen on ({err.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            import errno

            if err.errno == errno.EADDRINUSE:
                raise ConfigError(f"--port {port}: something already listens on {host}:{port} (another server?); "
                                  "stop it or choose another --port") from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"--host {host}: not an address of this machine") from None
            if err.errno == errno.EACCES:
                raise ConfigError(f"--port {port}: this user may not listen on it (ports below 1024 need "
                                  "privileges); choose another --port") from None
            raise ConfigError(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from None


def local_artifact_notice(store: str, host: str) -> None:
    """A notice when a sqlite store that clients on other machines will use has experiments with local artifacts.

    An experiment created against a local store (graphtune's default) keeps its artifacts at a file:// path;
    a client logging to it through the server writes its artifacts to that path on the client's own disk,
    where neither the server nor anyone else can read them. New experiments store through the server.
    """
    import sqlite3
    import warnings

    from graphtune.errors import GraphTuneNotice
    from graphtune.tracking.tags import _sqlite_path

    db = _sqlite_path(store)
    if host in LOOPBACK or db is None or not db.is_file():
        return
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = con.execute("SELECT name FROM experiments WHERE lifecycle_stage = 'active' AND "
                               "(artifact_location LIKE 'file:%' OR artifact_location LIKE '/%')").fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError:
        return  # an empty or new store: MLflow creates its tables
    if rows:
        names = ", ".join(repr(r[0]) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        warnings.warn(f"experiments {names} of {db} keep artifacts in a local folder: clients on other machines "
                      "would write theirs to their own disks; log shared runs to a new experiment "
                      "(--experiment-name or tracking.experiment_name), whose artifacts go through the server",
                      GraphTuneNotice, stacklevel=1)


def client_host(host: str) -> str:
    """The host part of the URI clients set: this machine's name when listening on every interface."""
    name = socket.gethostname() if host in WILDCARD else host
    return f"[{name}]" if ":" in name else name


def redact(uri: str) -> str:
    """The URI with its password hidden, as printed and in error messages."""
    parsed = urlparse(uri)
    if parsed.password is None:
        return uri
    return uri.replace(f":{parsed.password}@", ":***@", 1)


def run_forwarding_signals(command: list[str]) -> int:
    """Run `command` to its end, forwarding SIGINT and SIGTERM (and SIGHUP as SIGTERM); its exit status.

    The child gets its own session, so a terminal's Ctrl-C reaches it once, through this process, rather
    than also directly (MLflow and uvicorn shut down at once on a second SIGINT). SIGHUP becomes SIGTERM
    because `mlflow server` handles only INT and TERM: on HUP it would die and leave its server running.
    A child killed by signal N gives 128 + N, as a shell reports it.
    """
    import signal
    import subprocess

    child: list[subprocess.Popen] = []
    pending: list[int] = []

    def forward(signum, _frame):
        sent = signal.SIGTERM if signum == getattr(signal, "SIGHUP", None) else signum
        if not child:
            pending.append(sent)  # arrived before the child existed: sent as soon as it does
        elif child[0].poll() is None:
            child[0].send_signal(sent)

    handled = [getattr(signal, name) for name in FORWARDED if hasattr(signal, name)]
    previous = {signum: signal.signal(signum, forward) for signum in handled}
    try:
        child.append(subprocess.Popen(command, start_new_session=os.name == "posix"))
        for signum in pending:
            child[0].send_signal(signum)
        code = child[0].wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - code if code < 0 else code

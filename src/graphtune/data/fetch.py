"""Find a city's raw file locally or download it: plain urllib, atomic writes, sha256 checks.

Sources, in the order `data_source="auto"` tries them:
    local  the file under the city's raw-data folder, put there by the user (or by `dvc pull`)
    cache  an earlier download under the cache folder
    url    a direct http(s):// or file:// URL (the city table's, or one given by the user)
    hf     a Hugging Face dataset repo: {endpoint}/datasets/{repo}/resolve/main/{path}

A download streams into a temporary file next to its destination, is checked against its sha256
and only then renamed into place, so the final name never holds a partial or corrupt file.

What is verified. A file whose sha256 the city table registers (the graphs, the sensor locations, the
embedded sample) is checked against it, locally and after every download. A file without a registered
hash (the full METR-LA and PEMS-BAY series, whose hashes cannot be known offline) is trusted on first use:
the first download's sha256 is recorded in `.graphtune-sha256.json` beside it, and a later download of
that name that differs is kept but reported in one DataNotice, since results computed on it are not
comparable with earlier ones.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import quote
from urllib.request import Request, urlopen

from graphtune.errors import ConfigError, DataError, DataNotice

DATA_SOURCES = ("auto", "local", "url", "hf")
HF_ENDPOINT = "https://huggingface.co"  # overridden by the hf_endpoint argument or the HF_ENDPOINT variable
_CHUNK = 1 << 20  # 1 MiB reads: few system calls, small memory


@dataclass(frozen=True)
class RemoteFile:
    """One raw file and where it can be fetched from."""

    name: str  # file name, e.g. "metr-la.h5"
    url: str | None = None  # direct URL (http(s):// or file://)
    hf_repo: str | None = None  # Hugging Face dataset repo id, e.g. "jimmygao3218/METRLA"
    hf_path: str | None = None  # path inside the repo; None = name
    sha256: str | None = None  # expected digest; None = not checked


def resolve_file(remote: RemoteFile, *, local_dir: Path, data_source: str = "auto", cache_dir: Path,
                 url_override: str | None = None, hf_endpoint: str | None = None, timeout: float = 60) -> Path:
    """Path of a verified copy of `remote`, downloading it into cache_dir when needed.

    data_source: "local" (only local_dir), "url" (url_override or remote.url), "hf" (remote.hf_repo),
        or "auto" (local_dir, then the cache, then the URL, then Hugging Face).
    cache_dir: where downloads go, as cache_dir / remote.name; give each city its own folder,
        since two cities may use the same file name.
    timeout: seconds without data before a download is abandoned.
    """
    if data_source not in DATA_SOURCES:
        raise ConfigError(f"data_source: expected one of {', '.join(DATA_SOURCES)}, got {data_source!r}")
    local = Path(local_dir) / remote.name
    cached = Path(cache_dir) / remote.name
    url = url_override or remote.url
    hf_url = _hf_url(remote, hf_endpoint)

    if data_source == "local":
        if not local.is_file():
            raise DataError(f"{local}: no such file; put {remote.name} in {local_dir} "
                            "(or choose data_source url, hf or auto to download it)")
        _check_hash(local, remote.sha256)
        return local
    if data_source in ("url", "hf"):
        source = url if data_source == "url" else hf_url
        if source is None:
            what = "no URL is known" if data_source == "url" else "no Hugging Face repo is known"
            raise DataError(f"cannot download {remote.name}: {what}; give a URL or put the file in {local_dir}")
        if _verified(cached, remote.sha256):
            return cached
        return _remembered(download(source, cached, sha256=remote.sha256, timeout=timeout), source, remote)

    tried = []  # "auto": every source in turn; one error at the end lists them all
    if local.is_file():
        if _verified(local, remote.sha256):
            return local
        warnings.warn(f"{local}: sha256 differs from the expected {remote.sha256}; ignoring it", DataNotice, stacklevel=2)
        tried.append(f"{local} (wrong sha256)")
    else:
        tried.append(f"{local} (missing)")
    if _verified(cached, remote.sha256):
        return cached
    tried.append(f"cache {cached} ({'wrong sha256' if cached.is_file() else 'missing'})")
    for source in (url, hf_url):
        if source is None:
            continue
        try:
            return _remembered(download(source, cached, sha256=remote.sha256, timeout=timeout), source, remote)
        except DataError as exc:
            tried.append(f"{source} ({_reason(exc, source)})")
    raise DataError(f"cannot find {remote.name}: put it in {local_dir}; tried " + "; ".join(tried))


RECORD = ".graphtune-sha256.json"  # first-download hashes of files the city table has none for


def _remembered(path: Path, url: str, remote: RemoteFile) -> Path:
    """Trust on first use for a file without a registered sha256 (see the module docstring)."""
    if remote.sha256 is not None:
        return path  # verified against the registered hash already
    record_path = path.parent / RECORD
    try:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    except (OSError, ValueError):
        record = {}
    actual = sha256_file(path)
    first = record.get(path.name, {}).get("sha256") if isinstance(record.get(path.name), dict) else None
    if first is None:
        record[path.name] = {"sha256": actual, "url": url}
        tmp = record_path.with_name(f".{RECORD}.{uuid.uuid4().hex[:8]}.part")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, record_path)
    elif first != actual:
        warnings.warn(f"{path}: downloaded from {url} with sha256 {actual}, but the first download of {path.name} "
                      f"had {first} ({record_path}): the source changed, so results on it are not comparable with "
                      "earlier ones; delete its entry there to accept the new file", DataNotice, stacklevel=3)
    return path


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: Path, *, sha256: str | None = None, timeout: float = 60) -> Path:
    """Download `url` to `dest` atomically; with `sha256`, only a file with that digest lands there.

    Any failure (network, HTTP status, a body shorter than its Content-Length, a wrong digest)
    removes the temporary file and raises a one-line DataError naming the URL.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A hidden, unique name in the destination folder: os.replace is then a same-filesystem rename.
    temp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}.part"
    digest = hashlib.sha256()
    try:
        request = Request(url, headers={"User-Agent": "graphtune"})
        with urlopen(request, timeout=timeout) as response:
            expected_size = response.headers.get("Content-Length") if url.startswith(("http:", "https:")) else None
            received = 0
            with open(temp, "xb") as out:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
        # http.client returns a short body without complaint when the server closes early.
        if expected_size is not None and expected_size.isdigit() and received != int(expected_size):
            raise DataError(f"cannot download {url}: interrupted after {received} of {expected_size} bytes")
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256.lower():
            raise DataError(f"cannot download {url}: its sha256 is {actual}, expected {sha256.lower()} "
                            "(the file was changed or corrupted)")
        os.replace(temp, dest)
    except DataError:
        temp.unlink(missing_ok=True)
        raise
    except HTTPError as exc:
        temp.unlink(missing_ok=True)
        raise DataError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except URLError as exc:
        temp.unlink(missing_ok=True)
        raise DataError(f"cannot download {url}: {_network_reason(exc.reason)}") from None
    except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, truncated chunked bodies
        temp.unlink(missing_ok=True)
        raise DataError(f"cannot download {url}: {_network_reason(exc)}") from None
    except BaseException:  # Ctrl-C included: never leave the temporary file behind
        temp.unlink(missing_ok=True)
        raise
    return dest


def _hf_url(remote: RemoteFile, hf_endpoint: str | None) -> str | None:
    if remote.hf_repo is None:
        return None
    endpoint = (hf_endpoint or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")
    return f"{endpoint}/datasets/{remote.hf_repo}/resolve/main/{quote(remote.hf_path or remote.name)}"


def _verified(path: Path, sha256: str | None) -> bool:
    """An existing file that matches the digest (or any existing file when there is no digest)."""
    return path.is_file() and (sha256 is None or sha256_file(path) == sha256.lower())


def _check_hash(path: Path, sha256: str | None) -> None:
    if sha256 is None:
        return
    actual = sha256_file(path)
    if actual != sha256.lower():
        raise DataError(f"{path}: sha256 is {actual}, expected {sha256.lower()}; replace it with the original file")


def _network_reason(reason) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (offline, or the server is down)"
    if isinstance(reason, TimeoutError):
        return "timed out (offline, or the server is too slow)"
    text = str(reason).strip().splitlines()
    detail = text[0] if text else type(reason).__name__
    if "Name or service not known" in detail or "nodename nor servname" in detail or "getaddrinfo" in detail:
        return f"host name lookup failed (offline?): {detail}"
    return f"{type(reason).__name__}: {detail}" if isinstance(reason, BaseException) else detail


def _reason(exc: DataError, url: str) -> str:
    """The part of a download error after its URL, to list many sources in one line."""
    return str(exc).removeprefix(f"cannot download {url}: ")

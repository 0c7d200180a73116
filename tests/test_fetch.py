"""Remote fetching against a real HTTP server on 127.0.0.1 and file:// URLs; no outside network."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import warnings
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from graphtune.data.fetch import RemoteFile, download, resolve_file, sha256_file
from graphtune.errors import ConfigError, DataError, DataNotice

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
LOCATIONS = SAMPLE / "metr-la-week" / "graph_sensor_locations.csv"


class Handler(SimpleHTTPRequestHandler):
    """Serves a folder, plus two broken endpoints that close the connection halfway through the body."""

    requests: list[str]  # set per server: the paths asked for, to prove when no request was made

    def do_GET(self):
        self.requests.append(self.path)
        if self.path == "/truncated":  # announces 1000 bytes, sends 500
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 500)
            self.close_connection = True
            return
        if self.path == "/truncated-unsized":  # no length: only a digest can tell it is short
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"x" * 500)
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path):
    """(base URL, served folder, list of requested paths) of a live server on a free loopback port."""
    root = tmp_path / "served"
    root.mkdir()
    requests: list[str] = []
    handler = type("RecordingHandler", (Handler,), {"requests": requests})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, requests
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def closed_port_url():
    """A loopback URL on which nothing listens: connecting is refused, like being offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/metr-la.h5"


def serve(root: Path, name: str, content: bytes) -> str:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return hashlib.sha256(content).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_sha256_file(tmp_path):
    (tmp_path / "abc").write_bytes(b"abc")
    assert sha256_file(tmp_path / "abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_http_download_with_the_right_sha256(server, tmp_path):
    base, root, _ = server
    content = LOCATIONS.read_bytes()
    digest = serve(root, "graph_sensor_locations.csv", content)
    dest = tmp_path / "cache" / "la" / "graph_sensor_locations.csv"
    assert download(f"{base}/graph_sensor_locations.csv", dest, sha256=digest, timeout=5) == dest
    assert dest.read_bytes() == content
    assert leftovers(dest.parent) == ["graph_sensor_locations.csv"]  # no temporary file left


def test_hash_mismatch_leaves_no_file(server, tmp_path):
    base, root, _ = server
    digest = serve(root, "a.bin", b"real content")
    wrong = "0" * 64
    dest = tmp_path / "cache" / "a.bin"
    url = f"{base}/a.bin"
    with pytest.raises(DataError) as info:
        download(url, dest, sha256=wrong, timeout=5)
    message = str(info.value)
    assert url in message and wrong in message and digest in message and "\n" not in message
    assert leftovers(dest.parent) == []


def test_interrupted_download_leaves_no_partial_file(server, tmp_path):
    base, _, _ = server
    dest = tmp_path / "cache" / "big.h5"
    with pytest.raises(DataError, match=r"/truncated: interrupted after 500 of 1000 bytes"):
        download(f"{base}/truncated", dest, timeout=5)
    assert leftovers(dest.parent) == []
    with pytest.raises(DataError, match="sha256 is"):  # no Content-Length: caught by the digest
        download(f"{base}/truncated-unsized", dest, sha256=hashlib.sha256(b"x" * 1000).hexdigest(), timeout=5)
    assert leftovers(dest.parent) == []


def test_http_errors_are_one_line(server, tmp_path):
    base, _, _ = server
    with pytest.raises(DataError, match=r"^cannot download http://127\.0\.0\.1:\d+/missing\.h5: HTTP 404"):
        download(f"{base}/missing.h5", tmp_path / "missing.h5", timeout=5)
    assert not (tmp_path / "missing.h5").exists()


def test_offline_is_a_one_line_error(closed_port_url, tmp_path):
    with pytest.raises(DataError) as info:
        download(closed_port_url, tmp_path / "metr-la.h5", timeout=5)
    message = str(info.value)
    assert message == f"cannot download {closed_port_url}: connection refused (offline, or the server is down)"
    assert leftovers(tmp_path) == []


def test_file_urls(tmp_path):
    src = tmp_path / "src" / "graph_sensor_locations.csv"
    src.parent.mkdir()
    src.write_bytes(LOCATIONS.read_bytes())
    dest = download(src.as_uri(), tmp_path / "out" / "loc.csv", sha256=sha256_file(LOCATIONS))
    assert dest.read_bytes() == LOCATIONS.read_bytes()
    with pytest.raises(DataError, match="cannot download file://.*nope.csv"):
        download((tmp_path / "nope.csv").as_uri(), tmp_path / "out" / "nope.csv")
    assert leftovers(tmp_path / "out") == ["loc.csv"]


def test_hf_layout_via_endpoint_argument_and_environment(server, tmp_path, monkeypatch):
    base, root, requests = server
    digest = serve(root, "datasets/someone/METRLA/resolve/main/graphs/adj mx.pkl", b"pickle bytes")
    remote = RemoteFile("adj_mx.pkl", hf_repo="someone/METRLA", hf_path="graphs/adj mx.pkl", sha256=digest)
    path = resolve_file(remote, local_dir=tmp_path / "raw", data_source="hf", cache_dir=tmp_path / "cache",
                        hf_endpoint=base + "/", timeout=5)
    assert path == tmp_path / "cache" / "adj_mx.pkl" and path.read_bytes() == b"pickle bytes"
    assert requests == ["/datasets/someone/METRLA/resolve/main/graphs/adj%20mx.pkl"]

    serve(root, "datasets/someone/METRLA/resolve/main/metr-la.h5", b"series")
    monkeypatch.setenv("HF_ENDPOINT", base)
    path = resolve_file(RemoteFile("metr-la.h5", hf_repo="someone/METRLA"), local_dir=tmp_path / "raw",
                        data_source="hf", cache_dir=tmp_path / "cache", timeout=5)
    assert path.read_bytes() == b"series"
    assert requests[-1] == "/datasets/someone/METRLA/resolve/main/metr-la.h5"


def test_auto_prefers_the_local_file_without_network(tmp_path, closed_port_url):
    local_dir = tmp_path / "raw"
    local_dir.mkdir()
    (local_dir / "metr-la.h5").write_bytes(b"local copy")
    remote = RemoteFile("metr-la.h5", url=closed_port_url, sha256=hashlib.sha256(b"local copy").hexdigest())
    assert resolve_file(remote, local_dir=local_dir, cache_dir=tmp_path / "cache") == local_dir / "metr-la.h5"
    assert resolve_file(remote, local_dir=local_dir, data_source="local", cache_dir=tmp_path / "cache") == \
        local_dir / "metr-la.h5"


def test_auto_downloads_once_then_reuses_the_cache(server, tmp_path):
    base, root, requests = server
    digest = serve(root, "metr-la.h5", b"remote copy")
    remote = RemoteFile("metr-la.h5", url=f"{base}/metr-la.h5", sha256=digest)
    kwargs = dict(local_dir=tmp_path / "raw", cache_dir=tmp_path / "cache", timeout=5)
    first = resolve_file(remote, **kwargs)
    assert first == tmp_path / "cache" / "metr-la.h5" and requests == ["/metr-la.h5"]
    assert resolve_file(remote, **kwargs) == first
    assert resolve_file(remote, data_source="url", **kwargs) == first
    assert requests == ["/metr-la.h5"]  # the verified cache answered both times

    first.write_bytes(b"corrupted")  # a cached file with the wrong digest is downloaded again
    assert resolve_file(remote, data_source="url", **kwargs).read_bytes() == b"remote copy"
    assert requests == ["/metr-la.h5", "/metr-la.h5"]


def test_auto_skips_a_local_file_with_the_wrong_hash(server, tmp_path):
    base, root, _ = server
    digest = serve(root, "adj_mx.pkl", b"published")
    local_dir = tmp_path / "raw"
    local_dir.mkdir()
    (local_dir / "adj_mx.pkl").write_bytes(b"edited")
    remote = RemoteFile("adj_mx.pkl", url=f"{base}/adj_mx.pkl", sha256=digest)
    with pytest.warns(UserWarning, match="sha256 differs"):
        path = resolve_file(remote, local_dir=local_dir, cache_dir=tmp_path / "cache", timeout=5)
    assert path == tmp_path / "cache" / "adj_mx.pkl" and path.read_bytes() == b"published"
    assert (local_dir / "adj_mx.pkl").read_bytes() == b"edited"  # the user's file is never touched
    with pytest.raises(DataError, match=r"adj_mx.pkl: sha256 is .* expected"):
        resolve_file(remote, local_dir=local_dir, data_source="local", cache_dir=tmp_path / "cache")


def test_url_override_wins(server, tmp_path):
    base, root, requests = server
    serve(root, "mirror/metr-la.h5", b"mirrored")
    remote = RemoteFile("metr-la.h5", url=f"{base}/gone.h5")
    path = resolve_file(remote, local_dir=tmp_path / "raw", data_source="url", cache_dir=tmp_path / "cache",
                        url_override=f"{base}/mirror/metr-la.h5", timeout=5)
    assert path.read_bytes() == b"mirrored" and requests == ["/mirror/metr-la.h5"]


def test_auto_falls_back_to_hf_then_fails_with_one_message(server, tmp_path, closed_port_url):
    base, root, _ = server
    serve(root, "datasets/o/r/resolve/main/metr-la.h5", b"from hf")
    remote = RemoteFile("metr-la.h5", url=closed_port_url, hf_repo="o/r")
    kwargs = dict(local_dir=tmp_path / "raw", cache_dir=tmp_path / "cache", timeout=5)
    assert resolve_file(remote, hf_endpoint=base, **kwargs).read_bytes() == b"from hf"

    (tmp_path / "cache" / "metr-la.h5").unlink()
    with pytest.raises(DataError) as info:
        resolve_file(remote, hf_endpoint=closed_port_url.rsplit("/", 1)[0], **kwargs)
    message = str(info.value)
    assert message.startswith(f"cannot find metr-la.h5: put it in {tmp_path / 'raw'}; tried ")
    assert f"{tmp_path / 'raw' / 'metr-la.h5'} (missing)" in message
    assert f"cache {tmp_path / 'cache' / 'metr-la.h5'} (missing)" in message
    assert f"{closed_port_url} (connection refused" in message
    assert "/datasets/o/r/resolve/main/metr-la.h5 (connection refused" in message
    assert "\n" not in message
    assert leftovers(tmp_path / "cache") == [".graphtune-sha256.json"]  # the first download's record, no partial


def test_source_errors(tmp_path):
    remote = RemoteFile("pems-bay.h5")
    with pytest.raises(DataError, match=r"raw/pems-bay.h5: no such file; put pems-bay.h5 in .*raw"):
        resolve_file(remote, local_dir=tmp_path / "raw", data_source="local", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="cannot download pems-bay.h5: no URL is known"):
        resolve_file(remote, local_dir=tmp_path / "raw", data_source="url", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="no Hugging Face repo is known"):
        resolve_file(remote, local_dir=tmp_path / "raw", data_source="hf", cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match="data_source: expected one of auto, local, url, hf, got 'ftp'"):
        resolve_file(remote, local_dir=tmp_path / "raw", data_source="ftp", cache_dir=tmp_path / "cache")


def test_a_file_without_a_registered_hash_is_trusted_on_first_use(server, tmp_path):
    """metr-la.h5 and pems-bay.h5 have no registered sha256: the first download's is recorded, and a later
    download that differs is kept but reported (results on it are not comparable with earlier ones)."""
    base, root, _ = server
    serve(root, "pems-bay.h5", b"first publication")
    remote = RemoteFile("pems-bay.h5", url=f"{base}/pems-bay.h5")  # no sha256 known
    cache = tmp_path / "cache"
    path = resolve_file(remote, local_dir=tmp_path / "raw", data_source="url", cache_dir=cache, timeout=5)
    record = json.loads((cache / ".graphtune-sha256.json").read_text())
    assert record == {"pems-bay.h5": {"sha256": hashlib.sha256(b"first publication").hexdigest(),
                                      "url": f"{base}/pems-bay.h5"}}
    path.unlink()
    serve(root, "pems-bay.h5", b"first publication")  # the same bytes again: nothing to report
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataNotice)
        resolve_file(remote, local_dir=tmp_path / "raw", data_source="url", cache_dir=cache, timeout=5)
    path.unlink()
    serve(root, "pems-bay.h5", b"a silently republished file")
    with pytest.warns(DataNotice, match=r"pems-bay\.h5: downloaded from .* but the first download of pems-bay\.h5 had"):
        again = resolve_file(remote, local_dir=tmp_path / "raw", data_source="url", cache_dir=cache, timeout=5)
    assert again.read_bytes() == b"a silently republished file"
    assert json.loads((cache / ".graphtune-sha256.json").read_text()) == record  # the first one stays the reference

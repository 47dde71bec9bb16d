"""`geojepa fetch-osm` against a real HTTP server on loopback (never the network)."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading

import pytest
from typer.testing import CliRunner

from geojepa.cli import app
from geojepa.errors import GeoJepaError
from geojepa.extract.fetch import fetch_region
from tests.conftest import KOTKA

PAYLOAD = KOTKA.read_bytes()


class _Server(http.server.ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.log: list[tuple[str, str | None]] = []
        self.fail_next = 0
        self.md5 = hashlib.md5(PAYLOAD).hexdigest()  # noqa: S324

    @property
    def base(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        srv: _Server = self.server
        rng = self.headers.get("Range")
        srv.log.append((self.path, rng))
        if srv.fail_next:
            srv.fail_next -= 1
            self.send_error(503)
            return
        if self.path == "/index.json":
            body = json.dumps({"features": [
                {"properties": {"id": "kotka", "parent": "finland", "name": "Kotka",
                                "urls": {"pbf": f"{srv.base}/europe/finland/kotka-latest.osm.pbf"}}},
                {"properties": {"id": "finland", "parent": "europe", "name": "Finland",
                                "urls": {"pbf": f"{srv.base}/europe/finland-latest.osm.pbf"}}},
            ]}).encode()
        elif self.path.endswith("kotka-latest.osm.pbf.md5"):
            body = f"{srv.md5}  kotka-latest.osm.pbf\n".encode()
        elif self.path.endswith("kotka-latest.osm.pbf"):
            start = int(rng.split("=")[1].split("-")[0]) if rng else 0
            if start >= len(PAYLOAD):
                self.send_error(416)
                return
            body = PAYLOAD[start:]
            self.send_response(206 if rng else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_downloads_and_verifies(server, tmp_path):
    path = fetch_region("finland/kotka", tmp_path, f"{server.base}/index.json")
    assert path.name == "kotka-latest.osm.pbf" and path.read_bytes() == PAYLOAD
    assert not list(tmp_path.glob("*.part"))
    # Second call: already verified, no download.
    n = len(server.log)
    fetch_region("kotka", tmp_path, f"{server.base}/index.json")
    assert not [p for p, _ in server.log[n:] if p.endswith(".osm.pbf")]


def test_resumes_a_partial_download_with_a_range_request(server, tmp_path):
    (tmp_path / "kotka-latest.osm.pbf.part").write_bytes(PAYLOAD[:50_000])
    path = fetch_region("kotka", tmp_path, f"{server.base}/index.json")
    assert path.read_bytes() == PAYLOAD
    assert ("/europe/finland/kotka-latest.osm.pbf", "bytes=50000-") in server.log


def test_retries_server_errors_with_backoff(server, tmp_path):
    server.fail_next = 2
    path = fetch_region("kotka", tmp_path, f"{server.base}/index.json", backoff=0.01)
    assert path.read_bytes() == PAYLOAD


def test_checksum_mismatch_removes_the_file(server, tmp_path):
    server.md5 = "0" * 32
    with pytest.raises(GeoJepaError, match="checksum mismatch"):
        fetch_region("kotka", tmp_path, f"{server.base}/index.json")
    assert list(tmp_path.iterdir()) == []


def test_unknown_region_suggests_names(server, tmp_path):
    result = CliRunner().invoke(app, ["fetch-osm", "kotk", str(tmp_path), "--index-url", f"{server.base}/index.json"])
    assert result.exit_code == 1
    assert "'kotk' is not in the Geofabrik index; did you mean kotka" in result.output

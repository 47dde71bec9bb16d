"""Download a region's PBF from Geofabrik: resumable, retried, MD5-verified.

The region is looked up in Geofabrik's extract index (``GEOFABRIK_INDEX``, without geometries):
by id (``monaco``) or with its parents (``north-america/us/california``). The
file is streamed into ``<name>.part`` with HTTP range requests, so an
interrupted download resumes where it stopped, and renamed into place only
after its MD5 matches the published ``.md5``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from geojepa.errors import GeoJepaError, TransientError

log = logging.getLogger(__name__)
GEOFABRIK_INDEX = "https://download.geofabrik.de/index-v1-nogeom.json"  # every download's default index
USER_AGENT = "geojepa-fetch/0.1 (+https://github.com/geojepa)"


def _open(url: str, headers: dict[str, str] | None = None, timeout: float = 60.0):
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
    return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 (http/https only, see fetch_region)


def _retry(what: str, fn, attempts: int = 4, backoff: float = 1.0):
    """Call ``fn`` until it succeeds; network errors and 5xx are retried with exponential backoff."""
    for attempt in range(attempts):
        try:
            return fn()
        except urllib.error.HTTPError as e:
            if e.code < 500:
                raise GeoJepaError(f"{what}: HTTP {e.code} {e.reason}") from None
            if attempt == attempts - 1:
                raise TransientError(f"{what}: HTTP {e.code} {e.reason}") from None
            err = f"HTTP {e.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            if attempt == attempts - 1:
                raise TransientError(f"{what}: network error: {getattr(e, 'reason', e)}") from None
            err = str(getattr(e, "reason", e))
        delay = backoff * 2**attempt
        log.warning("%s: %s, retrying in %.0fs (%d/%d)", what, err, delay, attempt + 1, attempts - 1)
        time.sleep(delay)
    raise AssertionError("unreachable")


def find_region(index: dict, region: str) -> dict:
    """The index feature's properties for ``region`` (id, optionally prefixed by its parents)."""
    parts = region.strip("/").split("/")
    props = {f["properties"]["id"]: f["properties"] for f in index.get("features", [])}
    found = props.get(parts[-1])
    if found and len(parts) > 1 and found.get("parent") != parts[-2]:
        found = None
    if not found:
        close = difflib.get_close_matches(parts[-1], list(props), n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise GeoJepaError(f"region {region!r} is not in the Geofabrik index{hint}")
    return found


def _md5(path: Path) -> str:
    h = hashlib.md5()  # noqa: S324 (Geofabrik publishes MD5)
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def fetch_region(region: str, work_dir: Path | str, index_url: str = GEOFABRIK_INDEX, backoff: float = 1.0) -> Path:
    """Download ``region``'s latest PBF into ``work_dir``; return its path (skips a verified file)."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if not index_url.startswith(("http://", "https://")):
        raise GeoJepaError(f"{index_url}: index URL must be http(s)")

    def get_index():
        with _open(index_url) as r:
            return json.load(r)

    props = find_region(_retry(index_url, get_index, backoff=backoff), region)
    url = props["urls"]["pbf"]

    def get_md5():
        with _open(url + ".md5") as r:
            return r.read().decode().split()[0].lower()

    expected = _retry(url + ".md5", get_md5, backoff=backoff)
    dest = work_dir / url.rsplit("/", 1)[-1]
    if dest.is_file() and _md5(dest) == expected:
        log.info("%s is already downloaded and verified", dest)
        return dest
    part = dest.with_name(dest.name + ".part")

    def download():
        start = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={start}-"} if start else {}
        try:
            response = _open(url, headers)
        except urllib.error.HTTPError as e:
            if e.code == 416 and start:  # nothing left to fetch: the part is complete
                return
            raise
        with response as r:
            if start and r.status != 206:  # server ignored the range: start over
                start = 0
            log.info("downloading %s from byte %d", url, start)
            with open(part, "ab" if start else "wb") as f:
                while block := r.read(1 << 20):
                    f.write(block)

    _retry(url, download, backoff=backoff)
    if _md5(part) != expected:
        part.unlink()
        raise GeoJepaError(f"{url}: checksum mismatch (expected MD5 {expected}); the partial file was removed")
    os.replace(part, dest)
    return dest

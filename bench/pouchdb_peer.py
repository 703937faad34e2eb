"""Peer baseline: PouchDB replicating from a CouchDB-protocol server, both from npm.

The server is express-pouchdb on PouchDB's memory adapter (``node peer.js serve``)
in its own process; the device is PouchDB on LevelDB (``node peer.js replicate``),
in another, timed from the start of ``replicate.from`` to its end (Node's start
is not counted). The npm packages are pinned by ``bench/pouchdb/package-lock.json``
and installed with ``npm ci`` on first use. All traffic stays on 127.0.0.1.

Measured: the first replication of all records, and a second one after
``changes`` were written on the server (the 100-change delta).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent / "pouchdb"
DB = "appointments"
LOAD_BATCH = 5000


def ensure_installed() -> str:
    """Node's path, after ``npm ci`` if the pinned packages are not installed yet."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        raise RuntimeError("node and npm are needed for the PouchDB peer")
    if not (HERE / "node_modules" / "express-pouchdb").exists():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=HERE, check=True, capture_output=True
        )
    return node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _docs(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"_id": str(r["id"]), **{k: v for k, v in r.items() if k != "id"}} for r in records]


def _replicate(node: str, url: str, device: Path, batch_size: int) -> dict[str, Any]:
    out = subprocess.run(
        [node, "peer.js", "replicate", url, str(device), str(batch_size)],
        cwd=HERE,
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run_pouchdb_peer(
    records: Sequence[dict[str, Any]],
    changes: Sequence[dict[str, Any]],
    *,
    workdir: Path,
    batch_size: int = 1000,
) -> dict[str, Any]:
    """First replication of ``records`` and a delta of ``changes``; figures as a dict."""
    node = ensure_installed()
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/{DB}"
    log = (workdir / "pouchdb-server.log").open("wb")
    server = subprocess.Popen(
        [node, "peer.js", "serve", str(port)], cwd=HERE, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        with httpx.Client(timeout=300) as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if http.put(url).status_code in (201, 412):
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the PouchDB server did not start")
                time.sleep(0.2)
            docs = _docs(records)
            t0 = time.perf_counter()
            for i in range(0, len(docs), LOAD_BATCH):
                http.post(f"{url}/_bulk_docs", json={"docs": docs[i : i + LOAD_BATCH]})
            load_s = time.perf_counter() - t0
            device = workdir / "pouchdb-device"
            shutil.rmtree(device, ignore_errors=True)
            first = _replicate(node, url, device, batch_size)
            if first["docs"] != len(records):
                raise RuntimeError(f"PouchDB holds {first['docs']} docs, not {len(records)}")
            # The delta: the same records changed on the server, with their revisions.
            keys = [str(c["id"]) for c in changes]
            rows = http.post(f"{url}/_all_docs", json={"keys": keys}).json()["rows"]
            revs = {r["id"]: r["value"]["rev"] for r in rows}
            changed = [{**d, "_rev": revs[d["_id"]]} for d in _docs(changes)]
            http.post(f"{url}/_bulk_docs", json={"docs": changed}).raise_for_status()
            delta = _replicate(node, url, device, batch_size)
            if delta["docs_written"] != len(changes):
                raise RuntimeError(
                    f"the delta wrote {delta['docs_written']} docs, not {len(changes)}"
                )
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    return {
        "available": True,
        "records": len(records),
        "batch_size": batch_size,
        "load_seconds": round(load_s, 2),
        "full_pull": {
            "records": first["docs_written"],
            "seconds": round(first["seconds"], 4),
            "records_per_s": round(first["docs_written"] / first["seconds"], 1),
        },
        "delta": {"changes": len(changes), "seconds": round(delta["seconds"], 4)},
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    lock = json.loads((HERE / "package-lock.json").read_text())
    packages = lock.get("packages", {})
    names = ("express-pouchdb", "pouchdb", "pouchdb-adapter-memory", "leveldown")
    return {n: packages.get(f"node_modules/{n}", {}).get("version", "?") for n in names}

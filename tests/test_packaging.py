"""Packaging: the built wheel and sdist, installed into fresh virtual environments.

* the wheel with no extra installs only the client's dependencies (no server
  library comes along) and syncs against a server;
* the wheel with the ``cli`` extra runs ``syncunit demo`` and ``syncunit serve``
  for the hospital example, which ships inside it, away from any checkout;
* the sdist holds the sources, the example and ``py.typed``.

The wheel is built once per session from this tree; the dependencies' wheels
are kept in ``.venv/test-wheelhouse`` and installed with ``--no-index``, so
only the first run on a machine downloads anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from syncunit.client import SyncClient
from tests.conftest import SIZE
from tests.pgserver import free_port

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = ROOT / ".venv" / "test-wheelhouse"
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]

#: The client's whole dependency tree: httpx and msgspec, and what httpx needs.
CLIENT_DISTS = {
    "syncunit", "httpx", "msgspec", "anyio", "certifi", "h11", "httpcore", "idna",
    "sniffio", "typing-extensions", "exceptiongroup",
}  # fmt: skip


@dataclass
class Built:
    wheel: Path
    sdist: Path


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-d", str(out)],
        cwd=ROOT, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (wheel,) = out.glob("syncunit-*.whl")
    (sdist,) = out.glob("syncunit-*.tar.gz")
    return Built(wheel, sdist)


def _clean_env(venv: Path) -> dict[str, str]:
    """No PYTHONPATH, no checkout on the path: only what the venv has."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return env


def make_venv(where: Path, requirement: str) -> Path:
    """A fresh venv with ``requirement`` installed from local wheels (downloaded once)."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=60
    )
    python = where / "bin" / "python"
    install = [*PIP, "--python", str(python), "install", "--no-index", "--find-links"]
    done = subprocess.run(
        [*install, str(WHEELHOUSE), requirement], capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:  # a dependency is not in the wheelhouse yet: fetch it once
        WHEELHOUSE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [*PIP, "download", "--only-binary=:all:", "--dest", str(WHEELHOUSE), requirement],
            check=True, timeout=600,
        )  # fmt: skip
        subprocess.run([*install, str(WHEELHOUSE), requirement], check=True, timeout=300)
    return where


def installed(venv: Path) -> set[str]:
    """The distributions in ``venv``, by normalized name."""
    code = (
        "import importlib.metadata as m;"
        " print('\\n'.join(d.metadata['Name'] for d in m.distributions()))"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-I", "-c", code],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    return {name.lower().replace("_", "-") for name in out.split()}


CLIENT_SCRIPT = """
import json, sys
import syncunit
from syncunit import SyncClient
with SyncClient(sys.argv[1], sys.argv[2], token="token-h1") as c:
    r = c.sync("Login")
print(json.dumps({"file": syncunit.__file__, "rows": r.total_in}))
for name in ("starlette", "sqlalchemy", "uvicorn", "syncunit.server"):
    try:
        __import__(name)
    except ImportError:
        continue
    print("importable:", name)
"""


@pytest.mark.timeout(600)
def test_the_wheel_alone_installs_only_the_client_and_syncs(built, live, tmp_path):
    venv = make_venv(tmp_path / "client-venv", str(built.wheel))
    assert installed(venv) <= CLIENT_DISTS
    script = tmp_path / "device.py"
    script.write_text(CLIENT_SCRIPT)
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-I", str(script), live.url, str(tmp_path / "d.sqlite")],
        cwd=tmp_path, env=_clean_env(venv), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    first, *rest = done.stdout.splitlines()
    facts = json.loads(first)
    assert facts["file"].startswith(str(venv))  # the installed wheel, not this tree
    assert facts["rows"] > 0
    assert rest == []  # no server library came along


@pytest.fixture(scope="session")
def cli_venv(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_venv(
        tmp_path_factory.mktemp("cli") / "venv", f"syncunit[cli] @ {built.wheel.as_uri()}"
    )


@pytest.mark.timeout(600)
def test_the_installed_wheel_runs_the_demo(cli_venv, tmp_path):
    done = subprocess.run(
        [str(cli_venv / "bin" / "syncunit"), "demo", "--appointments", "300",
         "--workdir", str(tmp_path / "demo")],
        cwd=tmp_path, env=_clean_env(cli_venv), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "verified" in done.stdout


@pytest.fixture
def served(cli_venv: Path, tmp_path: Path) -> Iterator[str]:
    env = _clean_env(cli_venv)
    db = f"sqlite:///{tmp_path / 'hospital.sqlite'}"
    subprocess.run(
        [str(cli_venv / "bin" / "python"), "-I", "-m", "syncunit.examples.hospital.generate",
         "--database", db, "--appointments", str(SIZE["appointments"]),
         "--hospitals", str(SIZE["hospitals"]), "--doctors", str(SIZE["doctors"])],
        cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(cli_venv / "bin" / "syncunit"), "serve", "syncunit.examples.hospital.server:build",
         "--database", db, "--port", str(port), "--log-format", "json",
         "--metrics-token", "scrape"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, proc, tmp_path / "serve.log")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _wait_until_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            httpx.get(f"{url}/v1/catalog", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("syncunit serve did not start in 60 s")


@pytest.mark.timeout(600)
def test_the_installed_wheel_serves_the_hospital_example(served, tmp_path):
    with SyncClient(served, tmp_path / "device.sqlite", token="token-h1") as c:
        assert c.sync("Login").total_in > 0
    assert httpx.get(f"{served}/metrics", timeout=5).status_code == 401
    scraped = httpx.get(f"{served}/metrics", headers={"Authorization": "Bearer scrape"}, timeout=5)
    assert 'syncunit_syncs_total{outcome="ok",unit="Login"}' in scraped.text
    # --log-format json: the sync's line, with its request id, device and unit
    deadline = time.monotonic() + 5
    lines: list[dict[str, object]] = []
    while time.monotonic() < deadline and not lines:
        for line in (tmp_path / "serve.log").read_text().splitlines():
            if line.startswith("{") and '"sync Login: ok' in line:
                lines.append(json.loads(line))
        time.sleep(0.1)
    assert lines, (tmp_path / "serve.log").read_text()[-2000:]
    assert lines[0]["unit"] == "Login"
    assert lines[0]["client_id"]
    assert lines[0]["request_id"]


def test_the_wheel_and_the_sdist_hold_the_example_and_py_typed(built):
    names = set(zipfile.ZipFile(built.wheel).namelist())
    assert "syncunit/py.typed" in names
    assert "syncunit/examples/hospital/server.py" in names
    assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")]
    meta = (
        zipfile.ZipFile(built.wheel)
        .read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        .decode()
    )
    extras = {
        line.split(":", 1)[1].strip()
        for line in meta.splitlines()
        if line.startswith("Provides-Extra:")
    }
    assert extras >= {"server", "postgres", "bench", "cli"}
    with tarfile.open(built.sdist) as tar:
        files = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"src/syncunit/py.typed", "examples/hospital/units.py", "pyproject.toml"} <= files

"""The public surface: exported names, the CLI's help, and the README's example."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import syncunit
import syncunit.server
from syncunit.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def test_exported_members_do_not_change_by_accident() -> None:
    assert sorted(syncunit.__all__) == [
        "AsyncSyncClient",
        "AuthError",
        "DeclarationError",
        "Join",
        "LiveQuery",
        "LocalStore",
        "LocalStoreError",
        "NetworkError",
        "Param",
        "ProblemError",
        "Progress",
        "ProtocolError",
        "RequestRejected",
        "RetryPolicy",
        "Stream",
        "SyncCancelled",
        "SyncClient",
        "SyncError",
        "SyncResult",
        "SyncSchema",
        "SyncStatus",
        "SyncUnit",
        "SyncUnitError",
        "UnknownUnitError",
        "__version__",
        "uuid7",
    ]
    for name in syncunit.__all__:
        assert getattr(syncunit, name) is not None
    assert sorted(syncunit.server.__all__) == [
        "Authenticator",
        "DatabaseRestored",
        "DatabaseTooNew",
        "JWTAuth",
        "Limits",
        "Principal",
        "ServerStore",
        "SyncServer",
        "TokenAuth",
        "create_app",
        "first_of",
        "open_store",
    ]


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(commands) >= {"serve", "sync", "ddl", "prune", "renew-epoch", "demo", "bench"}
    for name, sub in commands.items():
        assert sub.description, f"{name} has no description"
        if name == "bench":
            continue  # its options are the bench's own; see the next test
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0
        assert "usage: syncunit" in capsys.readouterr().out


def test_bench_help_is_passed_through(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["bench", "--help"])
    assert done.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_library_errors_become_clean_cli_messages(
    live: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["sync", live.url, "NoSuchUnit", "--db", str(tmp_path / "d.sqlite"), "--token", "token-h1"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "error: 404 unknown-unit" in err
    assert "known: Login, Online, PatientDetails, SendAppointments, Splash" in err
    assert "Traceback" not in err


def test_the_readme_example_runs(live: Any, server: Any, tmp_path: Path) -> None:
    """As a script of its own: when the process ends, the triggered push has gone out."""
    import sqlite3
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    example = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    code = example.replace("http://127.0.0.1:8000", live.url)
    code += "\nprint('rows', len(rows))\nprint('key', key)\n"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    found = dict(line.split(" ", 1) for line in done.stdout.splitlines()[-2:])
    assert int(found["rows"]) > 0, "the example's query found no appointments"
    device = sqlite3.connect(tmp_path / "device.sqlite")
    try:
        assert device.execute("SELECT count(*) FROM syncunit_outbox").fetchone() == (0,)
    finally:
        device.close()
    with server.store.engine.connect() as conn:
        booked = conn.execute(
            sa.text("SELECT doctor_id, room FROM appointment WHERE id = :id"), {"id": found["key"]}
        ).all()
    assert booked == [(1, "R2")]


def test_the_client_runs_without_the_server_side(live: Any, tmp_path: Path) -> None:
    """The client needs sqlite3, httpx and msgspec only: no SQLAlchemy, no Starlette."""
    import subprocess
    import sys

    script = f"""
import sys
class Forbid:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sqlalchemy", "starlette", "uvicorn", "anyio", "rich"):
            raise ImportError(f"the client imported {{name}}")
        return None
sys.meta_path.insert(0, Forbid())
from syncunit import SyncClient
with SyncClient({live.url!r}, {str(tmp_path / "c.sqlite")!r}, token="token-h1") as c:
    result = c.sync("Login")
print(result.total_in)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) > 0


SERVED = ["hospital.server:build", "--database", "sqlite:///x.sqlite"]


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["serve", *SERVED], "server"),
        (["ddl", *SERVED], "server"),
        (["prune", *SERVED, "--keep", "1"], "server"),
        (["renew-epoch", *SERVED], "server"),
        (["lag", *SERVED], "server"),
        (["demo"], "cli"),
        (["bench", "--help"], "cli,bench"),
    ],
)
def test_a_client_only_install_names_the_extra_a_command_needs(
    tmp_path: Path, argv: list[str], extra: str
) -> None:
    """``pip install syncunit`` (no extras): each command says what to install, no traceback."""
    import subprocess
    import sys

    script = f"""
import sys
class Forbid:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sqlalchemy", "starlette", "uvicorn", "anyio", "rich",
                                  "matplotlib", "psutil"):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Forbid())
from syncunit.cli import main
sys.exit(main({argv!r}))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"syncunit {argv[0]} needs the extra [{extra}]" in done.stderr
    assert f"pip install 'syncunit[{extra}]'" in done.stderr


def test_sync_runs_without_the_cli_extra_and_prints_its_result_to_stdout(
    live: Any, tmp_path: Path
) -> None:
    import subprocess
    import sys

    script = f"""
import sys
class Forbid:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sqlalchemy", "starlette", "uvicorn", "anyio", "rich"):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Forbid())
from syncunit.cli import main
sys.exit(main(["sync", {live.url!r}, "Login", "--db", "d.sqlite", "--token", "token-h1"]))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Login: ")
    assert "rows in" in done.stdout
    assert done.stderr == ""


def test_a_missing_parameter_tells_the_cli_option(
    live: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "d.sqlite")
    code = main(["sync", live.url, "PatientDetails", "--db", db, "--token", "token-h1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "pass --param patient_id=..." in err
    assert "params=" not in err


def test_the_switch_users_sign_in_runs_login(live: Any, tmp_path: Path) -> None:
    """docs/switch-users.md: sign_in() leaves the user's rows on the device."""
    page = (ROOT / "docs" / "switch-users.md").read_text()
    code = re.findall(r"```python\n(.*?)```", page, re.S)[0]
    scope: dict[str, Any] = {"app_data_dir": str(tmp_path), "SERVER_URL": live.url}
    exec(compile(code, "switch-users.md", "exec"), scope)
    client = scope["sign_in"]("ana", "token-h1")
    try:
        assert client.store.query("SELECT count(*) FROM LocalAppointment")[0][0] > 0
    finally:
        scope["sign_out"](client)

"""The ``syncunit`` command: a thin layer over the library.

    syncunit serve TARGET --database URL     run a sync server
    syncunit sync URL UNIT --db PATH         run one unit into a local file
    syncunit ddl TARGET --database URL       print the tracking DDL (for Alembic users)
    syncunit prune TARGET --database URL     drop old tombstones
    syncunit renew-epoch TARGET --database URL   make every client re-download (after a restore)
    syncunit retrack TARGET TABLE... --database URL   streams reading TABLE copy afresh
                                             (after writes no trigger saw)
    syncunit lag TARGET --database URL       how far open transactions hold deltas back
    syncunit demo                            the hospital example, end to end (it ships
                                             inside the package: syncunit.examples.hospital)
    syncunit bench                           the benchmarks (from a checkout)

TARGET is ``module:attribute`` naming a ``SyncServer``, a function
``build(database_url, **options) -> SyncServer``, or a ``SyncSchema`` (``serve``
then needs ``--tokens FILE`` for the bearer tokens; the other commands sign no one in).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from syncunit.errors import ProblemError, SyncUnitError

#: ``serve --header-timeout``'s default (kept here: the client-only install has no uvicorn).
HEADER_TIMEOUT_S = 15.0

REPO_ROOT = Path(__file__).resolve().parents[2]


def _add_path(path: str | Path) -> None:
    p = str(Path(path).resolve())
    if p not in sys.path:
        sys.path.insert(0, p)


def _from_checkout(folder: str, module: str) -> Any:
    """Import ``module`` from ``folder`` of this checkout (the benchmarks live there)."""
    path = module.replace(".", "/") + ".py"
    for root in (Path.cwd() / folder, REPO_ROOT / folder):
        if (root / path).exists():
            _add_path(root)
            break
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.partition(".")[0] in _EXTRA_MODULES:
            raise  # the bench's own dependencies: main() names the extra
        raise SystemExit(
            f"error: cannot import {module} ({exc}); run from a checkout of syncunit"
        ) from exc
    except ImportError as exc:
        raise SystemExit(
            f"error: cannot import {module} ({exc}); run from a checkout of syncunit"
        ) from exc


def load_server(
    target: str,
    database: str,
    *,
    app_dir: str,
    tokens: str | None,
    serving: bool = True,
    **options: Any,
) -> Any:
    """Resolve TARGET into a ``SyncServer``; a ``SyncSchema`` needs ``tokens`` only when
    ``serving`` (the maintenance commands sign no one in)."""
    from syncunit.server import Principal, SyncServer, TokenAuth
    from syncunit.units import SyncSchema

    _add_path(app_dir)
    module_name, _, attr = target.partition(":")
    if not attr:
        raise SystemExit(f"error: TARGET must be module:attribute, not {target!r}")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"error: cannot load {target!r}: {exc} (try --app-dir)") from exc
    options = {k: v for k, v in options.items() if v is not None}
    if isinstance(obj, SyncServer):
        return obj
    if isinstance(obj, SyncSchema):
        if tokens is None and serving:
            raise SystemExit("error: serving a SyncSchema needs --tokens FILE")
        raw = json.loads(Path(tokens).read_text()) if tokens is not None else {}
        auth = TokenAuth(
            {
                t: Principal(p["id"], p.get("params", {}), admin=bool(p.get("admin", False)))
                for t, p in raw.items()
            }
        )
        return SyncServer(obj, database, authenticate=auth, **options)
    if callable(obj):
        return obj(database, **options)
    raise SystemExit(f"error: {target!r} is not a SyncServer, SyncSchema or factory")


#: Environment variable through which ``serve --workers`` tells each worker what to load.
_WORKER_ENV = "SYNCUNIT_SERVE"

#: Seconds ``serve`` keeps an idle connection open (uvicorn's default is 5). The side
#: that closes an idle connection should be the client: a request sent on a connection
#: the server is closing gets no answer. ``SyncClient`` lets its own go after
#: ``IDLE_CONNECTION_S`` (5 s); a proxy or load balancer in front keeps them longer
#: (60 s for AWS's, 75 s for nginx's by default), and asks the same of its backends.
KEEP_ALIVE_S = 75

#: ``serve --log-level`` choices: Python's logging levels, which uvicorn's follow.
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def cmd_serve(args: argparse.Namespace) -> int:
    from syncunit.server.logs import configure_logging

    configure_logging(args.log_format, args.log_level.upper())
    timeouts = {"keep_alive": args.keep_alive, "header_timeout": args.header_timeout}
    config = {
        "target": args.target, "database": args.database, "app_dir": args.app_dir,
        "tokens": args.tokens, "chunk_size": args.chunk_size,
        "metrics_token": args.metrics_token or os.environ.get("SYNCUNIT_METRICS_TOKEN"),
        "log_format": args.log_format, "log_level": args.log_level,
    }  # fmt: skip
    logs: dict[str, Any] = {"log_level": args.log_level, "access_log": args.access_log}
    if args.log_format == "json":
        logs["log_config"] = uvicorn_to_root()
    if args.workers > 1:
        # A database no worker can serve stops here: a worker failing at start is
        # started again by uvicorn, for ever.
        check_database(args.database)
        # Each worker process imports the app itself (uvicorn needs an import string).
        os.environ[_WORKER_ENV] = json.dumps(config)
        run_app(
            "syncunit.cli:worker_app", **timeouts, factory=True,
            workers=args.workers, host=args.host, port=args.port, **logs,
        )  # fmt: skip
        return 0
    server = _server_from(config)
    run_app(server.app, **timeouts, host=args.host, port=args.port, **logs)
    return 0


def check_database(database: str) -> None:
    """What ``serve --workers`` checks before starting its workers: that ``database`` is
    reachable and not migrated by a newer syncunit (``DatabaseTooNew``)."""
    import sqlalchemy as sa

    from syncunit.server.backends import open_store

    try:
        store = open_store(database)
    except ValueError as exc:  # an unsupported URL, or psycopg missing
        raise SyncUnitError(str(exc)) from exc
    try:
        with store.engine.connect() as conn, conn.begin():
            store.check_not_newer(conn)
    except sa.exc.OperationalError as exc:
        shown = store.engine.url.render_as_string(hide_password=True)
        raise SyncUnitError(f"cannot use the database {shown}: {exc.orig}") from exc
    finally:
        store.engine.dispose()


def uvicorn_to_root() -> dict[str, Any]:
    """A ``log_config`` for uvicorn that gives its loggers (startup, errors, the access
    log) no handlers of their own: their lines go to the root logger's handler, in the
    same format as the server's (``configure_logging``)."""
    names = ("uvicorn", "uvicorn.error", "uvicorn.access")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {name: {"handlers": [], "propagate": True} for name in names},
    }


def run_app(
    app: Any,
    *,
    keep_alive: int = KEEP_ALIVE_S,
    header_timeout: float = HEADER_TIMEOUT_S,
    **options: Any,
) -> None:
    """Run a server's ASGI ``app`` with uvicorn as ``syncunit serve`` does: its heap
    frozen once it has started (``FreezeOnStartup``), idle connections kept
    ``keep_alive`` seconds, a connection closed when its request headers are not
    complete ``header_timeout`` seconds after it opened (or after its first byte
    following a response); ``options`` go to ``uvicorn.run``.

    ``app`` may be an import string (with ``factory=True``, the name of a function
    returning the app, as ``--workers`` needs): what it names freezes its own heap
    (``worker_app`` does).
    """
    import uvicorn

    from syncunit.server.header_timeout import header_timeout_protocol
    from syncunit.server.heap import FreezeOnStartup

    target = app if isinstance(app, str) else FreezeOnStartup(app)
    http = header_timeout_protocol(header_timeout)
    uvicorn.run(target, timeout_keep_alive=keep_alive, http=http, **options)


def _server_from(config: dict[str, Any]) -> Any:
    return load_server(
        config["target"], config["database"], app_dir=config["app_dir"],
        tokens=config["tokens"], chunk_size=config["chunk_size"],
        metrics_token=config.get("metrics_token"),
    )  # fmt: skip


def worker_app() -> Any:
    """The ASGI app of one ``serve --workers N`` process (a uvicorn factory).

    Every worker builds its own server (its own connection pool) from what
    ``syncunit serve`` put in the environment; any worker serves any request.
    """
    raw = os.environ.get(_WORKER_ENV)
    if raw is None:
        raise SystemExit(f"error: {_WORKER_ENV} is not set: start workers with 'syncunit serve'")
    from syncunit.server.heap import FreezeOnStartup
    from syncunit.server.logs import configure_logging

    config = json.loads(raw)
    configure_logging(config["log_format"], config["log_level"].upper())
    return FreezeOnStartup(_server_from(config).app)


def open_maintained(args: argparse.Namespace, *, tracked: bool = True, **options: Any) -> Any:
    """The server of a maintenance command (``ddl``, ``lag``, ``prune``, ``renew-epoch``),
    on a database that exists and, when ``tracked``, has syncunit's tracking installed:
    a mistyped SQLite path is an error, not a new empty file, and one a newer syncunit
    migrated is refused (``DatabaseTooNew``)."""
    import sqlalchemy as sa

    from syncunit.server.migrations import check_not_newer, schema_version

    url = sa.engine.make_url(args.database)
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        path = Path(url.database)
        if not path.exists():
            raise SyncUnitError(
                f"no database at {path.resolve()} ({shown}): check the path;"
                " 'syncunit serve' creates a new database, this command does not"
            )
    try:
        if tracked:
            with sa.create_engine(url).connect() as conn:
                installed = sa.inspect(conn).has_table("syncunit_meta")
                current = schema_version(conn) if installed else 0
            if not installed:
                raise SyncUnitError(
                    f"the database {shown} has no syncunit tracking installed: check the URL,"
                    " or install it first ('syncunit serve' does, or apply 'syncunit ddl')"
                )
            check_not_newer(current)  # before the server is built: nothing read or written
        return load_server(
            args.target, args.database, app_dir=args.app_dir, tokens=None, serving=False,
            **options,
        )  # fmt: skip
    except sa.exc.OperationalError as exc:
        raise SyncUnitError(f"cannot use the database {shown}: {exc.orig}") from exc


def cmd_lag(args: argparse.Namespace) -> int:
    server = open_maintained(args, install=False)
    lag = server.store.watermark_lag()
    if lag is None:
        print("no lag: this database serializes its writers")
        return 0
    print(
        f"watermark {lag.watermark}: {lag.transactions} transaction id(s) behind,"
        f" held {lag.seconds:.1f} s by {lag.holder or 'nothing'}"
    )
    return 0


def cmd_ddl(args: argparse.Namespace) -> int:
    server = open_maintained(args, tracked=False, install=False)
    store, schema = server.store, server.schema
    try:
        statements = [
            *store.tracking_ddl(schema, existing=not args.fresh),
            *store.scope_index_ddl(schema),
        ]
    except ValueError as exc:  # e.g. a tracked table missing from this database
        raise SyncUnitError(f"{exc} (is --database the application's database?)") from exc
    for stmt in statements:
        print(stmt.rstrip(";") + ";")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    server = open_maintained(args)
    horizon = server.store.prune_tombstones(args.keep)
    print(f"tombstones at or below version {horizon} removed")
    return 0


def cmd_renew_epoch(args: argparse.Namespace) -> int:
    # Without installing: a restored database refuses to be served until this has run.
    server = open_maintained(args, install=False)
    print(f"new epoch {server.store.renew_epoch()}: every client re-downloads on its next sync")
    return 0


def cmd_retrack(args: argparse.Namespace) -> int:
    server = open_maintained(args, install=False)
    tracked = sorted(t.name for t in server.schema.tracked_tables())
    unknown = [t for t in args.tables if t not in tracked]
    if unknown:  # before anything is installed or declared: all or none
        raise SyncUnitError(
            f"not tracked by {args.target}: {', '.join(unknown)}; name among {', '.join(tracked)}"
        )
    # Installing first: tracking a writer turned off (triggers disabled) is restored too.
    server.store.install(server.schema)
    for table in args.tables:
        version = server.retrack(table)
        print(
            f"{table}: changed outside tracking at version {version}; every stream reading"
            " it copies afresh on its next sync"
        )
    return 0


def _versions(raw: str) -> int:
    """``--keep``: a count of versions, zero or more."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {raw!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"{value} is negative: keep N >= 0 versions (0 drops every tombstone)"
        )
    return value


def _rows(raw: str) -> int:
    """``--chunk-size``: a count of rows, one or more."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of rows: {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} rows: a chunk holds at least 1 row")
    return value


def _seconds(raw: str) -> float:
    """A positive number of seconds."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {raw!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{raw} is not a positive number of seconds")
    return value


def cmd_sync(args: argparse.Namespace) -> int:
    """Run one unit; its result goes to stdout, the progress bar (with rich) to stderr."""
    from syncunit.client import SyncClient

    params = _params(args.param)
    client = SyncClient(args.url, args.db, token=args.token, chunk_size=args.chunk_size)
    with client, _progress_bar(args.unit, hidden=args.json) as show:
        client.on_progress = show
        try:
            result = client.sync(args.unit, params=params)
        except ProblemError as exc:
            # The server tells a library user to pass params={...}: here it is --param.
            told = str(exc)
            fixed = _PARAMS_HINT.sub(r"pass --param \1=...", told)
            if fixed == told:
                raise
            raise SyncUnitError(fixed) from None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(
            f"{result.unit}: {result.total_in:,} rows in, {result.total_removed:,} removed,"
            f" {result.rows_out:,} out, {result.bytes_in:,} bytes in, {result.seconds:.3f} s,"
            f" {result.requests} request(s)"
        )
    return 0


_PARAMS_HINT = re.compile(r"pass params=\{'(\w+)': \.\.\.\}")


@contextmanager
def _progress_bar(unit: str, *, hidden: bool) -> Iterator[Callable[[str, int, int], None]]:
    """An ``on_progress`` that draws a bar on stderr (none without rich: the client-only
    install has no rich, and the command works the same)."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    except ImportError:
        yield lambda _unit, _done, _total: None
        return
    bar = Progress(
        TextColumn(unit), BarColumn(), MofNCompleteColumn(),
        console=Console(stderr=True), transient=True, disable=hidden,
    )  # fmt: skip
    with bar:
        task = bar.add_task(unit, total=None)
        yield lambda _unit, done, total: bar.update(task, completed=done, total=total)


def _params(pairs: list[str] | None) -> dict[str, Any] | None:
    """``name=value`` pairs; a value that reads as JSON (``42``) is taken as such."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise SyncUnitError(f"--param wants name=value, not {pair!r}")
        try:
            out[name] = json.loads(raw)
        except ValueError:
            out[name] = raw
    return out or None


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo = importlib.import_module("syncunit.examples.hospital.scenario").run_demo
    code: int = run_demo(
        appointments=args.appointments,
        report=Path(args.report) if args.report else None,
        workdir=Path(args.workdir) if args.workdir else None,
        chunk_size=args.chunk_size,
    )
    return code


def cmd_bench(args: argparse.Namespace) -> int:
    return run_bench(args.rest)


def run_bench(argv: list[str]) -> int:
    """``syncunit bench ...``: the benchmarks of a checkout, with their own options."""
    result: int = _from_checkout(".", "bench.run").main(argv)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="syncunit", description="Offline-first data sync.")
    sub = parser.add_subparsers(dest="command", required=True)

    def server_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("target", help="module:attribute of a SyncServer, factory or SyncSchema")
        p.add_argument("--database", required=True, help="database URL, e.g. sqlite:///app.sqlite")
        p.add_argument("--app-dir", default=".", help="directory to import TARGET from")

    p = sub.add_parser("serve", help="run a sync server", description="Run a sync server.")
    server_args(p)
    p.add_argument("--tokens", help="JSON {token: {id, params, admin}} for a SyncSchema TARGET")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--chunk-size", type=_rows, metavar="ROWS", help="rows per chunk (default 2000)")
    p.add_argument(
        "--log-level", default="info", type=str.lower, choices=LOG_LEVELS,
        help="the least severe log lines shown (default info)",
    )  # fmt: skip
    p.add_argument(
        "--log-format", choices=["text", "json"], default="text",
        help="log lines as text or one JSON object each, uvicorn's too (default text)",
    )  # fmt: skip
    p.add_argument(
        "--access-log", action=argparse.BooleanOptionalAction, default=True,
        help="log each HTTP request with its client address (default on)",
    )  # fmt: skip
    p.add_argument(
        "--metrics-token",
        help="bearer token that may read /metrics (default: $SYNCUNIT_METRICS_TOKEN;"
        " admin principals may always read it)",
    )
    p.add_argument(
        "--workers", type=int, default=1,
        help="server processes sharing the port (use PostgreSQL for more than one)",
    )  # fmt: skip
    p.add_argument(
        "--keep-alive", type=int, default=KEEP_ALIVE_S, metavar="SECONDS",
        help="how long an idle connection stays open; longer than the clients' and any"
        f" proxy's in front keep theirs (default {KEEP_ALIVE_S})",
    )  # fmt: skip
    p.add_argument(
        "--header-timeout", type=_seconds, default=HEADER_TIMEOUT_S, metavar="SECONDS",
        help="close a connection whose request headers are not complete this long after it"
        " opened, or after its first byte following a response: half-sent requests"
        f" cannot hold connections (default {HEADER_TIMEOUT_S:g})",
    )  # fmt: skip
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("sync", help="run one unit into a local file", description="Run one unit.")
    p.add_argument("url", help="server URL, e.g. http://127.0.0.1:8000")
    p.add_argument("unit", help="the sync unit to run")
    p.add_argument("--db", required=True, help="the local SQLite file")
    p.add_argument("--token", help="bearer token")
    p.add_argument("--chunk-size", type=_rows, metavar="ROWS", help="rows per chunk to ask for")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--param",
        action="append",
        metavar="NAME=VALUE",
        help="a client parameter of the unit (repeatable), e.g. --param patient_id=42",
    )
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("ddl", help="print the tracking DDL", description="Print tracking DDL.")
    server_args(p)
    p.add_argument("--fresh", action="store_true", help="DDL for tables without tracking yet")
    p.set_defaults(func=cmd_ddl)

    p = sub.add_parser("prune", help="drop old tombstones", description="Drop old tombstones.")
    server_args(p)
    p.add_argument(
        "--keep", type=_versions, required=True, metavar="N",
        help="keep the tombstones of the newest N versions (N >= 0)",
    )  # fmt: skip
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "lag",
        help="how far open transactions hold deltas back",
        description="Show the watermark lag: open writing transactions hold deltas back.",
    )
    server_args(p)
    p.set_defaults(func=cmd_lag)

    p = sub.add_parser(
        "renew-epoch",
        help="make every client re-download",
        description="Give the database a new epoch, e.g. after restoring a backup.",
    )
    server_args(p)
    p.set_defaults(func=cmd_renew_epoch)

    p = sub.add_parser(
        "retrack",
        help="declare tables changed outside tracking",
        description="Declare tables changed by writes no trigger saw (triggers disabled,"
        " partitions attached, detached or truncated, ALTER COLUMN ... TYPE ... USING):"
        " every stream reading them copies afresh on its next sync.",
    )
    server_args(p)
    p.add_argument("tables", nargs="+", metavar="TABLE", help="a tracked table")
    p.set_defaults(func=cmd_retrack)

    p = sub.add_parser("demo", help="the hospital example, end to end", description="Run the demo.")
    p.add_argument("--appointments", type=int, default=100_000, help="rows to generate")
    p.add_argument("--report", help="write the syncs as JSON to this path")
    p.add_argument("--workdir", help="keep the databases here")
    p.add_argument("--chunk-size", type=_rows, metavar="ROWS", help="rows per chunk")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="run the benchmarks", description="Run the benchmarks.")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options for the bench (see --help)")
    p.set_defaults(func=cmd_bench)
    return parser


#: The extra each command needs beyond the client (``sync`` needs none).
COMMAND_EXTRAS = {
    "serve": "server", "ddl": "server", "prune": "server", "renew-epoch": "server",
    "lag": "server", "demo": "cli", "bench": "cli,bench",
}  # fmt: skip
#: Modules of an extra of their own (the PostgreSQL driver, whichever command needs it).
_MODULE_EXTRAS = {"psycopg": "postgres", "rich": "cli", "matplotlib": "bench", "psutil": "bench"}
#: What the extras install: a missing one is an install to fix, not a bug to trace.
_EXTRA_MODULES = {
    "starlette", "uvicorn", "anyio", "sqlalchemy", "zstandard", "jwt", "prometheus_client",
    *_MODULE_EXTRAS,
}  # fmt: skip


def _missing_extra(command: str, exc: ModuleNotFoundError) -> str | None:
    """The message for a command whose extra is not installed (None: another error)."""
    module = (exc.name or "").partition(".")[0]
    if module not in _EXTRA_MODULES:
        return None
    extra = "postgres" if module == "psycopg" else COMMAND_EXTRAS.get(command)
    extra = extra or _MODULE_EXTRAS.get(module, "server")
    return (
        f"error: syncunit {command} needs the extra [{extra}] (no module named {module!r}):"
        f" pip install 'syncunit[{extra}]', or from a checkout pip install './[{extra}]'"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``syncunit`` command."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _run(argv)
    except ModuleNotFoundError as exc:
        message = _missing_extra(argv[0] if argv else "", exc)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1


def _run(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:  # its options are the bench's own (see syncunit bench --help)
        return run_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except SyncUnitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    raise SystemExit(main())

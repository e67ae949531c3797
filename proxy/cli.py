"""The ``thrifty`` command: serve, keys create / list / revoke, report, and policy check / explain / simulate.

A bad argument or a bad configuration file prints one line (``thrifty: error: ...``) and
exits with code 2, never a traceback; ``--help`` on any command says the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import replace
from datetime import UTC, datetime
from typing import NoReturn

from proxy.bench.cli import add_bench_parser
from proxy.bench.cli import run as run_bench
from proxy.config import load_settings
from proxy.cost.report_cli import add_report_parser, run_report
from proxy.errors import ConfigError
from proxy.policy.cli import add_policy_parser, run_policy
from proxy.settings import Settings


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"thrifty: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="thrifty", description="thrifty: a cost-optimizing OpenAI-compatible LLM gateway")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the gateway")
    _config_option(serve)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, help="port to listen on (default 4000)")
    serve.add_argument("--workers", type=_workers, help="worker processes sharing the port (default 1)")

    keys = commands.add_parser("keys", help="create, list and revoke virtual API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    create = key_commands.add_parser("create", help="create a key; it is printed once, as the last word")
    _config_option(create)
    create.add_argument("--team", required=True, type=_name)
    create.add_argument("--app", type=_name)
    create.add_argument("--role", choices=("user", "finance", "admin"), default="user")
    listing = key_commands.add_parser("list", help="list keys (never the keys themselves)")
    _config_option(listing)
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.add_argument("--format", choices=("table", "json"), default="table")
    revoke = key_commands.add_parser("revoke", help="revoke a key by its id")
    _config_option(revoke)
    revoke.add_argument("key_id")
    add_report_parser(commands)
    add_policy_parser(commands)
    add_bench_parser(commands)
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML configuration (default: $THRIFTY_CONFIG, else zero-config)")


def _port(text: str) -> int:
    return _bounded_int(text, 0, 65535, "port")


def _workers(text: str) -> int:
    return _bounded_int(text, 1, 256, "workers")


def _bounded_int(text: str, low: int, high: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be an integer, not {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{what} must be between {low} and {high}, not {value}")
    return value


def _name(text: str) -> str:
    if not text.strip() or len(text) > 128:
        raise argparse.ArgumentTypeError(f"must be 1 to 128 characters, not {text!r}")
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        if args.command == "serve":
            return _serve(settings, args)
        if args.command == "report":
            return asyncio.run(run_report(settings, args))
        if args.command == "policy":
            return run_policy(settings, args)
        if args.command == "bench":
            return run_bench(args)
        return asyncio.run(_keys(settings, args))
    except ConfigError as exc:
        print(f"thrifty: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from proxy.server import serve

    server = settings.server
    server = replace(
        server,
        host=args.host or server.host,
        port=server.port if args.port is None else args.port,
        workers=args.workers or server.workers,
    )
    return serve(replace(settings, server=server))


async def _keys(settings: Settings, args: argparse.Namespace) -> int:
    from proxy.storage.database import open_database
    from proxy.storage.keys import KeyStore

    db = await open_database(settings.ledger.url)
    try:
        store = KeyStore(db)
        if args.keys_command == "create":
            key, record = await store.create(args.team, args.app, args.role)
            print(f"created key {record.id} for team {record.team}" + (f", app {record.app}" if record.app else ""))
            print("store it now; it is not shown again:")
            print(key)
            return 0
        if args.keys_command == "revoke":
            if await store.revoke(args.key_id):
                print(f"revoked {args.key_id}")
                return 0
            print(f"thrifty: error: no active key with id {args.key_id!r}", file=sys.stderr)
            return 1
        records = await store.list(include_revoked=args.all)
        if args.format == "json":
            print(json.dumps([_key_json(r) for r in records], indent=2))
        else:
            _print_keys_table(records)
        return 0
    finally:
        await db.close()


def _key_json(record: object) -> dict[str, object]:
    from dataclasses import asdict

    return asdict(record)  # type: ignore[call-overload,no-any-return]


def _print_keys_table(records: list) -> None:  # type: ignore[type-arg]
    header = ("id", "prefix", "team", "app", "role", "created", "revoked")
    rows = [(r.id, r.prefix + "…", r.team, r.app or "", r.role, _when(r.created_at), _when(r.revoked_at)) for r in records]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M") if ts else ""


if __name__ == "__main__":
    sys.exit(main())

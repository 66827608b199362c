"""Entry point of the ``engram-store`` command.

Each subcommand lives in its own module ``tools/cmd_<name>.py`` exposing
``register(subparsers)``, which adds a parser whose ``func(args) -> int`` runs it.
Modules are discovered, so adding a command touches no shared file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import engram_store_cli
from engram_store.errors import EngramStoreError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engram-store",
        description="Tiered storage for Engram memory tables: train, count, plan, build, serve, bench.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(engram_store_cli.__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"engram_store_cli.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (EngramStoreError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        # One line, no traceback: the message already says what to do.
        print(f"engram-store {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"engram-store {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

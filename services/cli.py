"""The ``pylon`` command: one subcommand per service, plus ``up`` (local cluster) and ``app``."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module with add_arguments(parser) and main(args) -> int; imported lazily so that
# a room process never loads aiohttp and a center never loads the room's code.
COMMANDS = {
    "room": ("services.room.main", "TCP gateway: holds client sessions"),
    "register": ("services.register.main", "global session store (gRPC over Redis)"),
    "saver": ("services.saver.main", "message storage (gRPC over Redis + MySQL)"),
    "coordinator": ("services.coordinator.main", "upstream/status webhooks and kick"),
    "center": ("services.center.main", "HTTP API for app servers and operators"),
    "dispatcher": ("services.dispatcher.main", "HTTP route service: room addresses for a client"),
    "up": ("services.launcher.main", "run the whole system on this machine (Redis, MariaDB, all services)"),
    "app": ("services.center.admin_cli", "create and list apps"),
    "admin": ("services.center.admin_ops_cli", "operator actions: parked messages, requeue, inspect a user, drain a room"),
    "status": ("services.center.status_cli", "the cluster overview in the terminal (instances, connections, rates, health)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pylon", description="Pylon push gateway")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
        else:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return importlib.import_module(COMMANDS[args.command][0]).main(args)


if __name__ == "__main__":
    sys.exit(main())

"""The ``mxq`` command: one entry point, one sub-command per job.

``deliver`` comes from the engine (``workers.cli``); the pipeline's commands
(send, status, worker, scheduler, up) are added here as they exist.  Exit
statuses follow sysexits: 0 ok, 64 usage, 65 bad input, 69 bounced,
75 deferred.
"""

from __future__ import annotations

import argparse
import sys

EX_USAGE = 64


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command registered."""
    from workers import cli as engine_cli

    parser = argparse.ArgumentParser(prog="mxq", description="Distributed mail delivery workers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    engine_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``mxq``; return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors; sysexits says 64
        return EX_USAGE if e.code not in (0, None) else 0
    if not getattr(args, "run", None):
        parser.print_usage(sys.stderr)
        return EX_USAGE
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""``spattn`` console script: one parser, one module per subcommand, imported only when chosen.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int`` (the exit code).
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
from typing import List, Optional

# name -> (module, one-line help). Modules are imported lazily: `spattn plan` must not pay for
# diffusers, `spattn doctor` must work when diffusers is missing.
COMMANDS = {
    "generate": ("spattn.cli.generate", "text-to-image with sequence-parallel attention (the guide's workflow)"),
    "serve": ("spattn.cli.serve", "OpenAI-compatible server over a sequence-parallel engine (--usp/--ring)"),
    "plan": ("spattn.cli.plan", "predict time and speedup per Ulysses x Ring factorization; recommend one"),
    "doctor": ("spattn.cli.doctor", "versions, backends, devices, links; --selftest checks kernels here"),
}


class _Parser(argparse.ArgumentParser):
    """Bad flags get one line naming the fix (not argparse's usage block), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def main(argv: Optional[List[str]] = None) -> int:
    from spattn.launch import signals_as_exit

    try:  # Ctrl-C or SIGTERM anywhere (loading, a single-process run): one line, not a traceback
        with signals_as_exit():
            return _main(argv)
    except KeyboardInterrupt as e:
        name = e.args[0] if e.args else "SIGINT"
        print(f"spattn: interrupted ({name})", file=sys.stderr, flush=True)
        return 128 + int(getattr(signal, name, signal.SIGINT))


def _main(argv: Optional[List[str]]) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _Parser(prog="spattn", description="sequence-parallel attention tools")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", parser_class=_Parser)
    name = next((a for a in argv if not a.startswith("-")), None)
    for cmd, (_, help_) in COMMANDS.items():
        p = sub.add_parser(cmd, help=help_, description=help_)
        if cmd == name:  # only the chosen command's module is imported
            importlib.import_module(COMMANDS[cmd][0]).add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The ``moekit`` command. Bad input gives one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        print(f"moekit: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from . import bench

    parser = _Parser(prog="moekit", description="Sparse Mixture-of-Experts toolkit.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("bench", help="time the MoE layer against its floor and transformers")
    bench.add_arguments(p)
    p.set_defaults(func=bench.main_from_args)
    from . import commands

    commands.add_train(sub)
    commands.add_eval(sub)
    commands.add_generate(sub)
    commands.add_trace(sub)
    commands.add_report(sub)
    commands.add_inspect(sub)
    commands.add_export(sub)
    from . import compare

    p = sub.add_parser("compare", help="train once per routing/balancing method and tabulate the results")
    compare.add_arguments(p)
    p.set_defaults(func=compare.main_from_args)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"moekit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moekit {args.command}: interrupted", file=sys.stderr)
        return 130

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
    from . import commands_adapt, commands_compress, commands_compress_report, commands_offload, commands_quant
    from . import commands_serve

    commands_quant.add_quantize(sub)
    commands_compress.add_prune(sub)
    commands_compress.add_merge(sub)
    commands_compress_report.add_compress_report(sub)
    commands_serve.add_simulate(sub)
    commands_serve.add_place(sub)
    commands_offload.add_offload(sub)  # the expert store
    commands_adapt.add_finetune(sub)  # routers only, RoMA
    from . import compare

    p = sub.add_parser("compare", help="train once per routing/balancing method and tabulate the results")
    compare.add_arguments(p)
    p.set_defaults(func=compare.main_from_args)
    for p in sub.choices.values():  # every subcommand accepts plugins (loaded by main() before parsing)
        p.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                       help="Python file to load first, e.g. one that registers a custom router (repeatable; also "
                            "$MOEKIT_PLUGINS, paths separated by os.pathsep). It is executed: name only files you "
                            "trust. train records it in the run's config.json so later commands load it")
    return parser


def main(argv=None) -> int:
    from . import plugins

    argv = list(sys.argv[1:] if argv is None else argv)
    try:  # before the parser exists: --help and argument validation then know the plugins' routers
        plugin_paths = plugins.load_command_plugins(argv)
    except ValueError as exc:
        print(f"moekit: error: {exc}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # an abbreviated flag (--plug FILE) reaches only the parser: load what it holds as well
        late = plugins.load_plugins(getattr(args, "plugin", None) or [], "--plugin")
    except ValueError as exc:
        print(f"moekit: error: {exc}", file=sys.stderr)
        return 2
    args.plugin_paths = plugin_paths + [p for p in late if p not in plugin_paths]
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"moekit {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # a missing, read-only or full destination, a file where a folder goes, ...
        from .io import os_error_text

        print(f"moekit {args.command}: error: {_one_line(os_error_text(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moekit {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "invalid input"

"""The ``bnbench`` command line: parse arguments, call the library, report. No logic of its own.

Each subcommand lives in its own module, which provides ``HELP`` (one line), optionally ``DESCRIPTION``,
``configure(parser)`` (adds its arguments) and ``run(args) -> int`` (the exit code).

Exit codes: 0 success; 1 the command ran but found a failure (an incorrect benchmark point, a regression);
2 bad usage or bad input (the message names the values); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

#: subcommand -> module implementing it
COMMANDS = {
    "bench": "bnbench.bench.cli",
    "profile": "bnbench.bench.profile",
    "step": "bnbench.step.cli",  # a network's whole training step
    "inspect": "bnbench.inspect.cli",
    "train": "bnbench.train.cli",
    "report": "bnbench.report.cli",
    "env": "bnbench.envinfo",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help only when it says something: not for None, not for an off switch,
    and not when the help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    import bnbench

    parser = argparse.ArgumentParser(
        prog="bnbench",
        description="Fused BatchNorm + activation: benchmark, profile, train and report.",
        epilog="Run 'bnbench COMMAND --help' for a command's options. Exit codes: 0 ok, 1 failures found, "
        "2 bad usage or input, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"bnbench {bnbench.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=HelpFormatter,
        )
        module.configure(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"bnbench {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"bnbench {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the output went to a pager or `head` that closed early: nothing more to say
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``tal`` command line. One module per subcommand holds its argparse definition and a thin handler:
check the flags, import the job module, build the request, call one function, print.

The job module is imported inside the handler and nowhere else here, so ``tal --help`` and
``tal COMMAND --help`` load neither torch nor Ray (tests/jobs/test_cli.py checks it).

Exit codes: 0 success, 2 unusable input (one line on stderr saying what and where), 3 partial success
(``tal detect``: some videos failed, the others were written), 1 a bug.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jobs.cli import demo, detect, evaluate, export, extract, report, serve, synth, train
from jobs.errors import UsageError

__all__ = ["EXIT_BAD_INPUT", "build_parser", "main"]

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tal", description="Temporal action localization on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (demo, synth, extract, train, detect, serve, evaluate, report, export):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Imported once the arguments are parsed (``--help`` has exited by then): the annotation readers load torch.
    from pipelines.annotations import AnnotationFormatError

    try:
        return args.func(args)
    except (UsageError, AnnotationFormatError, OSError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, FileNotFoundError) and e.filename:
            message = f"no such file: {e.filename}"
        print(f"tal {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT

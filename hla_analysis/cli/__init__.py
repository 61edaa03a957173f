"""The ``hla-analysis`` command line: a thin layer over the library.

Every subcommand lives in its own module of this package and exposes
``register(subparsers)``; the parser is assembled from whatever modules exist, so a
new capability adds a file here and nothing else.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from hla_analysis import __version__

DESCRIPTION = """\
Measure how well Hadamard Linear Attention (HLA) and kernel linear attention
approximate softmax attention: derive their rational forms symbolically, measure
the approximation numerically, capture q/k/v from real pretrained transformers and
compare attention variants on them.

Typical session:
  hla-analysis demo --out runs/demo            # everything below, on the embedded MiniLM
  hla-analysis derive hla --factors 3          # rational form and degrees of HLA, M=3
  hla-analysis capture --model minilm --out runs/cap
  hla-analysis compare --capture runs/cap --variants default --out runs/results.parquet
  hla-analysis summary runs/results.parquet
"""

# order in which subcommands are listed in --help; unknown ones go last
_ORDER = ["demo", "derive", "degree", "capture", "compare", "summary", "variants", "bench"]


def _subcommand_modules():
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    names.sort(key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))
    return [importlib.import_module(f"{__name__}.{n}") for n in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hla-analysis",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for module in _subcommand_modules():
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit 0 on success, 2 for bad usage, 1 for a failure.

    A failure prints one line (``hla-analysis COMMAND: error: ...``); ``--debug`` (before
    the command) re-raises it with its traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)  # bad usage: argparse prints one line and exits 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. `hla-analysis derive hla | head -1`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"hla-analysis {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        # Library errors (ValueError) already say what went wrong and how to fix it; other
        # failures (a bad --device, a torch error) get their type named, never a traceback.
        # Only those unexpected failures point at --debug: a user's mistake needs no traceback.
        user_error = isinstance(exc, (ValueError, OSError, ImportError))
        kind = "" if user_error else f"{type(exc).__name__}: "
        message = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
            # the system's words name the problem; say which path and what to do about it
            message = (f"cannot use {exc.filename}: {exc.strerror.lower()}; "
                       "check the path and its permissions, or choose another location")
        hint = "" if user_error else " (rerun with --debug for the traceback)"
        print(f"hla-analysis {args.command}: error: {kind}{message}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

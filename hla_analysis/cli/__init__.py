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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for module in _subcommand_modules():
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. `hla-analysis derive hla | head -1`
        sys.stderr.close()
        return 0
    except (ValueError, OSError, ImportError) as exc:
        # Library errors already say what went wrong and how to fix it; no traceback.
        print(f"hla-analysis {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

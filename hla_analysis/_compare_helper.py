"""``python -m hla_analysis._compare_helper CAPTURE PARTS``: one helper process of a CPU comparison.

Started by :func:`hla_analysis.compare.run_comparison` (``workers > 1``); not a user command.
"""

import sys

from hla_analysis.compare import _helper_main

if __name__ == "__main__":
    sys.exit(_helper_main())

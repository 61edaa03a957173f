import sys

from hla_analysis.cli import main

sys.exit(main())

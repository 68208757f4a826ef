"""`python -m gradwatch` runs the command line."""

import sys

from gradwatch.cli import main

sys.exit(main())

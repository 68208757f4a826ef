"""`python -m gradwatch` runs the command line."""

import sys

from gradwatch._cli import main

sys.exit(main())

"""`python -m clinfed.cli ...` is the `clinfed` command."""

import sys

from clinfed.cli.main import main

sys.exit(main())

"""`python -m dsnot_deploy.cli ...` runs the command-line interface."""

import sys

from dsnot_deploy.cli import main

sys.exit(main())

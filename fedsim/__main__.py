"""Entry point of ``python -m fedsim``."""

import sys

from fedsim.cli import main

sys.exit(main())

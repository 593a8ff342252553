"""`python -m bridge` runs the insitechat-bridge command line."""

import sys

from bridge.cli import main

sys.exit(main())

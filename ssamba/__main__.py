"""`python -m ssamba` is the `ssamba` command."""

import sys

from ssamba.cli import main

sys.exit(main())

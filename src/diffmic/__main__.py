"""``python -m diffmic`` runs the command line."""

import sys

from diffmic.cli import main

sys.exit(main())

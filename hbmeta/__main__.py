"""``python -m hbmeta`` runs the command line."""

import sys

from hbmeta.cli.main import main

sys.exit(main())

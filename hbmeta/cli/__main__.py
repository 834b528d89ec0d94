"""``python -m hbmeta.cli`` (and ``torchrun -m hbmeta.cli``) runs the command line."""

import sys

from hbmeta.cli.main import main

sys.exit(main())

"""``python -m popvec``: the ``popvec`` command."""

import sys

from popvec.cli.main import main

sys.exit(main())

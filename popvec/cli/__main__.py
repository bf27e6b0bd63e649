"""``python -m popvec.cli``: the ``popvec`` command."""

import sys

from popvec.cli.main import main

sys.exit(main())

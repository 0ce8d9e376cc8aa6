"""``python -m localrun`` (``make run-local``)."""

import sys

from localrun.command import main

sys.exit(main())

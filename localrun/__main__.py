"""``python -m localrun`` (``make run-local``)."""

import sys

from localrun.run import main

sys.exit(main())

"""`python -m atlas.local.demo`: the demo upstream on a port (see the package docstring)."""

import sys

from atlas.local.demo.server import main

sys.exit(main())

"""``python -m ps.server``: see ``ps.server.server``."""
import sys

from ps.server.server import main

sys.exit(main())

"""``python -m ps.scheduler``: see ``ps.scheduler.scheduler``."""
import sys

from ps.scheduler.scheduler import main

sys.exit(main())

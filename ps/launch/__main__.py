"""``python -m ps.launch``: see ``ps.launch.launcher``."""
import sys

from ps.launch.launcher import main

sys.exit(main())

"""``python -m cli ...``: the same as the ``decmem`` console script (used by launchers and the demo's stages)."""
import sys

from cli.main import main

sys.exit(main())

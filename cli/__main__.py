"""``python -m decmem.cli ...``: the same as the ``decmem`` console script (used by launchers and the demo's stages)."""
import sys

from decmem.cli.main import main

sys.exit(main())

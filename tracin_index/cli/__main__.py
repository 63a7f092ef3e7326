"""``python -m tracin_index.cli``: the ``tracin-index`` command."""

import os
import sys

from . import main

main(prog_name=os.path.basename(sys.argv[0]))

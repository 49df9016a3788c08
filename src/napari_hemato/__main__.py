"""``python -m napari_hemato`` runs the command line."""

import sys

from napari_hemato.cli import main

sys.exit(main())

"""``python -m l2vit ...`` is the ``l2vit`` command."""
import sys

from .cli import main

sys.exit(main())

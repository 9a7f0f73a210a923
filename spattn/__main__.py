"""``python -m spattn ...`` is the ``spattn`` console script."""
import sys

from .cli.main import main

sys.exit(main())

"""``python -m se_export``: the same command line as the ``se-export`` script."""

from .cli import main

main()

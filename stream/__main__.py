"""``python -m stream`` is the ``scopecast`` command."""

from .cli import main

main()

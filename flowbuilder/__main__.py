"""``python -m flowbuilder`` runs the ``flowbuilder`` command."""

from flowbuilder.cli import main

main()

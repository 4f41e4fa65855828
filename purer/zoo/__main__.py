"""``python -m purer.zoo`` runs the ``purer-zoo`` CLI."""
from .cli import main

raise SystemExit(main())

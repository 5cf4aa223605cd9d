"""`python -m sam.callback`: the same as `sam-callback`."""

from .cli import main

raise SystemExit(main())

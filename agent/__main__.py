"""`python -m agent` is the `pinion` command."""

from agent.cli import main

raise SystemExit(main())

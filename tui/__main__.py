"""python -m tui [--home H] [--url URL]: the terminal UI (same as `whetstone chat`)."""

from tui.app import main

raise SystemExit(main())

"""`python -m zhtune ...` is the same as the `zhtune` command."""

from zhtune.cli import main

raise SystemExit(main())

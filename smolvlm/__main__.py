"""`python -m smolvlm` is the `smolvlm` command."""

from smolvlm.cli import main

raise SystemExit(main())

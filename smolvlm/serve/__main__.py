"""`python -m smolvlm.serve -m MODEL --port 8000`: the same as `smolvlm serve`."""

from smolvlm.serve.app import main

raise SystemExit(main())

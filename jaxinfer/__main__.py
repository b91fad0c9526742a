"""`python -m jaxinfer ...` is the `jaxinfer` command."""

import sys

from jaxinfer.cli import main

sys.exit(main())

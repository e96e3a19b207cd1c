"""`python -m lsg_patch ...` is the `lsg-patch` command (the same parser and entry point)."""
import sys

from .cli import main

sys.exit(main())

"""`python -m thrifty ...` runs the `thrifty` command (same as the console script)."""
import sys

from thrifty.cli import main

sys.exit(main())

"""`python -m ral_core.cli …`: the `ral` command."""
import sys

from ral_core.cli import main

sys.exit(main())

"""`python -m ral_core.cli …`: the `ral` command."""
import sys

from ral_core.cli import main

if __name__ == "__main__":  # importing the module (e.g. walking the package) must not run the command
    sys.exit(main())

"""``python -m snopt_dyn compare ...`` -- the same as the ``snopt-dyn`` console script."""
import sys

from .compare.cli import main

if __name__ == "__main__":
    sys.exit(main())

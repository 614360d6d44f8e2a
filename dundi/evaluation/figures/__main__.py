"""`python -m dundi.evaluation.figures` (`make figures`)."""

import sys

from dundi.evaluation.figures.render import main

if __name__ == "__main__":
    sys.exit(main())

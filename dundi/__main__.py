import sys

from dundi.cli import main

sys.exit(main())

import sys

from stamen.cli import main

sys.exit(main())

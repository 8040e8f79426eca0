import sys

from hsci.cli import main

sys.exit(main())

import sys

from atso_fast.cli import main

sys.exit(main())

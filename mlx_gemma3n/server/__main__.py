import sys

from ..cli.server import main

sys.exit(main())

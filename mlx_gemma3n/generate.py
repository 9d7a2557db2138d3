"""`python -m mlx_gemma3n.generate`: one reply from the command line (the parser is in `cli/generate.py`).

The library's functions are in `mlx_gemma3n` itself; this module only runs the command, and the
package does not import it (so that running it prints no warning).
"""

import sys

from .cli.generate import main

if __name__ == "__main__":
    sys.exit(main())

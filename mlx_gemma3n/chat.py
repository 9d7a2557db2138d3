"""`python -m mlx_gemma3n.chat`: chat in the terminal (the parser is in `cli/chat.py`).

The library's functions are in `mlx_gemma3n` itself; this module only runs the command, and the
package does not import it (so that running it prints no warning).
"""

import sys

from .cli.chat import main

if __name__ == "__main__":
    sys.exit(main())

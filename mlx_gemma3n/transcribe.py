"""`python -m mlx_gemma3n.transcribe`: speech to text, or to another language (the parser is in `cli/transcribe.py`).

The library's functions are in `mlx_gemma3n` itself; this module only runs the command, and the
package does not import it (so that running it prints no warning).
"""

import sys

from .cli.transcribe import main

if __name__ == "__main__":
    sys.exit(main())

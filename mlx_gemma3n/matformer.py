"""`python -m mlx_gemma3n.matformer`: write a MatFormer sub-model as a checkpoint (see `cli.matformer`)."""

import sys

from .cli.matformer import main

if __name__ == "__main__":
    sys.exit(main())

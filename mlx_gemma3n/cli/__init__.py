"""The commands' argument parsing; `python -m mlx_gemma3n.<command>` runs each."""

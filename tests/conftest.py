import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(path, torch reference model) of one tiny random float32 Gemma 3n shared by the session."""
    path = tmp_path_factory.mktemp("tiny-gemma3n")
    reference = make_checkpoint(path)
    return path, reference

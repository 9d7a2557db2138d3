import sys
import threading
import time
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


@pytest.fixture
def no_leftover_threads():
    """After the test, the number of Python threads returns to what it was before."""
    baseline = threading.active_count()
    yield
    deadline = time.monotonic() + 5.0
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() == baseline, f"threads left running: {threading.enumerate()}"

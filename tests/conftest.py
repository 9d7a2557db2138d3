import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import virtual_audio  # noqa: E402
from checkpoints import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(path, torch reference model) of one tiny random float32 Gemma 3n shared by the session."""
    path = tmp_path_factory.mktemp("tiny-gemma3n")
    reference = make_checkpoint(path)
    return path, reference


@pytest.fixture
def no_leftover_threads(monkeypatch):
    """After the test, no thread it started is still running (an engine thread idling out within a second)."""
    from mlx_gemma3n.runtime import engine

    monkeypatch.setattr(engine, "IDLE_SECONDS", 1.0)
    before = set(threading.enumerate())

    def started():
        return set(threading.enumerate()) - before

    yield
    deadline = time.monotonic() + 5.0
    while started() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not started(), f"threads left running: {started()}"


@pytest.fixture(scope="module")
def virtual_mic():
    """A private PulseAudio daemon whose default source is a virtual microphone we can play into."""
    reason = virtual_audio.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with virtual_audio.VirtualMicrophone() as mic:
        yield mic

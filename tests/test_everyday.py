"""Everyday mistakes outside the model end in one sentence: audio too short to hear, the package run as a
command, conversions onto paths that cannot take them, a Hub that does not answer."""

import numpy as np
import pytest

import mlx_gemma3n
from mlx_gemma3n.errors import InputError
from mlx_gemma3n.processing.audio import SAMPLE_RATE, LogMelConfig, log_mel, min_samples


@pytest.fixture(scope="module")
def loaded(tiny):
    import mlx.core as mx

    return mlx_gemma3n.load(tiny[0], dtype=mx.float32)


def test_the_shortest_audio_is_the_shortest_that_gives_a_frame():
    n = min_samples()
    assert log_mel(np.ones(n, np.float32))[0].shape[0] == 1
    assert log_mel(np.ones(n - 1, np.float32))[0].shape[0] == 0
    unpadded = min_samples(LogMelConfig(), pad_to_multiple_of=None)
    assert unpadded == LogMelConfig().frame_length + 1  # one frame plus the pre-emphasis' extra sample


@pytest.mark.parametrize("samples", [300, min_samples() - 1], ids=["19ms", "one-short"])
def test_too_short_audio_is_one_sentence(loaded, samples):
    model, tokenizer = loaded
    with pytest.raises(InputError) as e:
        mlx_gemma3n.generate(model, tokenizer, "x", audio=[np.zeros(samples, np.float32)], max_tokens=1)
    seconds = f"{samples / SAMPLE_RATE:.3f}"
    assert str(e.value) == f"The recording is {seconds} s long; Gemma 3n needs at least 0.033 s of audio."


def test_empty_audio_is_one_sentence(loaded):
    model, tokenizer = loaded
    with pytest.raises(InputError, match="contains no audio samples") as e:
        mlx_gemma3n.generate(model, tokenizer, "x", audio=[np.zeros(0, np.float32)], max_tokens=1)
    assert "\n" not in str(e.value)


def test_the_shortest_audio_is_heard(loaded):
    model, tokenizer = loaded
    rng = np.random.default_rng(0)
    reply = mlx_gemma3n.generate(
        model, tokenizer, "x", audio=[rng.uniform(-0.5, 0.5, min_samples()).astype(np.float32)], max_tokens=1
    )
    assert isinstance(reply, str)


def test_transcribing_a_too_short_recording_is_an_error_not_an_empty_text(loaded):
    from mlx_gemma3n import transcribe

    model, tokenizer = loaded
    with pytest.raises(InputError, match="needs at least 0.033 s of audio"):
        transcribe(model, tokenizer, np.zeros(320, np.float32))


def test_a_converted_checkpoint_gets_the_permissions_of_any_new_directory(tiny, tmp_path):
    import os

    from mlx_gemma3n.convert import convert

    out = convert(tiny[0], tmp_path / "converted", show_progress=False)
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]


def under_a_file(tmp):
    (tmp / "a-file").write_text("")
    return tmp / "a-file" / "sub" / "out"


def not_empty(tmp):
    (tmp / "full").mkdir()
    (tmp / "full" / "x").write_text("")
    return tmp / "full"


@pytest.mark.parametrize(
    "make_out, message",
    [(under_a_file, "a-file is a file, so .* choose another --out."), (not_empty, "already exists and is not empty")],
    ids=["parent-is-a-file", "not-empty"],
)
def test_an_output_path_that_cannot_be_used_is_refused_before_any_work(tiny, tmp_path, monkeypatch, make_out, message):
    from mlx_gemma3n import convert as convert_module

    def no_work(model):
        raise AssertionError("the checkpoint was opened before the output path was checked")

    monkeypatch.setattr(convert_module.Checkpoint, "open", no_work)
    with pytest.raises(convert_module.ConvertError, match=message) as e:
        convert_module.convert(tiny[0], make_out(tmp_path), show_progress=False)
    assert "\n" not in str(e.value)


def test_a_read_only_destination_is_refused_before_any_work(tiny, tmp_path, monkeypatch, capsys):
    from mlx_gemma3n import convert as convert_module
    from mlx_gemma3n.cli.convert import main as convert_main

    monkeypatch.setattr(convert_module, "_writable", lambda directory: directory != tmp_path)
    assert convert_main(["--model", str(tiny[0]), "--out", str(tmp_path / "new" / "out")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path} cannot be written to (a read-only file system, or not your directory): choose another --out.\n"
    assert list(tmp_path.iterdir()) == []


def test_a_write_that_fails_midway_is_one_sentence_and_leaves_nothing(tiny, tmp_path, monkeypatch, capsys):
    import errno

    from mlx_gemma3n import convert as convert_module
    from mlx_gemma3n.cli.convert import main as convert_main

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(convert_module, "_write_file", read_only)
    assert convert_main(["--model", str(tiny[0]), "--out", str(tmp_path / "out")]) == 1
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert last == f"error: Could not write {tmp_path / 'out'} (Read-only file system); nothing was left behind: choose another --out."
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_converting_says_interrupted_and_leaves_nothing(tiny, tmp_path, monkeypatch, capsys):
    from mlx_gemma3n import convert as convert_module
    from mlx_gemma3n.cli.convert import main as convert_main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "_write_file", interrupted)
    assert convert_main(["--model", str(tiny[0]), "--out", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted"
    assert list(tmp_path.iterdir()) == []


def test_running_the_package_lists_its_commands():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mlx_gemma3n"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("mlx_gemma3n ")
    for command in ("chat", "generate", "transcribe", "convert"):
        assert f"python -m mlx_gemma3n.{command} " in out.stdout
    assert "mlx-gemma3n-chat" in out.stdout


def load_from_hub(endpoint: str, tmp_path) -> str:
    """What loading a repo id prints, in a fresh process whose Hub is `endpoint`."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_ETAG_TIMEOUT="2")
    env.pop("HF_HUB_OFFLINE", None)
    script = (
        "import mlx_gemma3n\n"
        "try:\n    mlx_gemma3n.load('google/gemma-3n-E2B-it')\n"
        "except mlx_gemma3n.errors.CheckpointError as e:\n    print(e)\n"
    )
    # The timeout bounds the test: before, an unresponsive Hub hung the load for good.
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    return out.stdout


def test_a_hub_that_never_answers_is_one_sentence_after_the_timeout(tmp_path):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:  # accepts (the kernel's backlog), never answers
        port = server.getsockname()[1]
        printed = load_from_hub(f"http://127.0.0.1:{port}", tmp_path)
    assert printed == (
        f"The Hugging Face Hub at http://127.0.0.1:{port} did not answer within 2 s: "
        "check your connection, or pass a local directory.\n"
    )


def test_a_hub_that_refuses_the_connection_is_one_sentence(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        printed = load_from_hub(f"http://127.0.0.1:{port}", tmp_path)
    assert printed == (
        f"The Hugging Face Hub at http://127.0.0.1:{port} cannot be reached (it refused the connection): "
        "check your connection, or pass a local directory.\n"
    )

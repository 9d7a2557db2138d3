"""The commands as a person meets them: help without warnings, flags checked before anything
loads, one sentence (never a traceback) for every error of ours, the library's functions
unharmed by the commands' modules."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = ["generate", "chat", "transcribe", "convert", "matformer", "server"]


def run(*args: str, timeout: float = 300, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, input=stdin)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_prints_no_warning(name):
    done = run("-W", "always", "-m", f"mlx_gemma3n.{name}", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    assert "usage: python -m mlx_gemma3n." + name in done.stdout


def test_help_shows_the_defaults():
    done = run("-m", "mlx_gemma3n.generate", "--help")
    assert "(default: 512)" in done.stdout and "(default: 0.95)" in done.stdout and "(default: auto)" in done.stdout


@pytest.mark.parametrize("order", [
    "import mlx_gemma3n.generate, mlx_gemma3n.transcribe, mlx_gemma3n.chat; import mlx_gemma3n as m",
    "import mlx_gemma3n as m; import mlx_gemma3n.generate, mlx_gemma3n.transcribe, mlx_gemma3n.chat",
    "from mlx_gemma3n.generate import main; from mlx_gemma3n.transcribe import main; import mlx_gemma3n as m",
    "from mlx_gemma3n.cli import generate, transcribe, chat; import mlx_gemma3n as m",
])
def test_the_public_functions_stay_functions_in_every_import_order(order):
    code = order + "; import types; print(all(isinstance(f, types.FunctionType) for f in (m.generate, m.transcribe)))"
    done = run("-c", code)
    assert done.stdout.strip() == "True", done.stderr


@pytest.mark.parametrize("flags, word", [
    (["--temp", "nan"], "temperature"),
    (["--temp", "-1"], "temperature"),
    (["--repetition-penalty", "0"], "repetition_penalty"),
    (["--top-p", "1.5"], "top_p"),
    (["--max-tokens", "0"], "--max-tokens"),
])
def test_bad_sampling_flags_are_refused_before_the_model_loads(flags, word):
    # The model does not exist: a refusal that names the flag was made before loading was tried.
    done = run("-m", "mlx_gemma3n.generate", "--model", "/nonexistent/model", "--prompt", "hi", *flags)
    assert done.returncode == 1
    assert word in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


def test_transcribe_refuses_an_unwritable_output_before_any_work(tmp_path):
    done = run("-m", "mlx_gemma3n.transcribe", "--model", "/nonexistent/model", "talk.wav",
               "-o", str(tmp_path / "missing" / "talk.srt"))
    assert done.returncode == 1 and "does not exist" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("args", [
    ["-m", "mlx_gemma3n.generate", "--model", "/nonexistent/model", "--prompt", "hi"],
    ["-m", "mlx_gemma3n.chat", "--model", "/nonexistent/model"],
    ["-m", "mlx_gemma3n.transcribe", "--model", "/nonexistent/model", "/nonexistent/talk.wav"],
    ["-m", "mlx_gemma3n.convert", "--model", "/nonexistent/model", "--out", "/tmp/never-written"],
])
def test_errors_of_ours_are_one_sentence_not_a_traceback(args):
    done = run(*args)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: "), done.stderr


def test_generate_reports_a_broken_attachment_in_one_sentence(tiny, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    done = run("-m", "mlx_gemma3n.generate", "--model", str(tiny[0]), "--prompt", "hi", "--image", str(broken))
    assert done.returncode == 1 and "Traceback" not in done.stderr and done.stderr.startswith("error: ")

"""Tokenizer, chat template, generation options, chat sessions and the command-line entry points."""

import json
import os
import shutil
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pexpect
import soundfile
import pytest

from mlx_gemma3n import load
from mlx_gemma3n.config import load_config
from mlx_gemma3n import ChatSession
from mlx_gemma3n.runtime.generation import PromptTooLong, SamplingOptions, stream_generate, stream_tokens
from mlx_gemma3n.processing.prompt import encode


@pytest.fixture(scope="module")
def loaded(tiny):
    return load(tiny[0], dtype=mx.float32)


def test_chat_template_makes_gemma_turns(loaded):
    model, tokenizer = loaded
    tokens = encode(tokenizer, model.config, [{"role": "user", "content": "hello world"}])
    assert tokenizer.decode(tokens) == "<bos><start_of_turn>user\nhello world<end_of_turn>\n<start_of_turn>model\n"
    assert tokens[:2] == [2, 105]


def test_both_end_of_turn_and_eos_stop_generation(loaded):
    _, tokenizer = loaded
    assert {1, 106} <= set(tokenizer.eos_token_ids)


def test_generation_stops_at_the_first_eos_id(loaded):
    model, tokenizer = loaded
    free = [r.token for r in stream_generate(model, tokenizer, "hello", max_tokens=10, temperature=0.0)]
    stop_at = free.index(free[5])  # make a token the model will emit an end-of-sequence id
    saved = tokenizer.eos_token_ids
    tokenizer.eos_token_ids = {free[5]}
    try:
        responses = list(stream_generate(model, tokenizer, "hello", max_tokens=10, temperature=0.0))
    finally:
        tokenizer.eos_token_ids = saved
    assert [r.token for r in responses] == free[: stop_at + 1]
    assert responses[-1].finish_reason == "stop" and responses[-1].text == ""


def test_a_reply_ends_at_max_tokens_with_its_reason(loaded):
    model, tokenizer = loaded
    responses = list(stream_tokens(model, tokenizer, tokenizer.encode("hello world"), max_tokens=5,
                                   sampling=SamplingOptions(temperature=0.0)))
    assert [r.generation_tokens for r in responses] == [1, 2, 3, 4, 5]
    assert [r.finish_reason for r in responses] == [None] * 4 + ["length"]
    assert "".join(r.text for r in responses) == tokenizer.decode([r.token for r in responses])


class _CountingDecodes:
    """A model whose decode steps are counted."""

    def __init__(self, model):
        self.model, self.decodes = model, 0

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def decode(self, *args, **kwargs):
        self.decodes += 1
        return self.model.decode(*args, **kwargs)


def test_the_first_token_comes_before_the_next_step_is_built_and_the_last_one_is_cached(loaded):
    from mlx_gemma3n.runtime.generation import _steps

    model, tokenizer = loaded
    prompt, counted, cache = tokenizer.encode("hello world"), _CountingDecodes(model), model.make_cache()
    steps = _steps(counted, prompt, cache, SamplingOptions(temperature=0.0), 4, None, None, None)
    first = next(item for item in steps if isinstance(item, int))
    assert counted.decodes == 0  # the first token's latency is the prompt's alone
    tokens = [first, *steps]
    assert counted.decodes == 4  # one step per token, the last one's writing its keys and values
    assert cache[0].offset == len(prompt) + 4
    plain = stream_tokens(model, tokenizer, prompt, max_tokens=4, sampling=SamplingOptions(temperature=0.0))
    assert tokens == [r.token for r in plain]


@pytest.mark.parametrize("prompt, max_tokens, message", [([], 5, "prompt is empty"), ([5, 6], 0, "at least 1")])
def test_an_empty_prompt_or_no_tokens_to_generate_is_a_clear_error(loaded, prompt, max_tokens, message):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match=message):
        list(stream_tokens(model, tokenizer, prompt, max_tokens=max_tokens))


def test_same_seed_same_sample(loaded):
    model, tokenizer = loaded
    a = [r.token for r in stream_generate(model, tokenizer, "the cat", max_tokens=12, seed=7)]
    b = [r.token for r in stream_generate(model, tokenizer, "the cat", max_tokens=12, seed=7)]
    assert a == b


def test_prompt_over_the_context_is_a_clear_error(loaded):
    model, tokenizer = loaded
    long = " ".join(["hello"] * (model.config.text.max_position_embeddings + 10))
    with pytest.raises(PromptTooLong, match="context is 4096"):
        list(stream_generate(model, tokenizer, long, max_tokens=5))


def test_chat_session_prefills_only_the_new_turn_and_matches_a_fresh_prefill(loaded):
    model, tokenizer = loaded
    greedy = SamplingOptions(temperature=0.0)
    session = ChatSession(model, tokenizer, sampling=greedy)
    list(session.send("hello world", max_tokens=6))
    history = len(session.conversation)
    second = [r.token for r in session.send("what is the cat", max_tokens=6)]
    assert session.last_prefill == len(session.last_prompt) - history  # only the new turn went through the model
    assert session.last_prompt[:history] == session.conversation[:history]

    fresh = [r.token for r in stream_tokens(model, tokenizer, session.last_prompt, max_tokens=6, sampling=greedy)]
    assert second == fresh


def test_chat_session_reset_forgets(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, sampling=SamplingOptions(temperature=0.0))
    list(session.send("hello", max_tokens=3))
    session.reset()
    assert session.messages == [] and session.cached_tokens == [] and session.cache[0].offset == 0


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1")


def test_generate_entry_point_prints_a_reply(tiny):
    out = subprocess.run(
        [sys.executable, "-m", "mlx_gemma3n.generate", "--model", str(tiny[0]), "--prompt", "hello",
         "--max-tokens", "8", "--temp", "0", "--verbose", "--dtype", "float32"],
        capture_output=True, text=True, env=_env(), timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "generation: " in out.stderr and "tokens/s" in out.stderr


def test_generate_entry_point_names_a_missing_checkpoint(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mlx_gemma3n.generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"],
        capture_output=True, text=True, env=_env(), timeout=120,
    )
    assert out.returncode == 1
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_generate_entry_point_attaches_an_image_and_names_a_bad_one(tiny, tmp_path, capsys):
    from PIL import Image

    from mlx_gemma3n.cli.generate import main

    Image.new("RGB", (64, 48), (200, 30, 90)).save(tmp_path / "red.png")
    (tmp_path / "notes.txt").write_text("not a picture")
    common = ["--model", str(tiny[0]), "--prompt", "what is this", "--max-tokens", "3", "--temp", "0",
              "--dtype", "float32", "--verbose", "--release-towers"]

    def prompt_tokens() -> int:
        return int(capsys.readouterr().err.split("prompt: ")[1].split()[0])

    assert main(common) == 0
    text_only = prompt_tokens()
    assert main(common + ["--image", str(tmp_path / "red.png")]) == 0
    assert prompt_tokens() - text_only > load_config(tiny[0]).vision_soft_tokens_per_image  # the image is in
    assert main(common + ["--image", str(tmp_path / "notes.txt")]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "notes.txt" in err and "Traceback" not in err


def test_generate_entry_point_replies_alike_with_the_table_resident(tiny, capsys):
    from mlx_gemma3n.cli.generate import main

    common = ["--model", str(tiny[0]), "--prompt", "hello there", "--max-tokens", "6", "--temp", "0"]
    assert main(common) == 0
    lazy = capsys.readouterr().out
    assert main(common + ["--resident-ple"]) == 0
    assert capsys.readouterr().out == lazy and lazy.strip()


@pytest.fixture(scope="module")
def chatty(tiny, tmp_path_factory):
    """The tiny checkpoint with <pad> as its only end-of-sequence id: its replies run on until
    stopped, so that Ctrl-C always lands inside one."""
    path = tmp_path_factory.mktemp("chatty") / "model"
    shutil.copytree(tiny[0], path)
    for name, key in (("config.json", "eos_token_id"), ("generation_config.json", "eos_token_id")):
        config = json.loads((path / name).read_text())
        config[key] = 0
        if name == "config.json":
            config["text_config"][key] = 0
        (path / name).write_text(json.dumps(config))
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config["eos_token"] = "<pad>"
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


def test_chat_cli_end_to_end_under_a_terminal(chatty, tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture")
    child = pexpect.spawn(
        sys.executable, ["-m", "mlx_gemma3n.chat", "--model", str(chatty), "--temp", "0", "--dtype", "float32"],
        env=_env(), encoding="utf-8", timeout=120,
    )
    try:
        child.expect("/help for commands")
        child.expect(">> ")
        child.sendline("/help")
        child.expect("/reset")
        child.expect(">> ")
        child.sendline("/speed")
        child.expect(r"\[speed shown\]")
        child.expect(">> ")
        for message in ("hello world", "what is the cat"):  # Ctrl-C ends the reply, not the session
            child.sendline(message)
            time.sleep(2)
            child.sendintr()
            child.expect(r"\[stopped\]")
            child.expect(r"reply \d+ tokens at [\d.]+ tok/s")
            child.expect(">> ")
        child.sendline(f"/image {tmp_path / 'notes.txt'}")  # a bad attachment: one line, the session goes on
        child.expect(r"error: .*not an image")
        child.expect(">> ")
        child.sendline("/reset")
        child.expect(r"\[conversation cleared\]")
        child.expect(">> ")
        child.sendline("/nonsense")
        child.expect("Unknown command /nonsense")
        child.expect(">> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_cli_replies_to_an_image_and_audio(tiny, tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    soundfile.write(tmp_path / "tone.wav", 0.3 * np.sin(np.arange(16_000) / 5).astype(np.float32), 16_000)
    child = pexpect.spawn(
        sys.executable, ["-m", "mlx_gemma3n.chat", "--model", str(tiny[0]), "--temp", "0", "--dtype", "float32",
                         "--max-tokens", "3", "--speed"],
        env=_env(), encoding="utf-8", timeout=240,
    )
    try:
        child.expect(">> ")
        child.sendline(f"/image {tmp_path / 'red.png'}")
        child.expect(r"\[attached image")
        child.expect(">> ")
        child.sendline(f"/audio {tmp_path / 'tone.wav'}")
        child.expect(r"\[attached audio")
        child.expect(">> ")
        child.sendline("what do you see and hear")
        child.expect(r"\[prompt (\d+) tokens at .* reply \d+ tokens")
        assert int(child.match.group(1)) > 256 + 188  # the image's and the clip's soft tokens were in the prompt
        child.expect(">> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0

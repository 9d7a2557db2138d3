"""The OpenAI-compatible server, spoken to with the official `openai` client over loopback: its
replies equal the library's, its errors are OpenAI-shaped 4xx answers after which it keeps serving."""

import base64
import http.client
import io
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import mlx.core as mx
import numpy as np
import pytest
import soundfile

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from mlx_gemma3n import SamplingOptions, Transcript, generate, load, transcribe  # noqa: E402
from mlx_gemma3n.server import ServerSettings, create_app  # noqa: E402
from mlx_gemma3n.server.replies import StopText  # noqa: E402
from mlx_gemma3n.server.shapes import to_vtt, verbose_json  # noqa: E402
from mlx_gemma3n.transcription import Segment  # noqa: E402
from samples import speech_like  # noqa: E402

MODEL_ID = "tiny-gemma3n"
KEY = "sk-local-test"
GREEDY = SamplingOptions(temperature=0.0)


@pytest.fixture(scope="module")
def loaded(tiny):
    return load(tiny[0], dtype=mx.float32)


@contextmanager
def serving(loaded, **settings):
    """The app on a free loopback port, in this process (so that tests can read its state)."""
    model, tokenizer = loaded
    app = create_app(model, tokenizer, ServerSettings(model_id=MODEL_ID, **settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(loaded):
    with serving(loaded, api_key=KEY, max_tokens=64, max_body_bytes=2_000_000, max_tokens_per_clip=6) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def library_reply(loaded, messages, max_tokens, **media) -> str:
    model, tokenizer = loaded
    return generate(model, tokenizer, messages, max_tokens=max_tokens, sampling=GREEDY, **media)




def wav_bytes(samples: np.ndarray) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, 16_000, format="WAV", subtype="FLOAT")
    return out.getvalue()


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL_ID]


def test_chat_equals_the_library_greedy_reply_with_usage(client, loaded):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]
    reply = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=7, temperature=0)
    assert reply.choices[0].message.content == library_reply(loaded, messages, 7)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 7 and reply.model == MODEL_ID
    assert reply.usage.prompt_tokens == reply.usage.total_tokens - 7 > 5


def test_streamed_chat_equals_the_library_reply_and_ends_with_usage(client, loaded):
    messages = [{"role": "user", "content": "the cat sat"}]
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=messages, max_completion_tokens=6,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == library_reply(loaded, messages, 6)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_a_resent_history_prefills_only_the_new_turn_and_equals_the_library(client, loaded):
    first = [{"role": "user", "content": "what is the cat"}]
    answer = client.chat.completions.create(model=MODEL_ID, messages=first, max_tokens=5, temperature=0)
    assert answer.choices[0].message.content == library_reply(loaded, first, 5)
    second = first + [{"role": "assistant", "content": answer.choices[0].message.content},
                      {"role": "user", "content": "and the mat"}]
    reply = client.chat.completions.create(model=MODEL_ID, messages=second, max_tokens=5, temperature=0)
    assert reply.usage.prompt_tokens_details.cached_tokens >= answer.usage.prompt_tokens
    assert reply.choices[0].message.content == library_reply(loaded, second, 5)


def test_stop_strings_cut_the_reply(client, loaded):
    messages = [{"role": "user", "content": "hello"}]
    full = library_reply(loaded, messages, 8)
    pieces = re.findall(r"<unused\d+>", full)
    assert len(pieces) >= 4, full  # the tiny model answers with unused tokens
    reply = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, temperature=0,
                                           stop=[pieces[2]])
    assert reply.choices[0].message.content == full[: full.index(pieces[2])]
    assert reply.choices[0].finish_reason == "stop"


def gradient_png() -> bytes:
    from PIL import Image

    y, x = np.mgrid[0:120, 0:160]
    image = Image.fromarray(np.stack([x * 255 // 160, y * 255 // 120, (x + y) % 255], -1).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_an_image_chat_equals_the_library_reply(client, loaded):
    png = gradient_png()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "what is this image"}]}]
    reply = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=4, temperature=0)
    expected = library_reply(loaded, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this image"}]}],
                             4, images=[png])
    assert reply.choices[0].message.content == expected


def test_an_audio_chat_equals_the_library_reply(client, loaded):
    wav = wav_bytes(speech_like(1.5, 0))
    messages = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
        {"type": "text", "text": "what is this audio"}]}]
    reply = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=4, temperature=0)
    expected = library_reply(loaded, [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "what is this audio"}]}],
                             4, audio=[wav])
    assert reply.choices[0].message.content == expected


def test_transcriptions_in_json_and_srt_equal_transcribe(client, loaded, tmp_path):
    model, tokenizer = loaded
    path = tmp_path / "talk.wav"
    path.write_bytes(wav_bytes(speech_like(2.0, 1)))
    expected = transcribe(model, tokenizer, path, language="English", max_tokens_per_clip=6)
    assert expected.text
    with open(path, "rb") as f:
        result = client.audio.transcriptions.create(file=f, model=MODEL_ID, language="en")
    with open(path, "rb") as f:
        srt = client.audio.transcriptions.create(file=f, model=MODEL_ID, language="en", response_format="srt")
    assert result.text == expected.text
    assert srt == expected.to_srt()


def test_a_transcription_prompt_is_asked_as_transcribe_asks_it(client, loaded, tmp_path):
    model, tokenizer = loaded
    path = tmp_path / "talk.wav"
    path.write_bytes(wav_bytes(speech_like(2.0, 1)))
    expected = transcribe(model, tokenizer, path, prompt="Okonjo-Iweala", max_tokens_per_clip=6)
    assert expected.text != transcribe(model, tokenizer, path, max_tokens_per_clip=6).text  # the prompt tells
    with open(path, "rb") as f:
        result = client.audio.transcriptions.create(file=f, model=MODEL_ID, prompt="Okonjo-Iweala")
    assert result.text == expected.text


def test_vtt_and_verbose_json_carry_the_segments():
    transcript = Transcript("hi there", [Segment(0.0, 29.5, "hi", 0), Segment(29.0, 31.25, "", 1),
                                         Segment(31.0, 61.0, "there", 2)], 61.0, "English")
    assert to_vtt(transcript) == "WEBVTT\n\n00:00:00.000 --> 00:00:29.500\nhi\n\n00:00:31.000 --> 00:01:01.000\nthere\n\n"
    body = verbose_json(transcript, "transcribe")
    assert body["duration"] == 61.0 and body["language"] == "English" and body["text"] == "hi there"
    assert body["segments"] == [{"id": 0, "start": 0.0, "end": 29.5, "text": "hi"},
                                {"id": 1, "start": 31.0, "end": 61.0, "text": "there"}]


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 400, "temperature"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', 400, "max_tokens"),
    (b'{"model": "m", "messages": []}', 400, "messages"),
    (b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
     b'{"url": "data:image/png;base64,aGVsbG8="}}]}]}', 400, "messages[0].content[0].image_url"),
    (b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": '
     b'{"data": "aGVsbG8=", "format": "wav"}}]}]}', 400, "messages[0].content[0].input_audio"),
    (b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
     b'{"url": "file:///etc/hostname"}}]}]}', 400, "messages[0].content[0].image_url.url"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "' + b"hello " * 5000 + b'"}]}', 400, "messages"),
], ids=["bad-json", "wrong-type", "too-many-tokens", "no-messages", "bad-image", "bad-audio", "file-not-allowed",
        "context-overflow"])
def test_bad_requests_are_openai_errors_and_the_server_keeps_serving(server, client, body, status, param):
    code, answer = post(server[1] + "/v1/chat/completions", body)
    assert code == status, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"].endswith(".") and "\n" not in error["message"]
    assert [m.id for m in client.models.list()] == [MODEL_ID]


def test_a_body_over_the_cap_is_refused_before_it_is_read(server, client):
    connection = http.client.HTTPConnection(server[1].removeprefix("http://"), timeout=60)
    connection.putrequest("POST", "/v1/chat/completions")
    for name, value in {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                        "Content-Length": "3000000"}.items():
        connection.putheader(name, value)
    connection.endheaders(b'{"model": "m", "messages": [')
    response = connection.getresponse()
    assert response.status == 413
    assert "larger than this server's limit" in json.loads(response.read())["error"]["message"]
    connection.close()
    assert [m.id for m in client.models.list()] == [MODEL_ID]


def test_four_concurrent_streams_are_all_correct(client, loaded):
    prompts = ["hello", "the cat", "what is the mat", "world"]

    def stream(prompt):
        chunks = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=5, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks)

    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(stream, prompts))
    assert replies == [library_reply(loaded, [{"role": "user", "content": p}], 5) for p in prompts]


def test_a_client_leaving_mid_stream_stops_its_generation_within_a_token(server):
    app, url = server
    stats = app.state.worker.stats
    cancelled = stats.cancelled
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 64, "stream": True}
    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                       {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = connection.getresponse()
    events = 0
    while events < 3:  # the role, then two pieces of text
        events += response.readline().startswith(b"data: ")
    connection.sock.shutdown(2)
    connection.close()
    deadline = time.monotonic() + 30
    while stats.cancelled == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats.cancelled == cancelled + 1
    assert stats.items_after_cancel <= 1
    assert stats.last_cancelled_items < 64


def test_a_client_leaving_before_a_whole_reply_stops_its_generation(server):
    app, url = server
    stats = app.state.worker.stats
    cancelled = stats.cancelled
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 64}
    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                       {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    connection.sock.shutdown(2)  # gone before any of the reply
    connection.close()
    deadline = time.monotonic() + 30
    while stats.cancelled == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats.cancelled == cancelled + 1
    assert stats.last_cancelled_items < 64


def test_an_api_key_is_required_when_set(server):
    stranger = openai.OpenAI(base_url=server[1] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        stranger.models.list()
    assert e.value.body["code"] == "invalid_api_key"
    with urllib.request.urlopen(server[1] + "/health", timeout=10) as health:
        assert json.loads(health.read())["status"] == "ok"


def test_the_command_listens_on_loopback_only_by_default(tiny):
    process = subprocess.Popen([sys.executable, "-m", "mlx_gemma3n.server", "--model", str(tiny[0]), "--port", "0"],
                               stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:
            found = re.search(r"running on http://([\d.]+):(\d+)", line)
            if found:
                break
        assert found, "the server did not say where it listens"
        host, port = found.groups()
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as response:
            assert json.loads(response.read())["data"][0]["id"] == tiny[0].name
        if sys.platform != "linux":
            return
        listening = [line.split()[1] for line in open("/proc/net/tcp").readlines()[1:] if line.split()[3] == "0A"]
        assert f"0100007F:{int(port):04X}" in listening  # bound to 127.0.0.1, not to every address
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_stop_text_holds_back_only_what_may_begin_a_stop_string():
    stop = StopText(["END"])
    assert stop.feed("abc E") == "abc " and stop.feed("x") == "Ex"
    assert stop.feed("yEN") == "y" and stop.feed("D and more") == "" and stop.stopped


def test_matformer_sizes_are_listed_and_chosen_by_the_model_field():
    from mlx_gemma3n.server.app import ServerSettings, model_ids, requested_size
    from mlx_gemma3n.server.errors import RequestError

    settings = ServerSettings(model_id="gemma-3n-E4B-it", sizes=("E4B", "E2B", "E2.54B"), submodel="E4B")
    assert model_ids(settings) == ["gemma-3n-E4B-it", "gemma-3n-E4B-it:E4B", "gemma-3n-E4B-it:E2B",
                                   "gemma-3n-E4B-it:E2.54B"]
    assert requested_size(settings, "gemma-3n-E4B-it:e2b") == "E2B"
    assert requested_size(settings, "E2.54B") == "E2.54B"
    assert requested_size(settings, "gemma-3n-E4B-it") == "E4B"  # the default size
    assert requested_size(settings, "gpt-4o") == "E4B"  # clients send whatever they were set up with
    with pytest.raises(RequestError, match="not served here"):
        requested_size(settings, "gemma-3n-E4B-it:E9B")

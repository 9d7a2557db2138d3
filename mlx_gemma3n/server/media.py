"""Attachments of OpenAI chat messages decoded before a request waits for the model, so that an
undecodable image or recording is a 400 at once: `image_url` parts (data: URLs; http(s) URLs and
local files only when the server allows them) and base64 `input_audio` parts."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from ..errors import InputError
from ..processing.audio import MAX_SAMPLES, as_samples
from ..processing.image import load_image
from .errors import RequestError

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")


@dataclass
class MediaPolicy:
    allow_http: bool = False  # the server fetches http(s) image URLs
    allow_files: bool = False  # the server reads file:// URLs and paths on its own disk


@dataclass
class Conversation:
    """Messages as the library takes them, with the attachments in the order their placeholders appear."""

    messages: list[dict]
    images: list = field(default_factory=list)
    audio: list = field(default_factory=list)


def _base64(data: str, param: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{param} is not valid base64: encode the file's bytes with base64.", param=param) from None


def _image_source(url: str, policy: MediaPolicy, param: str):
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise RequestError(f"{param} must be a base64 data: URL (data:image/png;base64,...).", param=param)
        return _base64(data, param)
    if scheme in ("http", "https"):
        if not policy.allow_http:
            raise RequestError(f"{param}: this server does not fetch URLs; send the image as a data: URL "
                               "or start the server with --allow-http-media.", param=param)
        return url
    if not policy.allow_files:
        raise RequestError(f"{param}: this server does not read local files; send the image as a data: URL "
                           "or start the server with --allow-local-files.", param=param)
    return url.removeprefix("file://")


def _image(part: dict, policy: MediaPolicy, param: str):
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise RequestError(f"{param}.image_url.url must be a string.", param=f"{param}.image_url")
    try:
        return load_image(_image_source(url, policy, f"{param}.image_url.url"))
    except RequestError:
        raise
    except InputError as e:
        raise RequestError(f"{param}: {e}", param=f"{param}.image_url", code="invalid_image") from None


def _audio_clips(part: dict, param: str) -> list:
    """The recording as 16 kHz clips of at most 30 s: one placeholder each, as the library attaches long audio."""
    spec = part.get("input_audio")
    if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
        raise RequestError(f"{param}.input_audio must be an object with base64 'data' and a 'format'.",
                           param=f"{param}.input_audio")
    if spec.get("format", "wav") not in AUDIO_FORMATS:
        raise RequestError(f"{param}.input_audio.format must be one of {', '.join(AUDIO_FORMATS)}.",
                           param=f"{param}.input_audio.format")
    try:
        samples = as_samples(_base64(spec["data"], f"{param}.input_audio.data"))
    except RequestError:
        raise
    except InputError as e:
        raise RequestError(f"{param}: {e}", param=f"{param}.input_audio", code="invalid_audio") from None
    return [samples[i : i + MAX_SAMPLES] for i in range(0, len(samples), MAX_SAMPLES)]


def decode_conversation(messages: list[dict], policy: MediaPolicy) -> Conversation:
    """Checked OpenAI messages (see `parsing`) as library messages plus decoded attachments."""
    out = Conversation([])
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        role = "system" if role == "developer" else role
        if isinstance(content, str):
            out.messages.append({"role": role, "content": content})
            continue
        parts = []
        for j, part in enumerate(content):
            param = f"messages[{i}].content[{j}]"
            if part["type"] == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif part["type"] == "image_url":
                out.images.append(_image(part, policy, param))
                parts.append({"type": "image"})
            else:
                clips = _audio_clips(part, param)
                out.audio += clips
                parts += [{"type": "audio"}] * len(clips)
        out.messages.append({"role": role, "content": parts})
    return out

"""The JSON (and text) shapes of OpenAI's API that the server answers with."""

from __future__ import annotations

import json
import time
import uuid

from .. import Transcript


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def completion(id: str, model: str, text: str, finish_reason: str, usage: dict) -> dict:
    return {
        "id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage,
    }


def chunk(id: str, model: str, delta: dict, finish_reason: str | None = None, usage: dict | None = None,
          with_choice: bool = True) -> str:
    """One server-sent event of a streamed completion."""
    body = {"id": id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
            if with_choice else [],
            "usage": usage}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


def model_card(id: str, created: int) -> dict:
    return {"id": id, "object": "model", "created": created, "owned_by": "mlx_gemma3n"}


def _stamp(seconds: float, comma: bool) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{',' if comma else '.'}{ms % 1000:03d}"


def to_vtt(transcript: Transcript) -> str:
    blocks = [s for s in transcript.segments if s.text]
    return "WEBVTT\n\n" + "".join(f"{_stamp(s.start, False)} --> {_stamp(s.end, False)}\n{s.text}\n\n" for s in blocks)


def verbose_json(transcript: Transcript, task: str) -> dict:
    segments = [s for s in transcript.segments if s.text]
    return {
        "task": task, "language": transcript.language, "duration": transcript.duration, "text": transcript.text,
        "segments": [{"id": i, "start": s.start, "end": s.end, "text": s.text} for i, s in enumerate(segments)],
    }

"""Prompts: chat messages through the checkpoint's template, then each image/audio placeholder
expanded as Gemma 3n's processor does ("\\n\\n<start_of_image>" + 256 soft tokens + "<end_of_image>\\n\\n")."""

from __future__ import annotations

from ..errors import InputError
from ..config import ModelConfig


def user_content(text: str, images: int = 0, audio: int = 0) -> str | list[dict]:
    """A user message's content: attachments first, then the text (the order the published examples use)."""
    if not images and not audio:
        return text
    return [{"type": "image"}] * images + [{"type": "audio"}] * audio + [{"type": "text", "text": text}]


def expand_media(text: str, tokenizer, config: ModelConfig) -> str:
    """Replace every image/audio placeholder with its begin marker, soft tokens and end marker."""
    name = tokenizer.convert_ids_to_tokens
    for token_id, begin, end, count in (
        (config.image_token_id, config.boi_token_id, config.eoi_token_id, config.vision_soft_tokens_per_image),
        (config.audio_token_id, config.boa_token_id, config.eoa_token_id, config.audio_soft_tokens_per_image),
    ):
        placeholder = name(token_id)
        text = text.replace(placeholder, f"\n\n{name(begin)}{placeholder * count}{name(end)}\n\n")
    return text


def encode(tokenizer, config: ModelConfig, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation, ready for the model's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("This checkpoint's tokenizer has no chat template: pass raw=True and format the prompt yourself.")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return list(tokenizer.encode(expand_media(text, tokenizer, config), add_special_tokens=False))

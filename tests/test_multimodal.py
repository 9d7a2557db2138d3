"""Image and audio prompts through the whole model equal transformers' Gemma3nForConditionalGeneration."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gemma3n.runtime.generation import SamplingOptions, stream_generate, stream_tokens
from mlx_gemma3n.runtime.media import Attachments, Media
from mlx_gemma3n.loading import load
from mlx_gemma3n.processing.audio import log_mel_batch
from mlx_gemma3n.processing.prompt import encode, user_content
from samples import speech_like

TOL = 1e-3


def worst(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.fixture(scope="module")
def loaded(tiny):
    return load(tiny[0], dtype=mx.float32)




def test_audio_prompt_logits_equal_reference_including_a_padded_batch(tiny, loaded):
    """Two clips of different lengths in one prompt: the shorter is padded inside the batch, and
    both yield fewer soft tokens than the prompt reserves (filled as the reference fills them)."""
    _, reference = tiny
    model, tokenizer = loaded
    clips = [speech_like(2.3, 0), speech_like(4.1, 1)]
    tokens = encode(tokenizer, model.config, [{"role": "user", "content": user_content("what is this", audio=2)}])
    features, valid = log_mel_batch(clips)
    with torch.no_grad():
        expected = reference(
            input_ids=torch.tensor([tokens]), input_features=torch.tensor(features),
            input_features_mask=torch.tensor(valid),
        ).logits.numpy()
    media = Media()
    list(media.add(model, Attachments.prepare(audio=clips)))
    logits = np.array(model(mx.array([tokens]), input_embeddings=media.embeddings(model, tokens, 0)[None]))
    assert tokens.count(model.config.audio_token_id) == 2 * model.config.audio_soft_tokens_per_image
    assert worst(logits, expected) <= TOL, f"worst |Δlogit| {worst(logits, expected):.2e}"


def test_audio_prompt_generation_runs_with_cache(loaded):
    model, tokenizer = loaded
    replies = [r.token for r in stream_generate(model, tokenizer, "what is this", audio=[speech_like(1.0, 2)],
                                                max_tokens=5, temperature=0.0)]
    assert len(replies) == 5


def test_long_audio_becomes_several_clips_not_a_cut_one(loaded):
    model, tokenizer = loaded
    from mlx_gemma3n.runtime.generation import prepare_audio

    clips = prepare_audio([speech_like(65.0, 3)])
    assert [len(c) for c in clips] == [480_000, 480_000, 80_000]


def test_wrong_number_of_attachments_is_a_clear_error(loaded):
    model, tokenizer = loaded
    tokens = encode(tokenizer, model.config, [{"role": "user", "content": user_content("hi", audio=1)}])
    with pytest.raises(ValueError, match="more attachment placeholders than attachments"):
        Media().embeddings(model, tokens, 0)


def gradient_image(seed: int):
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:300, 0:420]
    rgb = np.stack([x * 255 // 420, y * 255 // 300, (x + y) * rng.uniform(0.1, 0.5) % 255], -1).astype(np.uint8)
    image = Image.fromarray(rgb)
    ImageDraw.Draw(image).text((20, 20), "Gemma 3n", fill=(255, 255, 255))
    return image


def test_image_prompt_logits_equal_reference(tiny, loaded):
    """The image's soft tokens land at its placeholders before the per-layer inputs are computed."""
    from mlx_gemma3n.processing.image import preprocess_images

    _, reference = tiny
    model, tokenizer = loaded
    image = gradient_image(0)
    tokens = encode(tokenizer, model.config, [{"role": "user", "content": user_content("what is this", images=1)}])
    pixels = preprocess_images([image])
    with torch.no_grad():
        expected = reference(
            input_ids=torch.tensor([tokens]), pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)
        ).logits.numpy()
    media = Media()
    list(media.add(model, Attachments.prepare(images=[image])))
    logits = np.array(model(mx.array([tokens]), input_embeddings=media.embeddings(model, tokens, 0)[None]))
    assert tokens.count(model.config.image_token_id) == model.config.vision_soft_tokens_per_image
    assert worst(logits, expected) <= TOL, f"worst |Δlogit| {worst(logits, expected):.2e}"


def test_image_chat_turn_then_text_turn_reuses_the_cache(loaded):
    from mlx_gemma3n import ChatSession

    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, sampling=SamplingOptions(temperature=0.0))
    first = [r.token for r in session.send("describe", images=[gradient_image(1)], max_tokens=4)]
    history = len(session.conversation)
    second = [r.token for r in session.send("and the colours?", max_tokens=4)]
    assert len(first) == 4 and len(second) == 4
    assert session.last_prefill == len(session.last_prompt) - history
    fresh = [r.token for r in stream_tokens(model, tokenizer, session.last_prompt, max_tokens=4,
                                            sampling=SamplingOptions(temperature=0.0),
                                            input_embeddings=session.media.embeddings(model, session.last_prompt, 0))]
    assert second == fresh


def test_towers_released_after_use_give_their_memory_back_and_the_same_reply(tiny, loaded):
    from mlx.utils import tree_flatten

    kept, tokenizer = loaded
    released, _ = load(tiny[0], dtype=mx.float32, keep_towers=False)

    def reply(model):
        return [r.token for r in stream_generate(model, tokenizer, "what is this", images=[gradient_image(2)],
                                                 audio=[speech_like(1.0, 4)], max_tokens=6, temperature=0.0)]

    expected = reply(kept)
    tower_bytes = sum(v.nbytes for kind in ("vision", "audio") for _, v in tree_flatten(kept.towers.get(kind).parameters()))
    before = mx.get_active_memory()
    assert reply(released) == expected
    assert not released.towers.loaded("vision") and not released.towers.loaded("audio")
    assert mx.get_active_memory() - before < tower_bytes / 10, "the released towers' weights are still held"
    assert reply(released) == expected  # and they are read again on the next use

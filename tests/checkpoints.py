"""Tiny random Gemma 3n checkpoints in the real Hugging Face layout, written by transformers,
with a small real tokenizer that carries Gemma's special tokens and chat template."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The published Gemma 3n chat template (role "model" for the assistant; soft-token
# placeholders for attachments, which the processor expands).
GEMMA3N_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'audio' -%}{{ '<audio_soft_token>' }}"
    "{%- elif item['type'] == 'image' -%}{{ '<image_soft_token>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{ raise_exception(\"Invalid content type\") }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)

SPECIAL_TOKENS = {
    0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<start_of_turn>", 106: "<end_of_turn>",
    255999: "<start_of_image>", 256000: "<start_of_audio>", 262144: "<end_of_image>",
    262145: "<image_soft_token>", 262272: "<end_of_audio>", 262273: "<audio_soft_token>",
}
VOCAB_SIZE = 262_400


def write_tokenizer(path: Path) -> None:
    """A Gemma-like SentencePiece-style BPE (byte fallback, '▁' for spaces) over a small alphabet,
    padded with unused tokens so that the special tokens sit at their real ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = dict((tok, i) for i, tok in SPECIAL_TOKENS.items())
    pieces = [f"<0x{b:02X}>" for b in range(256)]
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()\n"
    pieces += ["▁"] + list(alphabet) + ["▁" + c for c in alphabet]
    words = ["hello", "world", "the", "cat", "sat", "on", "mat", "user", "model", "what", "is", "image", "audio"]
    merges = []
    for w in words:  # a few real merges so that words become single tokens
        token = "▁" + w[0]
        for c in w[1:]:
            merges.append((token, c))
            token += c
            pieces.append(token)
    next_id = 4
    for piece in dict.fromkeys(pieces):
        while next_id in SPECIAL_TOKENS:
            next_id += 1
        vocab[piece] = next_id
        next_id += 1
    used = set(vocab.values())
    vocab.update({f"<unused{i}>": i for i in range(VOCAB_SIZE) if i not in used})

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "chat_template": GEMMA3N_CHAT_TEMPLATE,
        "model_max_length": 32768,
    }))
    (path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0, "do_sample": True,
        "top_k": 64, "top_p": 0.95,
    }))


def tiny_text_config(**overrides) -> dict:
    """Several layers of each type, KV sharing over both types, sparse and dense FFNs of
    different widths, and a short sliding window so that prompts run well past it."""
    layer_types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                   "sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    config = dict(
        vocab_size=VOCAB_SIZE, vocab_size_per_layer_input=262_144, hidden_size=64, hidden_size_per_layer_input=8,
        intermediate_size=[96, 128, 64, 96, 160, 96, 64, 128], num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, layer_types=layer_types, sliding_window=8,
        num_kv_shared_layers=3, activation_sparsity_pattern=[0.95, 0.95, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0],
        laurel_rank=8, altup_num_inputs=4, max_position_embeddings=4096,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}},
    )
    config.update(overrides)
    return config


def tiny_config(text_overrides: dict | None = None):
    from transformers import Gemma3nAudioConfig, Gemma3nConfig, Gemma3nTextConfig, Gemma3nVisionConfig

    return Gemma3nConfig(
        text_config=Gemma3nTextConfig(**tiny_text_config(**(text_overrides or {}))),
        vision_config=Gemma3nVisionConfig(model_args={"channel_multiplier": 0.25}),
        audio_config=Gemma3nAudioConfig(
            hidden_size=32, conf_num_hidden_layers=2, conf_num_attention_heads=2, sscp_conv_channel_size=[8, 4]
        ),
        eos_token_id=[1, 106],
    )


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norm weights near but not at 1, scales away from 0), so that no
    term can be dropped or misplaced without changing the output."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        else:
            fan_in = p[0].numel() if p.ndim > 1 else 1  # inputs (x kernel) feeding one output
            p.copy_(torch.randn(p.shape, generator=g) * min(0.5, fan_in**-0.5))


def make_checkpoint(path: Path, text_overrides: dict | None = None, seed: int = 0):
    """Write a tiny random Gemma 3n (float32) with tokenizer to `path`; return the torch model."""
    from transformers import Gemma3nForConditionalGeneration

    torch.manual_seed(seed)
    model = Gemma3nForConditionalGeneration(tiny_config(text_overrides)).eval()
    randomize(model, seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path)
    return model


def write_processor_files(path: Path, image_size: dict | None = None) -> None:
    """What Gemma3nProcessor (and so mlx-vlm) reads beside the weights: the multimodal tokens
    named in tokenizer_config.json and a preprocessor_config.json."""
    from transformers import Gemma3nAudioFeatureExtractor

    tok = json.loads((path / "tokenizer_config.json").read_text())
    tok["extra_special_tokens"] = {
        "audio_token": "<audio_soft_token>", "boa_token": "<start_of_audio>", "boi_token": "<start_of_image>",
        "eoa_token": "<end_of_audio>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    (path / "tokenizer_config.json").write_text(json.dumps(tok))
    Gemma3nAudioFeatureExtractor().save_pretrained(path)
    pre = json.loads((path / "preprocessor_config.json").read_text())
    pre.update(image_processor_type="SiglipImageProcessor", processor_class="Gemma3nProcessor")
    if image_size:
        pre.update(size=image_size, do_normalize=False, do_rescale=True, rescale_factor=1 / 255)
    (path / "preprocessor_config.json").write_text(json.dumps(pre))

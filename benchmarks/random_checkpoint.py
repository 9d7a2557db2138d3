"""Write a random Gemma 3n checkpoint with the real tensor names, shapes and config of E2B or E4B,
in Hugging Face's layout (config.json + sharded bf16 safetensors + index), streamed ~64 MB piece
by piece, two pieces per core in flight (E2B: 58 s and 1.6 GB peak RSS on 2 cores, most of it the
PyTorch and transformers that give the shapes). Each piece has a random stream of its own (from the
seed, the tensor's name and the piece), so that pieces are drawn on every core at once and the same
seed always gives the same files.

    python benchmarks/random_checkpoint.py --size E2B --out /tmp/gemma3n-E2B-random

Names and shapes come from transformers' own model, instantiated on the meta device (no memory).
Values are small gaussians (norm scales near 1), enough for speed and memory measurements;
the outputs mean nothing. The tokenizer is the tests' Gemma-like one: Gemma's vocabulary size
and special tokens, few merges (the real one has more, and takes more memory).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from checkpoints import write_processor_files, write_tokenizer  # noqa: E402

SHARD_BYTES = 2 << 30
PIECE_BYTES = 64 << 20  # of float32 values drawn at a time
E2B_LAYERS = 30


def hf_config(size: str):
    """The published E2B/E4B configs (E4B is transformers' default; E2B overrides it)."""
    from transformers import Gemma3nAudioConfig, Gemma3nConfig, Gemma3nTextConfig, Gemma3nVisionConfig

    text = {}
    if size == "E2B":
        text = dict(num_hidden_layers=E2B_LAYERS, intermediate_size=[8192] * E2B_LAYERS, num_kv_shared_layers=10)
    elif size != "E4B":
        raise SystemExit(f"Unknown size {size}: E2B or E4B.")
    return Gemma3nConfig(
        text_config=Gemma3nTextConfig(**text), vision_config=Gemma3nVisionConfig(),
        audio_config=Gemma3nAudioConfig(), eos_token_id=[1, 106],
    )


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import Gemma3nForConditionalGeneration

    with torch.device("meta"):
        model = Gemma3nForConditionalGeneration(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    shapes.pop("lm_head.weight", None)  # tied to embed_tokens; not in the published files
    # Google's files also carry (unused) key/value weights for the KV-shared layers.
    text = config.text_config
    kv = text.num_key_value_heads * text.head_dim
    for i in range(text.num_hidden_layers - text.num_kv_shared_layers, text.num_hidden_layers):
        prefix = f"model.language_model.layers.{i}.self_attn."
        shapes.update({prefix + "k_proj.weight": (kv, text.hidden_size), prefix + "v_proj.weight": (kv, text.hidden_size),
                       prefix + "k_norm.weight": (text.head_dim,)})
    return shapes


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even)."""
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def random_values(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    n = int(np.prod(shape))
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        # q and k are RMS-normed and scores are not divided by sqrt(head_dim): with unit norm
        # weights random scores have std 16 and attention is a hard argmax that any rounding
        # flips. 0.35 gives std ~2, as a trained model's soft attention.
        values = 0.35 + 0.05 * rng.standard_normal(n, dtype=np.float32)
    elif "norm" in name or name.endswith(("layer_scale.gamma", "per_dim_scale", "correct_output_scale")):
        values = 1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)
    else:
        fan_in = shape[-1] if len(shape) > 1 else 1
        values = rng.standard_normal(n, dtype=np.float32) * np.float32(min(0.02, fan_in**-0.5))
    return values.reshape(shape)


def pieces(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shapes of the row blocks a tensor is drawn in, in order."""
    rows = max(1, PIECE_BYTES // max(1, int(np.prod(shape[1:])) * 4))
    if len(shape) < 2 or shape[0] <= rows:
        return [shape]
    return [(min(rows, shape[0] - r), *shape[1:]) for r in range(0, shape[0], rows)]


def piece_bytes(name: str, shape: tuple[int, ...], seed: int, index: int) -> bytes:
    rng = np.random.default_rng((seed, zlib.crc32(name.encode()), index))
    return _bf16_bits(random_values(name, shape, rng)).tobytes()


def write_checkpoint(out: Path, size: str, seed: int = 0, progress=print) -> Path:
    config = hf_config(size)
    shapes = tensor_shapes(config)
    out.mkdir(parents=True, exist_ok=True)
    shards, current, used = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if current and used + nbytes > SHARD_BYTES:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    shards.append(current)

    weight_map, start = {}, time.time()
    workers = os.cpu_count() or 1
    draw = ThreadPoolExecutor(workers)  # NumPy draws and converts without holding the GIL
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            nbytes = 2 * int(np.prod(shapes[name]))
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        head = json.dumps(header).encode()
        head += b" " * (-len(head) % 8)
        with open(out / file, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            jobs = ((name, part, k) for name in names for k, part in enumerate(pieces(shapes[name])))
            in_flight = deque()  # at most two pieces per worker held at once, written in order
            for name, part, k in jobs:
                in_flight.append(draw.submit(piece_bytes, name, part, seed, k))
                if len(in_flight) >= 2 * workers:
                    f.write(in_flight.popleft().result())
            while in_flight:
                f.write(in_flight.popleft().result())
        progress(f"  {file}: {len(names)} tensors, {offset / 1e9:.2f} GB ({time.time() - start:.0f} s)")
    draw.shutdown()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config_dict = config.to_dict()
    config_dict["architectures"] = ["Gemma3nForConditionalGeneration"]
    config_dict["dtype"] = "bfloat16"
    # Google's published files use the transformers 4.53 dialect; so do we (and peers read only it).
    text = config_dict["text_config"]
    rope = text.pop("rope_parameters")
    text.update(rope_theta=rope["full_attention"]["rope_theta"], rope_scaling=None,
                rope_local_base_freq=rope["sliding_attention"]["rope_theta"], query_pre_attn_scalar=text["head_dim"])
    (out / "config.json").write_text(json.dumps(config_dict, indent=1))
    write_tokenizer(out)
    write_processor_files(out)  # mlx-vlm's converter reads them, as it would from a published checkpoint
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="E2B", choices=["E2B", "E4B"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.out / "config.json").exists():
        print(f"{args.out} already holds a checkpoint; leaving it.")
        return 0
    print(f"Writing a random {args.size} checkpoint to {args.out}")
    write_checkpoint(args.out, args.size, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

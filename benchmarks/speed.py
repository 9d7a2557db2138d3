"""Speed of our Gemma 3n beside mlx-lm's and mlx-vlm's on the same checkpoint and prompt ids:
decode tok/s, prefill tok/s, time to first token, peak memory (MLX's and the process's RSS), each
the median of several processes with the min-max spread; and the graph primitives one decoded
token evaluates.

    python benchmarks/random_checkpoint.py --size E2B --out /tmp/gemma3n-E2B-random
    python benchmarks/speed.py --model /tmp/gemma3n-E2B-random --warmup
    python benchmarks/speed.py --model /tmp/gemma3n-E2B-random --primitives   # also an E2B-shaped 4-bit model
    python benchmarks/speed.py --model E2B-vlm-4bit --model-for mlx-lm=E2B-lm-4bit   # each peer's 4-bit conversion

Ours runs as a program uses it (`load()`, `stream_tokens` through the engine and our loop;
`mlx_gemma3n@STEP` sets the prefill step, `before` runs an older checkout given by `--baseline`),
mlx-lm and mlx-vlm under their own generation loops, all greedy. On Linux, preload OpenBLAS (see the README); on a GPU
install `mlx[cuda13]`.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

RUNTIMES = ("mlx_gemma3n", "mlx-lm", "mlx-vlm")
# Primitives that make no kernel of their own (views, and metadata-only reshapes).
VIEWS = {"Broadcast", "Reshape", "Slice", "Transpose", "ExpandDims", "Squeeze", "Flatten", "Unflatten", "AsStrided",
         "View", "StopGradient"}


def primitives(*outputs) -> Counter:
    """The primitives, by name, that computing the lazy `outputs` evaluates."""
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *outputs)
        return Counter(re.findall(r'label ="(\w+)"', Path(f.name).read_text()))


def kernels(counts: Counter) -> Counter:
    """Those of the primitives `counts` that launch a kernel of their own."""
    return Counter({name: n for name, n in counts.items() if name not in VIEWS})


def load(runtime: str, path: str, dtype):
    """(model, decode steps: (prompt ids, max tokens) -> iterator of token ids, make_cache)."""
    if runtime == "mlx_gemma3n":
        from mlx_gemma3n.loading import load_model

        model = load_model(path, dtype=dtype)[0]  # merged for inference, as `load()` gives it
    elif runtime == "mlx-lm":
        from mlx_lm.utils import load_model

        model, _ = load_model(Path(path))
        model.set_dtype(dtype)
    else:
        from mlx_vlm.generate import generate_step as vlm_step
        from mlx_vlm.utils import load_model

        model = load_model(Path(path))
        model.set_dtype(dtype)
        return model, lambda ids, n: (t for t, _ in vlm_step(mx.array(ids)[None], model, None, None, max_tokens=n,
                                                              temperature=0.0))
    from mlx_lm.generate import generate_step

    return model, lambda ids, n: (int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=n,
                                                                     prefill_step_size=512))


def ours(runtime: str, path: str, dtype):
    """Ours as a program uses it: `load()` and `stream_tokens` through the engine and our loop.
    "mlx_gemma3n@256" sets the prefill step, "mlx_gemma3n+resident-ple" loads the Per-Layer
    Embedding table into memory (no host sync per token); "before" is the package found first on
    PYTHONPATH (an older checkout, to compare against)."""
    import mlx_gemma3n
    from mlx_gemma3n import load as load_ours

    if (Path(mlx_gemma3n.__file__).parent / "runtime").is_dir():
        from mlx_gemma3n.runtime.generation import SamplingOptions, stream_tokens
    else:  # a checkout from before the runtime package
        from mlx_gemma3n.generate import SamplingOptions, stream_tokens
    resident = {"lazy_ple": False} if "+resident-ple" in runtime else {}
    model, tokenizer = load_ours(path, dtype=dtype, **resident)
    step = re.search(r"@(\d+)", runtime)
    options = {"prefill_step_size": int(step.group(1))} if step else {}
    greedy = SamplingOptions(temperature=0.0)
    return model, lambda ids, n: (r.token for r in stream_tokens(model, tokenizer, ids, max_tokens=n, sampling=greedy,
                                                                  **options))


def weight_bytes(model) -> int:
    """Bytes a decoded token reads: the decoder's resident weights (the tied head reads the whole
    embedding table; of the Per-Layer Embedding table, on disk or resident, a token reads one row:
    not counted)."""
    from mlx.utils import tree_flatten

    text = getattr(model, "language_model", model)
    return sum(v.nbytes for k, v in tree_flatten(text.parameters()) if "embed_tokens_per_layer" not in k)


def bandwidth() -> float:
    """Device memory bandwidth in bytes/s, measured: a 1 GiB array read and written."""
    a = mx.random.uniform(shape=(1 << 28,))
    mx.eval(a)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        mx.eval(a * 1.0001)
        times.append(time.perf_counter() - start)
    return 2 * a.nbytes / min(times[1:])


def measure(runtime: str, path: str, dtype, prompt: list[int], gen_tokens: int, warmup: bool) -> dict:
    mx.reset_peak_memory()
    model, steps = ours(runtime, path, dtype) if runtime.startswith(("mlx_gemma3n", "before")) else load(runtime, path, dtype)
    mx.eval(model.parameters())
    if warmup:  # kernels compiled and caches sized before the clock starts
        for _ in steps(prompt, 4):
            pass
    start = time.perf_counter()
    tokens, first = [], None
    for token in steps(prompt, gen_tokens):
        if first is None:
            first = time.perf_counter()
        tokens.append(int(token))
    end = time.perf_counter()
    return dict(ttft_s=first - start, prefill_tps=len(prompt) / (first - start),
                decode_tps=(len(tokens) - 1) / (end - first), peak_gb=mx.get_peak_memory() / 1e9,
                rss_gb=peak_rss_bytes() / 1e9, tokens=tokens, weight_bytes=weight_bytes(model))


def peak_rss_bytes() -> int:
    """The process's peak resident memory: on a CPU and in a Mac's unified memory everything, on
    a GPU with memory of its own the host's share (the Python side, the tokenizer, staging)."""
    status = Path("/proc/self/status")
    if status.exists():  # Linux: getrusage's peak survives exec, so a child would report its parent's
        peak = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(peak.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS


def decode_primitives(model, make_cache, token: int = 7, compiled: bool = False) -> Counter:
    """The primitives of one greedy decode step after a short prompt; `compiled`: our
    compiled step (`Gemma3n.decode`, whose first call runs op by op). Our CPU path runs a large
    quantized product (the head) in blocks, each evaluated before the next: switched off here,
    since it would evaluate the very graph being counted (it adds only a product and two casts
    per block)."""
    from mlx_gemma3n.model import quantized

    cache = make_cache()
    mx.eval(model(mx.array([[2, 5, 6, token]]), cache=cache))
    step = model.decode if compiled else (lambda ids, cache: model(ids, cache=cache))
    cast_bytes, quantized.CAST_BYTES = quantized.CAST_BYTES, 1 << 62
    try:
        if compiled:
            mx.eval(step(mx.array([[token]]), cache))
        return primitives(mx.argmax(step(mx.array([[token]]), cache)[:, -1], axis=-1))
    finally:
        quantized.CAST_BYTES = cast_bytes


def e2b_shaped_model(bits: int = 4, group_size: int = 64):
    """Our model with E2B's shapes and zero 4-bit weights, the PLE table a small stand-in (the
    counted token ids lie below its 1024 rows): enough to count primitives, no checkpoint needed."""
    import mlx.nn as nn

    sys.path.insert(0, str(Path(__file__).parent))
    from random_checkpoint import hf_config

    from mlx_gemma3n.config import ModelConfig
    from mlx_gemma3n.model.gemma3n import Gemma3n
    from mlx_gemma3n.model.quantized import QuantizedLinear
    from mlx_gemma3n.model.text import QuantizedScaledEmbedding, ScaledEmbedding, fuse_for_inference

    config = ModelConfig.from_dict(hf_config("E2B").to_dict())
    model = Gemma3n(config)
    text = model.language_model
    c = config.text
    text.embed_tokens_per_layer = ScaledEmbedding(1024, c.num_hidden_layers * c.hidden_size_per_layer_input, 16.0)

    def zero_quantized(cls, out_dims, in_dims, *extra):
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.group_size, layer.bits, layer.mode = group_size, bits, "affine"
        layer.weight = mx.zeros((out_dims, in_dims * bits // 32), mx.uint32)
        layer.scales = mx.zeros((out_dims, in_dims // group_size), mx.bfloat16)
        layer.biases = mx.zeros((out_dims, in_dims // group_size), mx.bfloat16)
        for name, value in extra:
            setattr(layer, name, value)
        return layer

    def quantize(path, m):
        if isinstance(m, ScaledEmbedding) and path == "embed_tokens":
            rows, dims = m.weight.shape
            return zero_quantized(QuantizedScaledEmbedding, rows, dims, ("num_embeddings", rows), ("dims", dims),
                                  ("scale", m.scale))
        if isinstance(m, nn.Linear) and m.weight.shape[1] % group_size == 0:
            return zero_quantized(QuantizedLinear, *m.weight.shape)
        return m

    from mlx.utils import tree_map_with_path

    text.update_modules(tree_map_with_path(quantize, text.leaf_modules(), is_leaf=nn.Module.is_module))
    model.set_dtype(mx.bfloat16)
    mx.eval(text.parameters())
    fuse_for_inference(model)
    return model


def print_primitives(path: str | None, dtype, paths: dict[str, str]) -> None:
    """`paths`: another checkpoint for a runtime (`--model-for`)."""
    rows = []
    if path:
        for runtime in RUNTIMES[:2]:
            checkpoint = paths.get(runtime, path)
            try:
                model, _ = load(runtime, checkpoint, dtype)
            except Exception as e:  # a peer that cannot read this checkpoint's config dialect
                print(f"{runtime} cannot load {checkpoint}: {type(e).__name__}: {e}")
                continue
            if runtime == "mlx-lm":
                from mlx_lm.models.cache import make_prompt_cache

                make_cache = lambda: make_prompt_cache(model)  # noqa: E731
            else:
                make_cache = model.make_cache
            rows.append((f"{runtime} ({Path(checkpoint).name})", decode_primitives(model, make_cache)))
            if runtime == "mlx_gemma3n":
                rows.append(("  the same, compiled step", decode_primitives(model, make_cache, compiled=True)))
    model = e2b_shaped_model()
    rows.append(("mlx_gemma3n (E2B shape, 4-bit)", decode_primitives(model, model.make_cache)))
    rows.append(("  the same, compiled step", decode_primitives(model, model.make_cache, compiled=True)))
    print(f"device {mx.default_device()}; one greedy decode step")
    print(f"{'model':<40} {'kernels':>8} {'primitives':>11}   the most frequent kernels")
    for name, counts in rows:
        launched = kernels(counts)
        common = ", ".join(f"{n} {kernel[:40]}" for kernel, n in launched.most_common(8))
        print(f"{name:<40} {sum(launched.values()):>8} {sum(counts.values()):>11}   {common}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a Gemma 3n checkpoint directory (HF layout)")
    parser.add_argument("--model-for", action="append", default=[], metavar="RUNTIME=DIR",
                        help="another checkpoint for one runtime, e.g. mlx-lm=DIR: mlx-lm reads its own conversion "
                             "of the same weights, not mlx-vlm's")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3, help="processes per runtime")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--runtimes", default=",".join(RUNTIMES),
                        help="comma-separated: " + ", ".join(RUNTIMES) + "; mlx_gemma3n@STEP sets our prefill step, "
                             "mlx_gemma3n+resident-ple keeps the PLE table in memory; before is the package in --baseline")
    parser.add_argument("--baseline", type=Path, help="a folder holding an older mlx_gemma3n, run as 'before'")
    parser.add_argument("--warmup", action="store_true", help="one short generation before the timed one")
    parser.add_argument("--primitives", action="store_true", help="print primitives per decoded token and exit")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single measurement, as a child process
    args = parser.parse_args(argv)
    dtype = getattr(mx, args.dtype)
    paths = dict(pair.split("=", 1) for pair in args.model_for)
    if args.primitives:
        print_primitives(args.model, dtype, paths)
        return 0
    if not args.model:
        parser.error("--model is required")
    prompt = np.random.default_rng(0).integers(3, 256_000, size=args.prompt_tokens).tolist()
    if args.one:
        path = paths.get(args.one, args.model)
        print(json.dumps(measure(args.one, path, dtype, prompt, args.gen_tokens, args.warmup)))
        return 0

    import os

    speed = bandwidth()
    print(f"device {mx.default_device()} ({speed / 1e9:.0f} GB/s measured), dtype {args.dtype}, prompt "
          f"{args.prompt_tokens} tokens, {args.gen_tokens} generated, median [min-max] of {args.runs} processes")
    print(f"{'runtime':<26} {'decode tok/s':>22} {'prefill tok/s':>24} {'TTFT s':>20} {'MLX peak GB':>18} "
          f"{'peak RSS GB':>18} {'% of floor':>10}")
    tokens = {}
    for runtime in args.runtimes.split(","):
        runs = []
        env, python = dict(os.environ), [sys.executable]
        if runtime == "before":
            # Without site's .pth files (-S) an installed (editable) mlx_gemma3n cannot take
            # precedence over the older checkout; the site-packages are put back on the path.
            import site

            python.append("-S")
            env["PYTHONPATH"] = os.pathsep.join([str(args.baseline.resolve()), str(Path(__file__).resolve().parent.parent),
                                                 *site.getsitepackages(), env.get("PYTHONPATH", "")])
        for _ in range(args.runs):
            child = python + [__file__, "--one", runtime] + [a for a in (argv or sys.argv[1:]) if a != "--primitives"]
            out = subprocess.run(child, capture_output=True, text=True, env=env)
            if out.returncode:  # e.g. a peer that cannot read this checkpoint: say so, go on with the others
                print(f"{runtime} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
                break
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if not runs:
            continue
        tokens[runtime] = runs[0]["tokens"]

        def cell(key, fmt="{:.2f}"):
            values = [r[key] for r in runs]
            return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"

        # The weight-streaming floor: a token cannot be faster than reading the weights once.
        floor = 100 * statistics.median(r["decode_tps"] for r in runs) * runs[0]["weight_bytes"] / speed
        print(f"{runtime:<26} {cell('decode_tps'):>22} {cell('prefill_tps'):>24} {cell('ttft_s', '{:.3f}'):>20} "
              f"{cell('peak_gb'):>18} {cell('rss_gb'):>18} {floor:>9.1f}%", flush=True)
    mine = next((t for r, t in tokens.items() if r.startswith("mlx_gemma3n")), None)
    for runtime, theirs in tokens.items():
        if mine and not runtime.startswith("mlx_gemma3n"):
            same = next((i for i, (x, y) in enumerate(zip(mine, theirs)) if x != y), min(len(mine), len(theirs)))
            print(f"greedy tokens identical to {runtime}'s for the first {same}/{len(mine)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

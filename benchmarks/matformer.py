"""MatFormer sizes from one loaded E4B (elastic) against the same sizes sliced to checkpoints of
their own (standalone): decode speed and peak memory, each the median of several processes.

    python benchmarks/random_checkpoint.py --size E4B --out /tmp/E4B
    python -m mlx_gemma3n.convert --model /tmp/E4B --out /tmp/E4B-4bit -q
    python benchmarks/matformer.py --model /tmp/E4B-4bit [--presets E2B,E2.54B,E3.39B,E4B]

The standalone checkpoints are sliced from `--model` into `--work` first (python -m
mlx_gemma3n.matformer does the same). Every measurement is a fresh process that loads its model,
warms up (the first use of a kernel may compile it), prefills the same prompt ids and decodes
greedily; elastic runs load the whole E4B and run the preset through `submodel=`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def measure(model: str, submodel: str | None, prompt_tokens: int, gen_tokens: int) -> dict:
    import mlx.core as mx
    import numpy as np

    from mlx_gemma3n import SamplingOptions, load
    from mlx_gemma3n.runtime.generation import stream_tokens

    net, tokenizer = load(model)
    prompt = np.random.default_rng(0).integers(1000, 200_000, prompt_tokens).tolist()
    greedy = SamplingOptions(temperature=0.0)
    for _ in stream_tokens(net, tokenizer, prompt[:16], max_tokens=8, sampling=greedy, submodel=submodel):
        pass  # warm-up
    mx.reset_peak_memory()
    last = None
    for last in stream_tokens(net, tokenizer, prompt, max_tokens=gen_tokens, sampling=greedy, submodel=submodel):
        pass
    return {"decode_tps": last.generation_tps, "prefill_tps": last.prompt_tps, "peak_gb": mx.get_peak_memory() / 1e9,
            "tokens": last.generation_tokens}


def run(args, model: str, submodel: str | None) -> dict:
    """One measurement in a fresh process."""
    command = [sys.executable, __file__, "--one", model, "--prompt-tokens", str(args.prompt_tokens),
               "--gen-tokens", str(args.gen_tokens)] + (["--submodel", submodel] if submodel else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"measurement failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def measure_presets(args, work: Path) -> list:
    """(preset, standalone runs, elastic runs) for each preset; the standalone slices are written under `work`."""
    from mlx_gemma3n.slicing import slice_checkpoint
    from mlx_gemma3n.submodel import Submodel

    rows = []
    for preset in args.presets.split(","):
        if preset.upper() == "E4B":
            standalone = args.model
        else:
            standalone = work / preset
            if not (standalone / "config.json").exists():
                slice_checkpoint(args.model, standalone, Submodel.preset(preset), show_progress=False)
        alone = [run(args, str(standalone), None) for _ in range(args.runs)]
        elastic = [run(args, args.model, preset) for _ in range(args.runs)]
        rows.append((preset, alone, elastic))
        print(f"{preset}: standalone {spread([r['decode_tps'] for r in alone])} tok/s, "
              f"elastic {spread([r['decode_tps'] for r in elastic])} tok/s", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an E4B checkpoint (ours, quantized or not)")
    parser.add_argument("--presets", default="E2B,E2.54B,E3.39B,E4B")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="processes per measurement")
    parser.add_argument("--work", type=Path, default=None, help="where the standalone slices go (default: a temporary folder)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--submodel", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.submodel, args.prompt_tokens, args.gen_tokens)))
        return 0
    if not args.model:
        parser.error("--model is required")

    with tempfile.TemporaryDirectory(prefix="matformer-") as scratch:
        rows = measure_presets(args, args.work or Path(scratch))

    print(f"\n{args.prompt_tokens}-token prompt, {args.gen_tokens} tokens decoded greedily; median (min-max) of "
          f"{args.runs} processes each\n")
    print("| size | decode tok/s, standalone | decode tok/s, elastic (one E4B) | elastic / standalone "
          "| peak GB, standalone | peak GB, elastic |")
    print("|---|---|---|---|---|---|")
    for preset, alone, elastic in rows:
        a, e = [r["decode_tps"] for r in alone], [r["decode_tps"] for r in elastic]
        print(f"| {preset} | {spread(a)} | {spread(e)} | {statistics.median(e) / statistics.median(a):.2f} "
              f"| {statistics.median(r['peak_gb'] for r in alone):.2f} "
              f"| {statistics.median(r['peak_gb'] for r in elastic):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

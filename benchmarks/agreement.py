"""How closely ours and mlx-lm's Gemma 3n follow transformers on a full-size checkpoint.

    python benchmarks/agreement.py --model /tmp/gemma3n-E2B-random --tokens 600

The tests check parity on tiny models; this checks it at the real size (30+ layers, the real
sliding window, KV sharing over hundreds of tokens), in float32, for the last positions of a
prompt longer than the sliding window. Needs torch and transformers besides MLX.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np


def reference_logits(path: Path, ids: np.ndarray, last: int) -> np.ndarray:
    import torch
    from transformers import Gemma3nForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Gemma3nForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, device=device), logits_to_keep=last).logits.float().cpu().numpy()
    del model
    gc.collect()
    torch.cuda.empty_cache() if device == "cuda" else None
    return out


def mlx_logits(model, ids: np.ndarray, last: int) -> np.ndarray:
    logits = model(mx.array(ids))[:, -last:].astype(mx.float32)
    return np.array(logits)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--last", type=int, default=8, help="compare the logits of this many final positions")
    args = parser.parse_args(argv)
    ids = np.random.default_rng(0).integers(3, 256_000, size=(1, args.tokens))

    expected = reference_logits(args.model, ids, args.last)
    rows = []

    from mlx_gemma3n.loading import load_model

    ours = load_model(args.model, dtype=mx.float32)[0]
    rows.append(("mlx_gemma3n", mlx_logits(ours, ids, args.last)))
    del ours
    gc.collect()
    mx.clear_cache()

    from mlx_lm.utils import load_model as mlx_lm_load_model

    peer, _ = mlx_lm_load_model(args.model)
    peer.set_dtype(mx.float32)
    rows.append(("mlx-lm gemma3n", mlx_logits(peer, ids, args.last)))

    print(f"{args.tokens}-token prompt, float32, last {args.last} positions, against transformers "
          f"(logit magnitude up to {np.abs(expected).max():.2f}):")
    for name, logits in rows:
        diff = np.abs(logits - expected)
        agree = (logits.argmax(-1) == expected.argmax(-1)).mean()
        print(f"  {name:<16} max |Δlogit| {diff.max():.3g}   mean {diff.mean():.3g}   argmax agreement {agree:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

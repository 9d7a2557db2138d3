"""Resident memory that reading a tokenizer costs, with and without handing the parse's freed
heap back to the system (malloc_trim, glibc only), and reading tokenizer.json from a file or
from a Python string. Each run is a fresh process; prints the median of --runs and the spread.

    python benchmarks/tokenizer_memory.py                  # Gemma 3's tokenizer laid out as 3n's
    python benchmarks/tokenizer_memory.py --path CHECKPOINT

"+RSS" is VmRSS after reading minus before; "+peak" is VmHWM minus VmRSS before (Linux /proc).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WAYS = {
    "Tokenizer.load": "mlx_gemma3n's loader, as shipped",
    "Tokenizer.load, no trim": "mlx_gemma3n's loader without malloc_trim",
    "from_file": "tokenizers' Tokenizer.from_file, then malloc_trim",
    "from_str": "tokenizers' Tokenizer.from_str(file text), then malloc_trim",
}


def _kib(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}.")


def child(way: str, path: Path) -> dict:
    import ctypes

    from tokenizers import Tokenizer as RustTokenizer

    import mlx_gemma3n.tokenizer as tokenizer_module

    before = _kib("VmRSS")
    if way.startswith("Tokenizer.load"):
        if way.endswith("no trim"):
            tokenizer_module._release_freed_heap = lambda: None
        tokenizer = tokenizer_module.Tokenizer.load(path)
        loaded = trimmed = _kib("VmRSS")
    else:
        if way == "from_file":
            tokenizer = RustTokenizer.from_file(str(path / "tokenizer.json"))
        else:
            tokenizer = RustTokenizer.from_str((path / "tokenizer.json").read_text(encoding="utf-8"))
        loaded = _kib("VmRSS")
        ctypes.CDLL(None).malloc_trim(0)
        trimmed = _kib("VmRSS")
    assert len(tokenizer.encode("hello world", add_special_tokens=False)) > 0
    return {"rss": (loaded - before) / 1024, "trimmed": (trimmed - before) / 1024,
            "peak": (_kib("VmHWM") - before) / 1024}


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):6.0f} ({min(values):.0f}-{max(values):.0f})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", type=Path, help="a directory with tokenizer.json (default: the real-sized one)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--child", choices=list(WAYS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.path is None:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from real_tokenizer import real_tokenizer_dir

        args.path = real_tokenizer_dir()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.path)), flush=True)
        return 0
    size = (args.path / "tokenizer.json").stat().st_size
    print(f"{args.path / 'tokenizer.json'} ({size / 1e6:.1f} MB); MiB, median (min-max) of {args.runs} processes")
    print(f"{'way':<26} {'+RSS':>14} {'+RSS trimmed':>14} {'+peak':>14}")
    for way, meaning in WAYS.items():
        results = []
        for _ in range(args.runs):
            proc = subprocess.run([sys.executable, __file__, "--child", way, "--path", str(args.path)],
                                  capture_output=True, text=True, check=True)
            line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
            results.append(json.loads(line.removeprefix("RESULT ")))
        print(f"{way:<26} {_summary([r['rss'] for r in results]):>14} {_summary([r['trimmed'] for r in results]):>14} "
              f"{_summary([r['peak'] for r in results]):>14}   {meaning}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Many callers of one loaded model: N threads each asking for a short reply at once, against
one thread alone, with the same prompts (the engine serves the requests in turn, a step each).
Prints wall time, aggregate decode throughput, time to first token, and peak memory (MLX's peak
and the process's RSS), the median of several processes with the spread.

    python benchmarks/concurrency.py --model CHECKPOINT [--threads 1,8] [--tokens 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time


def measure(model_path: str, threads: int, tokens: int) -> dict:
    import mlx.core as mx

    from mlx_gemma3n import load, stream_generate

    model, tokenizer = load(model_path)
    list(stream_generate(model, tokenizer, "warm up", max_tokens=2, temperature=0.0))
    mx.reset_peak_memory()
    firsts, counts = [None] * threads, [0] * threads
    start = time.perf_counter()
    barrier = threading.Barrier(threads)

    def ask(i: int) -> None:
        barrier.wait()
        for response in stream_generate(model, tokenizer, f"Request {i}: tell me about the sea.", max_tokens=tokens,
                                        temperature=0.0):
            if firsts[i] is None:
                firsts[i] = time.perf_counter() - start
            counts[i] += 1

    workers = [threading.Thread(target=ask, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "tokens_per_s": sum(counts) / wall, "ttft_median_s": statistics.median(firsts),
            "mlx_peak_gb": mx.get_peak_memory() / 1e9,
            "rss_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", default="1,8")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.model, args.one, args.tokens)))
        return 0
    print(f"{args.tokens} tokens per reply, greedy; median [min-max] of {args.runs} processes")
    print("| threads | wall s | tokens/s, all replies | median time to first token, s | MLX peak GB | RSS peak GB |")
    print("|---|---|---|---|---|---|")
    for n in map(int, args.threads.split(",")):
        runs = []
        for _ in range(args.runs):
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--tokens", str(args.tokens),
                                  "--one", str(n)], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{n} threads failed:\n{out.stderr[-2000:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))

        def cell(key: str, fmt: str = "{:.2f}") -> str:
            values = [r[key] for r in runs]
            return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"

        print(f"| {n} | {cell('wall_s')} | {cell('tokens_per_s', '{:.1f}')} | {cell('ttft_median_s')} "
              f"| {cell('mlx_peak_gb', '{:.3f}')} | {cell('rss_peak_gb', '{:.3f}')} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

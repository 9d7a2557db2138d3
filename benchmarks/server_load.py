"""Load on the OpenAI-compatible server: requests/s and time to first token for 1, 4 and 16
concurrent short streamed chats, and the server process's memory idle and under that load.

    python benchmarks/server_load.py [--model DIR] [--rounds 3] [--max-tokens 8]

Without --model it builds the tests' tiny random checkpoint (needs the test extra). The server
runs as its own process, started by the command a user runs; each concurrency level runs
`--rounds` rounds, and the table gives the median requests/s with its spread, and the 50th/95th
percentile time to first token over every request of the level.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "mlx_gemma3n.server", "--model", model, "--port", "0",
                                "--dtype", "float32"], stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        found = re.search(r"running on (http://[\d.]+:\d+)", line)
        if found:
            threading.Thread(target=process.stderr.read, daemon=True).start()  # keep the pipe drained
            return process, found.group(1)
    raise RuntimeError("the server did not start")


def one_chat(client: OpenAI, prompt: str, max_tokens: int) -> float:
    """Seconds to the first piece of text."""
    began, first = time.perf_counter(), None
    for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, temperature=0, stream=True):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - began
    return first if first is not None else time.perf_counter() - began


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--levels", default="1,4,16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="server-load-") as scratch:
        model = args.model
        if model is None:
            sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
            from checkpoints import make_checkpoint

            model = str(Path(scratch) / "tiny-gemma3n")
            make_checkpoint(Path(model))
        process, url = start_server(model)
        try:
            client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
            one_chat(client, "warm up", args.max_tokens)
            time.sleep(1.0)
            idle = rss_mb(process.pid)
            rows = []
            for level in map(int, args.levels.split(",")):
                peak, rates, firsts = idle, [], []
                for r in range(args.rounds):
                    prompts = [f"hello world {level} {r} {i}" for i in range(level)]
                    done = threading.Event()

                    def sample():
                        nonlocal peak
                        while not done.wait(0.05):
                            peak = max(peak, rss_mb(process.pid))

                    sampler = threading.Thread(target=sample)
                    sampler.start()
                    began = time.perf_counter()
                    with ThreadPoolExecutor(level) as pool:
                        firsts += list(pool.map(lambda p: one_chat(client, p, args.max_tokens), prompts))
                    rates.append(level / (time.perf_counter() - began))
                    done.set()
                    sampler.join()
                rows.append((level, rates, firsts, peak))
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(f"server: {model}, {args.max_tokens} tokens per reply, {args.rounds} rounds per level; idle RSS {idle:.0f} MB")
    print(f"{'clients':>7} | {'requests/s (median, min-max)':>29} | {'first token p50 / p95 (s)':>25} | peak RSS (MB)")
    for level, rates, firsts, peak in rows:
        print(f"{level:>7} | {statistics.median(rates):>10.2f} ({min(rates):.2f}-{max(rates):.2f}){'':>7} | "
              f"{percentile(firsts, 0.5):>11.2f} / {percentile(firsts, 0.95):.2f}{'':>5} | {peak:.0f}")
    print(json.dumps({"idle_rss_mb": idle, "levels": [
        {"clients": level, "requests_per_s": rates, "first_token_s": firsts, "peak_rss_mb": peak}
        for level, rates, firsts, peak in rows]}))


if __name__ == "__main__":
    main()

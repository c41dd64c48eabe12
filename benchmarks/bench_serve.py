"""Question: served through transformers' engine (`llm-int8 serve`), how many tokens per second does
the int8 model give under concurrent load, against fp32 and bitsandbytes 8-bit in the same engine,
and does every request get its own, right reply?

For each method (``--methods``, default fp32, llm-int8, bnb-8bit; also ``llm-int8-head``: llm-int8 with
``--quantize-head``, ``llm-int8-small``: with ``--quantize-head --int8-embedding``, and ``llm-int8-invariant``:
with ``--batch-invariant``) one server is started as a
subprocess on a free loopback port (``llm-int8 serve --quantization ... --port 0``); the servers
live side by side and are driven in turns, so a change in the machine's load hits all of them:

1. alone: each of the ``--requests`` prompts is sent by itself (concurrency 1), greedy, ``--max-tokens``
   new tokens. These replies are the reference: a request alone is one offline ``generate()`` of that
   server's model (tests/test_serve.py checks it token for token; ``--offline-check K`` checks it here
   for the first K prompts of llm-int8 by generating them in this process).
2. loaded, ``--rounds`` times, methods in turns: all prompts at once through ``--concurrency`` client
   threads (the official ``openai`` client). Each reply must equal its prompt's reply alone (a reply
   lost, swapped with another request's or changed by the traffic counts here); latency is per request
   (sent to full reply), tokens/s is all generated tokens over the wall time of the round.

Memory is the server process's: VmRSS once loaded and VmHWM (peak) at the end. Loopback only; each
phase has a time limit (``--time-limit``), and a server that exceeds it is reported, not waited for.

    python benchmarks/bench_serve.py [--model qwen2.5-0.5b] [--requests 16] [--concurrency 8] [--max-tokens 12]
        [--rounds 2] [--methods fp32 llm-int8 bnb-8bit] [--continuous-batching] [--offline-check 4]

The servers are alive together: for Qwen2.5-0.5B budget ~3 GiB for fp32, ~2 GiB for llm-int8 or bnb-8bit,
~1 GiB for llm-int8-head (plus the paged cache with --continuous-batching).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

URL_LINE = re.compile(r"^serving (\S+) \((\S+)\) at (http://\S+)/v1")
MEMORY_LINE = re.compile(r"model memory (\d+) MiB")
MiB = 2**20
METHODS = {  # name -> the `llm-int8 serve` options of its server
    "fp32": ["--quantization", "fp32"],
    "llm-int8": ["--quantization", "llm-int8"],
    "llm-int8-head": ["--quantization", "llm-int8", "--quantize-head"],
    "llm-int8-small": ["--quantization", "llm-int8", "--quantize-head", "--int8-embedding"],
    "llm-int8-invariant": ["--quantization", "llm-int8", "--batch-invariant"],
    "bnb-8bit": ["--quantization", "bnb-8bit"],
}
TASKS = [
    "reverses a string", "checks whether a number is prime", "returns the n-th Fibonacci number", "sorts a list of dicts by a key",
    "counts the words in a text", "merges two sorted lists", "flattens a nested list", "computes a factorial",
    "parses a CSV line", "finds the largest of three numbers", "removes duplicates from a list", "converts Celsius to Fahrenheit",
    "checks whether a string is a palindrome", "sums the digits of an integer", "returns the GCD of two numbers",
    "transposes a matrix", "counts the vowels in a string", "computes the mean of a list", "reads a file into lines",
    "capitalizes every word", "returns the median of a list", "zips two lists into a dict", "finds the second largest number",
    "checks for balanced parentheses", "computes a power without **", "converts binary to decimal", "rotates a list by k",
    "finds common elements of two lists", "counts character frequencies", "validates an email address",
    "returns the squares of a list", "chunks a list into pieces of n",
]


def prompt(i: int) -> str:
    return f"# Python\n# A function that {TASKS[i % len(TASKS)]}.\ndef"


class Server:
    def __init__(self, model: str, method: str, continuous_batching: bool, timeout: float):
        command = [sys.executable, "-m", "llm_int8.cli", "serve", "--model", model, *METHODS[method],
                   "--port", "0", "--no-progress"] + (["--continuous-batching"] if continuous_batching else [])
        self.method = method
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.url = None
        started = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                match = URL_LINE.match(line)
                if match:
                    self.url, self.name = match.group(3), match.group(1)
                    started.set()
            started.set()

        threading.Thread(target=read, daemon=True).start()
        if not started.wait(timeout) or self.url is None:
            self.stop()
            raise RuntimeError(f"the {method} server did not start within {timeout:.0f} s:\n" + "".join(self.lines[-30:]))
        self.model_mib = int(MEMORY_LINE.search("".join(self.lines)).group(1))
        self.rss_loaded = self.status("VmRSS")
        import openai

        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", timeout=timeout, max_retries=0)

    def status(self, field: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def complete(self, i: int, max_tokens: int) -> tuple[str, int, float]:
        start = time.perf_counter()
        reply = self.client.completions.create(model=self.name, prompt=prompt(i), temperature=0, max_tokens=max_tokens)
        return reply.choices[0].text, reply.usage.completion_tokens, time.perf_counter() - start

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def run_phase(server: Server, indices: list[int], concurrency: int, max_tokens: int, time_limit: float):
    """(replies by prompt index, tokens, latencies, wall seconds) of ``indices`` sent through ``concurrency`` threads."""
    results = {}
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = {pool.submit(server.complete, i, max_tokens): i for i in indices}
        done, pending = wait(futures, timeout=time_limit)
        if pending:
            raise RuntimeError(f"{server.method}: {len(pending)} of {len(indices)} requests unanswered after {time_limit:.0f} s")
        for future in done:
            results[futures[future]] = future.result()
    wall = time.perf_counter() - start
    replies = {i: r[0] for i, r in results.items()}
    return replies, sum(r[1] for r in results.values()), [r[2] for r in results.values()], wall


def offline_replies(model: str, method: str, indices: list[int], max_tokens: int) -> dict[int, str]:
    """Greedy replies of an llm-int8 method's model generated in this process, tokenized as the server's completion
    handler does."""
    import torch

    from llm_int8.integrations.serve import load_for_serving

    options = METHODS[method]
    served = load_for_serving(model, quantize_head="--quantize-head" in options, int8_embedding="--int8-embedding" in options,
                              batch_invariant="--batch-invariant" in options)
    lm, tokenizer = served.model, served.tokenizer
    out = {}
    with torch.inference_mode():
        for i in indices:
            inputs = tokenizer(prompt(i), return_tensors="pt")
            ids = lm.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)[0, inputs["input_ids"].shape[1]:]
            out[i] = tokenizer.decode(ids, skip_special_tokens=True)
    del lm, served
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--methods", nargs="+", default=["fp32", "llm-int8", "bnb-8bit"], choices=list(METHODS))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2, help="loaded rounds per method, methods in turns")
    parser.add_argument("--continuous-batching", action="store_true", help="start the servers with --continuous-batching")
    parser.add_argument("--offline-check", type=int, default=4, metavar="K",
                        help="generate the first K prompts with the first llm-int8 method in this process and compare (0: skip)")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds a server may take to start, or a phase to finish")
    args = parser.parse_args()
    if not 1 <= args.requests <= len(TASKS) or not 1 <= args.concurrency <= 64 or not 1 <= args.max_tokens <= 256:
        parser.error(f"--requests in [1, {len(TASKS)}], --concurrency in [1, 64], --max-tokens in [1, 256]")

    from llm_int8.eval.speed import cpu_name

    indices = list(range(args.requests))
    began = time.perf_counter()
    print(f"bench_serve: {args.model}, {args.requests} requests at concurrency {args.concurrency} x {args.rounds} rounds, "
          f"{args.max_tokens} new tokens each (greedy), continuous batching {'on' if args.continuous_batching else 'off'}; "
          f"CPU: {cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    servers, failed = [], {}

    def attempt(s, what, fn):
        """fn() for server s; a failure is reported, that server stopped and left out, the others go on."""
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 (any failure of one method is a result to report)
            failed[s.method] = f"{what}: {type(err).__name__}: {err}"
            print(f"  {s.method}: FAILED {failed[s.method]}", flush=True)
            s.stop()
            servers.remove(s)

    try:
        for method in args.methods:
            t = time.perf_counter()
            try:
                servers.append(Server(args.model, method, args.continuous_batching, args.time_limit))
            except RuntimeError as err:
                failed[method] = f"start: {err}"
                print(f"  {method}: FAILED to start: {err}", flush=True)
                continue
            print(f"  {method}: server up in {time.perf_counter() - t:.0f} s, model {servers[-1].model_mib} MiB, "
                  f"RSS {servers[-1].rss_loaded / MiB:.0f} MiB", flush=True)
        for s in list(servers):  # one short request each first: the first forward of a process pays one-off costs
            attempt(s, "warm-up", lambda: s.complete(len(TASKS) - 1, 2))
        stats = {s.method: {"alone": None, "tokens": 0, "wall": 0.0, "latency": [], "changed": 0, "asked": 0} for s in servers}
        for s in list(servers):  # references, and concurrency-1 throughput
            result = attempt(s, "alone", lambda: run_phase(s, indices, 1, args.max_tokens, args.time_limit))
            if result:
                replies, tokens, latencies, wall = result
                stats[s.method].update(alone=replies, alone_tps=tokens / wall)
                print(f"  {s.method}: alone {tokens / wall:.2f} tokens/s", flush=True)
        for r in range(args.rounds):
            for s in list(servers):
                result = attempt(s, f"round {r + 1}", lambda: run_phase(s, indices, args.concurrency, args.max_tokens, args.time_limit))
                if not result:
                    continue
                replies, tokens, latencies, wall = result
                st = stats[s.method]
                st["tokens"] += tokens
                st["wall"] += wall
                st["latency"] += latencies
                st["asked"] += len(indices)
                st["changed"] += sum(replies[i] != st["alone"][i] for i in indices)
                print(f"  round {r + 1} {s.method}: {tokens / wall:.2f} tokens/s", flush=True)
        for s in servers:
            stats[s.method]["peak"] = s.status("VmHWM")
    finally:
        for s in servers:
            s.stop()
    stats = {s.method: stats[s.method] for s in servers}

    int8_methods = [m for m in stats if m.startswith("llm-int8")]
    base = stats.get("fp32")
    bnb = stats.get("bnb-8bit")
    tps = {m: st["tokens"] / st["wall"] for m, st in stats.items()}
    header = ["method", "tok/s C=1", f"tok/s C={args.concurrency}", "vs fp32", "vs bnb-8bit", "p50 s", "p95 s",
              "replies = alone", "model MiB", "RSS MiB", "peak RSS MiB", "RSS vs fp32"]
    rss = {s.method: s.rss_loaded for s in servers}
    rows = []
    for s in servers:
        st = stats[s.method]
        rows.append([
            s.method, f"{st['alone_tps']:.2f}", f"{tps[s.method]:.2f}",
            f"{tps[s.method] / tps['fp32']:.2f}x" if base else "-", f"{tps[s.method] / tps['bnb-8bit']:.2f}x" if bnb else "-",
            f"{statistics.median(st['latency']):.1f}", f"{percentile(st['latency'], 0.95):.1f}",
            f"{st['asked'] - st['changed']}/{st['asked']}", str(s.model_mib), f"{s.rss_loaded / MiB:.0f}",
            f"{st['peak'] / MiB:.0f}", f"{rss[s.method] / rss['fp32']:.2f}x" if base else "-",
        ])
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    print()
    for row in [header, ["-" * w for w in widths]] + rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print(f"(tokens/s: all generated tokens over the wall time, {args.rounds} interleaved rounds; latency: request sent -> full "
          f"reply; replies = alone: loaded replies equal to the same prompt's reply sent alone; RSS: server process once loaded)")
    for method, why in failed.items():
        print(f"{method}: FAILED ({why.splitlines()[0]})")
    for method in int8_methods if base else []:
        goals = [f"{method} / fp32 tokens/s {tps[method] / tps['fp32']:.2f}x (goal >= 2)"]
        if bnb:
            goals.append(f"{method} / bnb-8bit {tps[method] / tps['bnb-8bit']:.2f}x (goal >= 3)")
        goals.append(f"server RSS {method} / fp32 {rss[method] / rss['fp32']:.2f}x, peak {stats[method]['peak'] / stats['fp32']['peak']:.2f}x "
                     "(goal <= 0.45)")
        print("goals at C={}: {}".format(args.concurrency, "; ".join(goals)))
    print(f"wall time {time.perf_counter() - began:.0f} s; load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    if args.offline_check and int8_methods:  # last: the table is printed whatever happens here
        k, method = indices[: args.offline_check], int8_methods[0]
        offline = offline_replies(args.model, method, k, args.max_tokens)
        same = sum(offline[i] == stats[method]["alone"][i] for i in k)
        print(f"{method} alone = offline generate() in this process: {same} of {len(k)} prompts")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Load test for `eellm serve`: sends the same set of single-prompt requests with 1 client and
with N concurrent clients, and prints requests/s, generated tokens/s, latency percentiles and
the ratio of the two runs (continuous batching at work). Python standard library only.

  ./build/eellm serve --checkpoint=runs/kjv_demo --port=5000 --max-batch=16 &
  python3 tools/serve_load.py --url http://127.0.0.1:5000 --requests 64 --concurrency 16
"""
import argparse
import concurrent.futures
import json
import sys
import time
import urllib.error
import urllib.request

PROMPTS = ["And God said", "In the beginning", "The LORD is my shepherd", "Blessed are the",
           "And it came to pass", "Then said Jesus unto", "For God so loved",
           "And the king answered"]
# A preamble every prompt may share (--prefix-chars), as a system prompt or a few-shot header is
# shared: the server's prefix cache keeps its K/V.
PREAMBLE = ("Here follow verses in the manner of the old translation, one per line, each of them "
            "complete, plain in its words and even in its measure; the reader continues the "
            "last line in the same voice until the verse is done, and then stops there. The "
            "lines speak of the land and of its kings, of the seasons and the harvest, of the "
            "rivers and the cities by them, and of the people who went out and came in. ")


def one_request(url, body):
    data = json.dumps(body).encode()
    req = urllib.request.Request(url + "/api", data=data, method="PUT",
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as e:
        sys.exit(f"serve_load: the server answered {e.code}: {e.read().decode()}")
    return time.perf_counter() - start, answer


def run(url, bodies, concurrency):
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda b: one_request(url, b), bodies))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    tokens = sum(len(layers) for _, a in results for layers in a["layers"])
    layer_sum = sum(sum(layers) for _, a in results for layers in a["layers"])
    return {
        "concurrency": concurrency,
        "seconds": wall,
        "requests_per_s": len(bodies) / wall,
        "tokens_per_s": tokens / wall,
        "p50_s": latencies[len(latencies) // 2],
        "p90_s": latencies[min(len(latencies) - 1, int(len(latencies) * 0.9))],
        "average_layers": layer_sum / max(tokens, 1),
        "texts": [a["text"][0] for _, a in results],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:5000")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64, help="tokens_to_generate per request")
    p.add_argument("--threshold", type=float, default=0.8,
                   help="early_exit_thres (1.0: early exit off)")
    p.add_argument("--draft-exit", type=int, default=0,
                   help="draft_exit_layer: self-speculative decoding instead of early exit")
    p.add_argument("--draft-tokens", type=int, default=4, help="draft_tokens")
    p.add_argument("--stop", action="append", default=[],
                   help="a stop_sequences string (repeatable): answers may end before --tokens")
    p.add_argument("--prefix-chars", type=int, default=0,
                   help=f"every prompt starts with this many characters of a common preamble "
                        f"(at most {len(PREAMBLE)})")
    a = p.parse_args()
    if not 0 <= a.prefix_chars <= len(PREAMBLE):
        p.error(f"--prefix-chars must be in [0, {len(PREAMBLE)}], got {a.prefix_chars}")
    preamble = PREAMBLE[:a.prefix_chars]
    bodies = [{"prompts": [preamble + PROMPTS[i % len(PROMPTS)]], "tokens_to_generate": a.tokens,
               "temperature": 0} for i in range(a.requests)]
    if a.stop:
        for b in bodies:
            b["stop_sequences"] = a.stop
    for b in bodies:
        if a.draft_exit > 0:
            b.update(draft_exit_layer=a.draft_exit, draft_tokens=a.draft_tokens)
        else:
            b.update(use_early_exit=a.threshold < 1.0, early_exit_thres=a.threshold)
    one_request(a.url, bodies[0])  # warm-up
    rows = [run(a.url, bodies, 1), run(a.url, bodies, a.concurrency)]
    mode = (f"self-speculative from the exit at layer {a.draft_exit}, {a.draft_tokens} drafts"
            if a.draft_exit > 0 else f"early_exit_thres {a.threshold}")
    stops = f", stop at {a.stop}" if a.stop else ""
    shared = f", prompts share a {a.prefix_chars}-character preamble" if a.prefix_chars else ""
    print(f"{a.requests} requests x {a.tokens} tokens, greedy, {mode}{stops}{shared}")
    print("clients | requests/s | tokens/s | p50 latency s | p90 latency s | avg layers")
    for r in rows:
        print(f"{r['concurrency']:7d} | {r['requests_per_s']:10.2f} | {r['tokens_per_s']:8.1f} | "
              f"{r['p50_s']:13.3f} | {r['p90_s']:13.3f} | {r['average_layers']:10.2f}")
    same = sum(x == y for x, y in zip(rows[0]["texts"], rows[1]["texts"]))
    print(f"throughput ratio {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x; "
          f"{same} of {a.requests} answers identical in both runs")
    with urllib.request.urlopen(a.url + "/health", timeout=60) as r:
        served = json.loads(r.read()).get("served", {})
    print(f"server totals: {served.get('preemptions', 0)} preemptions, "
          f"{served.get('prefix_cached_tokens', 0)} prefill tokens from the prefix cache")


if __name__ == "__main__":
    main()

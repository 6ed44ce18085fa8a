#!/usr/bin/env python3
"""Inter-token latency of `eellm serve` while long prompts arrive (what chunked prefill is for).

Streaming clients ask for short completions over POST /v1/completions and time the gaps between
their tokens' events; meanwhile other clients send long prompts for one token each. Prints the
streaming clients' gap percentiles and the long prompts' time to their token. Python standard
library only.

  ./build/eellm serve --checkpoint=runs/kjv_demo --port=5000 --prefill-chunk=32 &
  python3 tools/serve_itl.py --url http://127.0.0.1:5000
"""
import argparse
import concurrent.futures
import json
import sys
import threading
import time
import urllib.error
import urllib.request

TEXT = ("And it came to pass in those days, that there went out a decree that all the land "
        "should be counted, every man in his own city; and they went up, every one, out of the "
        "villages and the fields, with their households and their flocks, unto the cities of "
        "their fathers, and the roads were full of them from the morning until the evening. ")


def post(url, body):
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=600)
    except urllib.error.HTTPError as e:
        sys.exit(f"serve_itl: the server answered {e.code}: {e.read().decode()}")


def stream_gaps(url, prompt, tokens):
    """Seconds between consecutive text events of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}
    times = []
    with post(url, body) as r:
        for line in r:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                times.append(time.perf_counter())
    return [b - a for a, b in zip(times, times[1:])]


def long_prompts(url, prompt, stop, ttfts):
    while not stop.is_set():
        start = time.perf_counter()
        with post(url, {"prompt": prompt, "max_tokens": 1, "temperature": 0}) as r:
            r.read()
        ttfts.append(time.perf_counter() - start)


def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * q))] if v else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:5000")
    p.add_argument("--streams", type=int, default=4, help="streaming clients")
    p.add_argument("--requests", type=int, default=8, help="completions per streaming client")
    p.add_argument("--tokens", type=int, default=64, help="max_tokens of each streamed completion")
    p.add_argument("--long-clients", type=int, default=2, help="clients sending long prompts")
    p.add_argument("--long-chars", type=int, default=240,
                   help=f"characters of each long prompt (at most {len(TEXT)})")
    a = p.parse_args()
    if not 1 <= a.long_chars <= len(TEXT):
        p.error(f"--long-chars must be in [1, {len(TEXT)}], got {a.long_chars}")
    stop, ttfts = threading.Event(), []
    workers = [threading.Thread(target=long_prompts, args=(a.url, TEXT[:a.long_chars], stop, ttfts))
               for _ in range(a.long_clients)]
    for w in workers:
        w.start()
    gaps = []
    with concurrent.futures.ThreadPoolExecutor(a.streams) as pool:
        jobs = [pool.submit(stream_gaps, a.url, "And God said", a.tokens)
                for _ in range(a.streams * a.requests)]
        for j in jobs:
            gaps.extend(j.result())
    stop.set()
    for w in workers:
        w.join()
    print(f"{a.streams} streaming clients x {a.requests} completions of {a.tokens} tokens, "
          f"{a.long_clients} clients sending {a.long_chars}-character prompts for 1 token")
    print(f"inter-token gaps (s): p50 {pct(gaps, 0.5):.4f}  p90 {pct(gaps, 0.9):.4f}  "
          f"p99 {pct(gaps, 0.99):.4f}  max {max(gaps):.4f}  ({len(gaps)} gaps)")
    print(f"long prompts: {len(ttfts)} answered, time to the token p50 {pct(ttfts, 0.5):.4f} s, "
          f"p90 {pct(ttfts, 0.9):.4f} s")


if __name__ == "__main__":
    main()

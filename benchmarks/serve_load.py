"""A bounded load test of ``serve`` on loopback: clients x requests through the OpenAI client, every image checked.

Starts the real server (uvicorn on a free loopback port) on ``--model`` (default: a tiny random checkpoint built
with the test helpers, so nothing is downloaded) and sends ``--requests`` image requests from ``--clients`` threads
at once. Reports per-request latency and queue wait (from ``/v1/jobs/{id}``), and fails if any request is lost,
answered twice, or answered with another request's image.

    python benchmarks/serve_load.py --requests 50 --clients 5
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: a tiny random one)")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--size", default="32x32")
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests"))
    from test_server import Running  # the tests' in-process uvicorn runner

    from mlx_qwen_image.jobs import Service

    model = args.model
    if model is None:
        from conftest import build_tiny_checkpoint

        model = str(Path(tempfile.mkdtemp()) / "tiny")
        build_tiny_checkpoint(Path(model))
    server = Running(Service(model, {"dtype": "float32"}, queue_size=args.requests)).ready()
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="local", max_retries=0, timeout=600)
    width, height = (int(v) for v in args.size.split("x"))
    expected = {s: np.asarray(server.service.pipe.generate(f"load {s}", seed=s, width=width, height=height,
                                                             steps=args.steps)) for s in range(args.requests)}

    def ask(seed):
        start = time.perf_counter()
        response = client.images.generate(prompt=f"load {seed}", size=args.size, response_format="url",
                                          extra_body={"seed": seed, "steps": args.steps})
        url = response.data[0].url
        latency = time.perf_counter() - start
        with urllib.request.urlopen(url) as r:
            pixels = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))
        job = url.split("/v1/images/")[1].split("/")[0]
        with urllib.request.urlopen(f"{server.url}/v1/jobs/{job}") as r:
            state = json.loads(r.read())
        return seed, latency, state["queue_seconds"], state["seconds"], pixels

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        results = list(pool.map(ask, range(args.requests)))
    wall = time.perf_counter() - start
    server.stop()
    seeds = sorted(r[0] for r in results)
    wrong = [s for s, *_, pixels in results if not np.array_equal(pixels, expected[s])]
    latency, wait, run = ([r[i] for r in results] for i in (1, 2, 3))

    def summary(values):
        return (f"median {statistics.median(values):.3f} s, p90 {np.percentile(values, 90):.3f} s, "
                f"max {max(values):.3f} s")

    print(f"{args.requests} requests from {args.clients} clients in {wall:.1f} s "
          f"({args.requests / wall:.1f} images/s); {args.size}, {args.steps} steps")
    print(f"latency per request: {summary(latency)}")
    print(f"queue wait:          {summary(wait)}")
    print(f"run time per job:    {summary(run)}")
    print(f"answered: {len(seeds)}, lost: {args.requests - len(set(seeds))}, wrong image: {len(wrong)}")
    return 0 if seeds == list(range(args.requests)) and not wrong else 1


if __name__ == "__main__":
    sys.exit(main())

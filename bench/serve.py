"""Benchmark: `plvmctl serve` under concurrent clients, batched against sequential serving.

One run starts `plvmctl serve` twice on a loopback port over one store of toy concepts: with
`serve.max_batch=1` (sequential serving, the baseline) and with the batcher on. Each time,
CLIENTS concurrent clients (the official async OpenAI client) send REQUESTS chat requests
each, cycling through DISTINCT different requests (a question about one concept, with a toy
scene as a data: URL, or text only). Every answer is checked against the answer the engine
gives that request on its own (what `plvmctl ask` prints with --json): a request that fails
is lost, a wrong answer is mixed up. Prints one JSON object; timings compare within the run.

    python bench/serve.py                                   # 16 clients x 200 requests (the issue's)
    python bench/serve.py --requests 20                     # a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2
import numpy as np
import openai

from plvmctl.engine import AskRequest
from plvmctl.lab import toy
from plvmctl.methods import make_engine
from plvmctl.recipe import load_recipe
from plvmctl.runtime import load_runtime
from plvmctl.store import ConceptStore

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def make_world(store: ConceptStore, runtime, concepts: int, distinct: int, seed: int):
    """`concepts` toy identities encoded into `store`, and `distinct` requests about them:
    (question, photo or None)."""
    rng = random.Random(seed)
    pool = toy.heldout_identities()
    people = rng.sample(pool, concepts)
    for number, person in enumerate(people):
        store.save(runtime.encode_concept(f"p{number}", toy.render_portrait(person, rng, size=64)), force=True)
    asks = []
    for number in range(distinct):
        who = number % concepts
        if number % 4 == 3:
            asks.append((f"What is <p{who}>'s hair color?", None))
        else:
            subject = people[who] if rng.random() < 0.5 else rng.choice(pool)
            asks.append((f"Is <p{who}> in this photo?", toy.random_scene(subject, rng, pool)[0]))
    return asks


def start_server(store: Path, port: int, settings: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "plvmctl", "--store", str(store), "--device", "cpu"]
    command += [part for setting in settings for part in ("--set", setting)]
    command += ["serve", "--host", HOST, "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server ended with status {process.returncode}")
        try:
            if httpx2.get(f"http://{HOST}:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx2.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start")


async def load(url: str, bodies: list[list[dict]], expected: list[str], clients: int, requests: int) -> dict:
    """CLIENTS concurrent clients x REQUESTS requests each; latency of each, lost, mixed up."""
    latencies, lost, mixed = [], 0, 0

    async def one_client(number: int, client: openai.AsyncOpenAI):
        nonlocal lost, mixed
        for turn in range(requests):
            which = (number * requests + turn) % len(bodies)
            tick = time.perf_counter()
            try:
                answer = await client.chat.completions.create(model="pocket", messages=bodies[which])
            except openai.OpenAIError:
                lost += 1
                continue
            latencies.append(time.perf_counter() - tick)
            message = answer.choices[0].message  # the comparison first (reasoning_content), then content
            thought = (message.model_extra or {}).get("reasoning_content")
            if (f"{thought} {message.content}" if thought else message.content) != expected[which]:
                mixed += 1

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="local", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*[one_client(number, client) for number in range(clients)])
        seconds = time.perf_counter() - start
    milliseconds = 1000 * np.array(latencies)
    return {"requests": clients * requests, "seconds": round(seconds, 2),
            "requests_per_s": round(clients * requests / seconds, 2),
            "p50_ms": round(float(np.percentile(milliseconds, 50)), 1) if latencies else None,
            "p99_ms": round(float(np.percentile(milliseconds, 99)), 1) if latencies else None,
            "lost": lost, "mixed_up": mixed}


def serve_and_load(store: Path, settings: list[str], bodies, expected, args) -> dict:
    port = args.port
    process = start_server(store, port, settings)
    try:
        url = f"http://{HOST}:{port}"
        asyncio.run(load(url, bodies[:2], expected[:2], 1, 2))  # warm-up
        result = asyncio.run(load(url, bodies, expected, args.clients, args.requests))
        counts = httpx2.get(url + "/health").json()
        result["batches"] = counts["batches"]
        result["rows_per_batch"] = round(counts["answered"] / max(counts["batches"], 1), 2)
        return result
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=200, help="requests per client")
    parser.add_argument("--distinct", type=int, default=32, help="different requests the clients cycle through")
    parser.add_argument("--concepts", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    runtime = load_runtime(load_recipe("pocket"), device="cpu")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        store = ConceptStore(Path(folder) / "concepts")
        asks = make_world(store, runtime, args.concepts, args.distinct, args.seed)
        engine = make_engine(runtime, store)  # the answers `plvmctl ask` gives, one request at a time
        expected = [engine.ask([AskRequest(text, image)])[0].answer for text, image in asks]
        bodies = [[{"role": "user", "content": [{"type": "text", "text": text}]
                    + ([{"type": "image_url", "image_url": {"url": _data_url(image)}}] if image else [])}]
                  for text, image in asks]
        sequential = serve_and_load(store.root, ["serve.max_batch=1"], bodies, expected, args)
        batched = serve_and_load(store.root, [f"serve.max_batch={args.max_batch}",
                                              f"serve.max_wait_ms={args.max_wait_ms}"], bodies, expected, args)
    report = {
        "command": " ".join(["python bench/serve.py", *sys.argv[1:]]),
        "recipe": "pocket", "device": "cpu", "omp_num_threads": os.environ["OMP_NUM_THREADS"],
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "clients": args.clients, "requests_per_client": args.requests, "distinct_requests": args.distinct,
        "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
        "sequential": sequential, "batched": batched,
        "speedup": round(batched["requests_per_s"] / sequential["requests_per_s"], 2),
        "lost": sequential["lost"] + batched["lost"], "mixed_up": sequential["mixed_up"] + batched["mixed_up"],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

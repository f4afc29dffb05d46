"""Helpers of the server tests: a real server on a free loopback port, photos as data: URLs."""

from __future__ import annotations

import base64
import contextlib
import io
import random
import socket
import threading
import time

from plvmctl.lab import toy
from plvmctl.serve.server import build_service, uvicorn_server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(runtime, store, **options):
    """A server over `runtime` in a thread of this process: yields (base URL, service)."""
    service = build_service(runtime, store, **options)
    port = free_port()
    server = uvicorn_server(service, "127.0.0.1", port, "warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        server.should_exit = True
        thread.join(30)


def data_url(image, format: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return f"data:image/{format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def bytes_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def people(count: int, seed: int = 0):
    """`count` held-out toy identities, their portraits and one scene each with them in it."""
    rng = random.Random(seed)
    pool = toy.heldout_identities()
    chosen = rng.sample(pool, count)
    portraits = [toy.render_portrait(person, rng, size=64) for person in chosen]
    scenes = [toy.random_scene(person, rng, pool)[0] for person in chosen]
    return chosen, portraits, scenes


def question(text: str, *images) -> list[dict]:
    """One user message: the text, then the photos as data: URLs."""
    parts = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
    return [{"role": "user", "content": parts}]

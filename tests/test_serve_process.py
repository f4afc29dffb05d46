"""`plvmctl serve` as processes: SIGTERM lets the request in flight finish, two servers on one
store folder see each other's concepts, and without the serve extra the command says so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2
import pytest

from plvmctl.recipe import load_recipe
from plvmctl.runtime import load_runtime
from plvmctl.store import ConceptStore
from serving import data_url, free_port, people, question, running

ROOT = Path(__file__).resolve().parents[1]


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def start(store: Path, *settings: str) -> tuple[subprocess.Popen, str]:
    """`plvmctl serve` on a free loopback port over `store`, starting (see `ready`)."""
    port = free_port()
    command = [sys.executable, "-m", "plvmctl", "--store", str(store), "--device", "cpu"]
    command += [part for setting in settings for part in ("--set", setting)]
    command += ["serve", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)  # at --log-level warning it says little: the pipe never fills
    return process, f"http://127.0.0.1:{port}"


def ready(process: subprocess.Popen, url: str) -> tuple[subprocess.Popen, str]:
    """Once the server answers /health."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server ended: {process.communicate()[1][-2000:]}")
        try:
            if httpx2.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx2.TransportError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("the server did not start")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two server processes over one store folder: `plvmctl serve`, which gathers requests
    for 1.5 s (so that a request stays in flight long enough to send SIGTERM during it), and
    one in this process."""
    store = tmp_path_factory.mktemp("shared-store")
    process, url = start(store, "serve.max_wait_ms=1500")
    runtime = load_runtime(load_recipe("pocket"), device="cpu")
    with running(runtime, ConceptStore(store)) as (here, _):
        yield (process, ready(process, url)[1]), (None, here)
    if process.poll() is None:
        process.kill()
        process.wait(30)


def test_two_servers_on_one_store_stay_consistent(servers):
    (_, one), (_, two) = servers
    _, portraits, scenes = people(1, seed=5)
    added = httpx2.post(one + "/v1/concepts", json={"name": "shared", "image": data_url(portraits[0])}, timeout=60)
    assert added.status_code == 201, added.text
    assert [c["id"] for c in httpx2.get(two + "/v1/concepts").json()["data"]] == ["shared"]
    used = httpx2.post(two + "/v1/chat/completions", json={"messages": question("Is <shared> in this photo?",
                                                                                   scenes[0])}, timeout=60)
    assert used.status_code == 200 and "<shared>" in used.json()["choices"][0]["message"]["content"]
    assert httpx2.delete(two + "/v1/concepts/shared").status_code == 200
    gone = httpx2.post(one + "/v1/chat/completions", json={"messages": question("Is <shared> here?")}, timeout=60)
    assert gone.status_code == 400 and gone.json()["error"]["code"] == "unknown_concept"


def test_sigterm_lets_the_request_in_flight_finish(servers):
    (process, url), _ = servers
    answers = []
    asking = threading.Thread(target=lambda: answers.append(httpx2.post(
        url + "/v1/chat/completions", json={"messages": question("Hello there?")}, timeout=120)))
    asking.start()
    deadline = time.monotonic() + 60
    while httpx2.get(url + "/health").json()["in_flight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    asking.join(120)
    assert answers and answers[0].status_code == 200 and answers[0].json()["choices"][0]["message"]["content"]
    assert process.wait(60) in (0, -signal.SIGTERM)  # uvicorn ends by the signal, once done


def test_without_the_serve_extra_the_command_says_how_to_install_it():
    blocked = "import sys; sys.modules['fastapi'] = sys.modules['uvicorn'] = None; " \
              "from plvmctl.cli import main; main(['serve'])"
    result = subprocess.run([sys.executable, "-c", blocked], env=environment(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert 'pip install -e ".[serve]"' in result.stderr and "Traceback" not in result.stderr

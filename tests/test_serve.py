"""`plvmctl serve` for one local user: the OpenAI chat API with real clients, the concepts
endpoints, and every bad input answered by an OpenAI-style error while the server keeps serving.

One server (the pocket model, in a thread of this process) serves the whole module.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time

import httpx2
import openai
import pytest
from PIL import Image

from plvmctl.answers import conclusion
from plvmctl.engine import AskRequest
from plvmctl.methods import make_engine
from plvmctl.recipe import load_recipe
from plvmctl.runtime import load_runtime
from plvmctl.store import ConceptStore
from serving import bytes_url, data_url, people, question, running

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pocket():
    # a long gathering window, so that concurrent requests surely share a batch
    return load_runtime(load_recipe("pocket", ["serve.max_wait_ms=150"]), device="cpu")


@pytest.fixture(scope="module")
def world():
    return people(3, seed=4)


@pytest.fixture(scope="module")
def server(pocket, world, tmp_path_factory):
    store = ConceptStore(tmp_path_factory.mktemp("store"))
    _, portraits, _ = world
    for number, portrait in enumerate(portraits[:2]):
        store.save(pocket.encode_concept(f"p{number}", portrait))
    with running(pocket, store) as (url, service):
        yield url, service, store


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def whole_answer(pocket, store, text, image=None, max_new_tokens=None) -> str:
    """The whole answer the engine gives (`plvmctl ask -v`), on its own."""
    result = make_engine(pocket, store).ask([AskRequest(text, image)], max_new_tokens=max_new_tokens)[0]
    assert result.ok, result.error
    return result.answer


def reference(pocket, store, text, image=None, max_new_tokens=None) -> str:
    """The answer `plvmctl ask` prints: the conclusion of the pocket model, which compares first."""
    return conclusion(whole_answer(pocket, store, text, image, max_new_tokens), pocket.recipe.model.reasoning)


def error_of(response) -> dict:
    """The OpenAI-style error object of a refused request (one readable line, no traceback)."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    message = body["error"]["message"]
    assert message and "\n" not in message and "Traceback" not in message
    return body["error"]


# -- the happy paths -----------------------------------------------------------------------
def test_health_and_models(server, client):
    assert httpx2.get(server[0] + "/health").json()["status"] == "ok"
    assert [model.id for model in client.models.list().data] == ["pocket"]


def test_a_chat_answer_is_the_one_ask_gives_with_usage(server, client, pocket, world):
    _, _, scenes = world
    text = "Is <p0> in this photo?"
    answer = client.chat.completions.create(model="pocket", messages=question(text, scenes[0]))
    assert answer.choices[0].message.content == reference(pocket, server[2], text, scenes[0])
    thought = answer.choices[0].message.model_extra["reasoning_content"]  # the comparison before it
    assert thought and thought + " " + answer.choices[0].message.content == whole_answer(pocket, server[2], text,
                                                                                         scenes[0])
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_text_only_question_and_system_message(server, client, pocket):
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "What is <p1>'s hair color?"}]
    answer = client.chat.completions.create(model="pocket", messages=messages)
    assert answer.choices[0].message.content == reference(pocket, server[2], "What is <p1>'s hair color?")


def test_max_tokens_cuts_the_answer(server, client, pocket, world):
    _, _, scenes = world
    text = "Is <p1> in this photo?"
    answer = client.chat.completions.create(model="pocket", messages=question(text, scenes[1]), max_tokens=3)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 3
    assert answer.choices[0].message.content == reference(pocket, server[2], text, scenes[1], max_new_tokens=3)


def test_a_seed_makes_a_sampled_answer_repeatable(client, world):
    _, _, scenes = world
    ask = dict(model="pocket", messages=question("Is <p0> in this photo?", scenes[2]), temperature=1.5, seed=7)
    first = client.chat.completions.create(**ask).choices[0].message.content
    assert client.chat.completions.create(**ask).choices[0].message.content == first


def test_streaming_gives_the_same_answer_in_pieces(server, client, pocket, world):
    _, _, scenes = world
    text = "Is <p1> in this photo?"
    chunks = list(client.chat.completions.create(model="pocket", messages=question(text, scenes[0]), stream=True,
                                                 stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == reference(pocket, server[2], text, scenes[0])
    thought = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices)
    assert thought + " " + content == whole_answer(pocket, server[2], text, scenes[0])
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_concurrent_async_requests_share_batches_and_keep_their_answers(server, pocket, world):
    _, _, scenes = world
    asks = [(f"Is <p{i % 2}> in this photo?", scenes[i % 3]) for i in range(6)]
    expected = [reference(pocket, server[2], text, scene) for text, scene in asks]
    before = dict(server[1].batcher.counts)

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0) as client:
            answers = await asyncio.gather(*[client.chat.completions.create(model="pocket",
                                                                            messages=question(text, scene))
                                             for text, scene in asks])
        return [answer.choices[0].message.content for answer in answers]

    assert asyncio.run(all_at_once()) == expected
    counts = server[1].batcher.counts
    assert counts["answered"] - before["answered"] == len(asks)
    assert counts["batches"] - before["batches"] < len(asks)  # some requests shared a batch


# -- concepts ------------------------------------------------------------------------------
def test_concepts_add_list_delete(server, world):
    url = server[0] + "/v1/concepts"
    _, portraits, scenes = world
    added = httpx2.post(url, json={"name": "newcomer", "image": data_url(portraits[2])})
    assert added.status_code == 201 and added.json()["id"] == "newcomer"
    assert "newcomer" in server[2]
    assert {c["id"] for c in httpx2.get(url).json()["data"]} == {"p0", "p1", "newcomer"}
    again = httpx2.post(url, json={"name": "newcomer", "image": data_url(portraits[2])})
    assert again.status_code == 409 and error_of(again)["code"] == "concept_exists"
    assert httpx2.post(url, json={"name": "newcomer", "image": data_url(portraits[1]), "force": True}).status_code == 201
    chat = httpx2.post(server[0] + "/v1/chat/completions",
                       json={"messages": question("Is <newcomer> in this photo?", scenes[2])})
    assert chat.status_code == 200
    assert httpx2.delete(url + "/newcomer").json() == {"id": "newcomer", "object": "concept", "deleted": True}
    gone = httpx2.delete(url + "/newcomer")
    assert gone.status_code == 404 and error_of(gone)["code"] == "unknown_concept"
    assert "newcomer" not in server[2]


@pytest.mark.parametrize("body, status, code", [
    ({"name": "bad name", "image": "data:image/png;base64,AAAA"}, 400, "invalid_concept_name"),
    ({"name": "image", "image": "data:image/png;base64,AAAA"}, 400, "invalid_concept_name"),
    ({"name": "someone"}, 400, None),
    ({"name": "someone", "image": "data:image/png;base64,bm90IGFuIGltYWdl"}, 400, "invalid_image"),
])
def test_concepts_refuse_what_encode_refuses(server, body, status, code):
    response = httpx2.post(server[0] + "/v1/concepts", json=body)
    assert response.status_code == status and error_of(response)["code"] == code
    assert "someone" not in server[2]


# -- bad input -----------------------------------------------------------------------------
def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 80, 120)).save(buffer, format="PNG")
    return buffer.getvalue()


def _user(*parts) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}]}


TEXT = {"type": "text", "text": "Is <p0> in this photo?"}
BAD_REQUESTS = {
    "malformed JSON": (b'{"messages": [', 400, "invalid_json"),
    "not an object": (b"[1, 2]", 400, "invalid_json"),
    "no messages": ({"model": "pocket"}, 400, None),
    "empty messages": ({"messages": []}, 400, None),
    "a message without role": ({"messages": [{"content": "hi"}]}, 400, None),
    "last message not the user's": ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, None),
    "no question text": (_user({"type": "image_url", "image_url": {"url": bytes_url(_png(8, 8))}}), 400, None),
    "unknown part type": (_user(TEXT, {"type": "audio", "audio": "x"}), 400, None),
    "unknown concept": ({"messages": [{"role": "user", "content": "Is <nobody> here?"}]}, 400, "unknown_concept"),
    "invalid concept name": ({"messages": [{"role": "user", "content": "Is <" + "a" * 70 + "> here?"}]}, 400,
                             "invalid_concept_name"),
    "reserved concept name": ({"messages": [{"role": "user", "content": "Is <IMAGE> here?"}]}, 400,
                              "invalid_concept_name"),
    "undecodable image": (_user(TEXT, {"type": "image_url", "image_url": {"url": bytes_url(b"not a photo")}}), 400,
                          "invalid_image"),
    "truncated image": (_user(TEXT, {"type": "image_url", "image_url": {"url": bytes_url(_png(64, 64)[:60])}}), 400,
                        "invalid_image"),
    "not base64": (_user(TEXT, {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}), 400,
                   "invalid_image"),
    "too many pixels": (_user(TEXT, {"type": "image_url", "image_url": {"url": bytes_url(_png(6000, 5000))}}), 413,
                        "too_large"),
    "too many bytes": (_user(TEXT, {"type": "image_url",
                                    "image_url": {"url": bytes_url(b"\x89PNG" + bytes(10_000_100))}}), 413,
                       "too_large"),
    "too many images": (_user(TEXT, *[{"type": "image_url", "image_url": {"url": bytes_url(_png(8, 8))}}] * 2), 400,
                        "too_many_images"),
    "a local path without a photo folder": (_user(TEXT, {"type": "image_url", "image_url": {"url": "/etc/passwd"}}),
                                            400, "invalid_image"),
    "huge max_tokens": ({"messages": [{"role": "user", "content": "Hi <p0>"}], "max_tokens": 10 ** 9}, 400, None),
    "max_tokens not a number": ({"messages": [{"role": "user", "content": "Hi <p0>"}], "max_tokens": "9"}, 400, None),
    "temperature out of range": ({"messages": [{"role": "user", "content": "Hi <p0>"}], "temperature": 9}, 400, None),
    "several answers": ({"messages": [{"role": "user", "content": "Hi <p0>"}], "n": 3}, 400, None),
    "unknown model": ({"messages": [{"role": "user", "content": "Hi <p0>"}], "model": "gpt-9"}, 404,
                      "model_not_found"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, case):
    body, status, code = BAD_REQUESTS[case]
    send = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx2.post(server[0] + "/v1/chat/completions", timeout=60, **send)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code
    assert httpx2.get(server[0] + "/health").json()["status"] == "ok"


def test_an_oversized_body_is_refused_before_it_is_read(server):
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 21_000_000}]})
    response = httpx2.post(server[0] + "/v1/chat/completions", content=body, timeout=60)
    assert response.status_code == 413 and error_of(response)["code"] == "too_large"


def test_unknown_routes_are_openai_errors_too(server):
    response = httpx2.get(server[0] + "/v1/nothing")
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.BadRequestError, match="unknown concept <ghost>"):
        client.chat.completions.create(model="pocket", messages=[{"role": "user", "content": "Is <ghost> here?"}])


def test_a_client_that_leaves_mid_stream_frees_its_row(server, world):
    """The model thread is busy; a streaming client reads the first event and hangs up: its
    request is dropped, never run."""
    _, service, _ = server
    _, _, scenes = world
    before = dict(service.batcher.counts)
    release = threading.Event()
    busy = service.batcher.call(release.wait)
    body = {"messages": question("Is <p0> in this photo?", scenes[0]), "stream": True}
    with httpx2.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=60) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ") and json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
    deadline = time.monotonic() + 30
    queued = list(service.batcher._queue.queue)  # the waiting job, to see the hang-up cancel it
    while not queued[0].future.cancelled() and time.monotonic() < deadline:
        time.sleep(0.02)
    release.set()
    busy.result(30)
    counts = service.batcher.counts
    while counts["dropped"] == before["dropped"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert counts["dropped"] - before["dropped"] == 1 and counts["answered"] == before["answered"]


def test_local_paths_only_inside_the_photo_folder(pocket, server, world, tmp_path):
    _, _, scenes = world
    folder = tmp_path / "photos"
    folder.mkdir()
    scenes[0].save(folder / "party.png")
    scenes[1].save(tmp_path / "private.png")
    (folder / "link.png").symlink_to(tmp_path / "private.png")
    text = "Is <p0> in this photo?"
    with running(pocket, server[2], photo_folder=str(folder)) as (url, _):
        def ask(path):
            return httpx2.post(url + "/v1/chat/completions", timeout=60, json=_user(
                {"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": path}}))

        for path in ("party.png", str(folder / "party.png"), (folder / "party.png").as_uri()):
            response = ask(path)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == reference(pocket, server[2], text, scenes[0])
        for path in ("../private.png", str(tmp_path / "private.png"), "link.png", "missing.png", "/etc/passwd"):
            response = ask(path)
            assert response.status_code == 400 and error_of(response)["code"] == "invalid_image", path

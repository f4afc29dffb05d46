"""`plvmctl serve --users`: keys made by `serve add-user`, kept only as scrypt hashes, and each
user's concepts out of every other user's reach (not usable, listable or deletable, not by
guessing names or paths either, and never named in another user's errors)."""

from __future__ import annotations

import asyncio
import json

import httpx2
import openai
import pytest
from click.testing import CliRunner

from plvmctl.cli import main
from plvmctl.engine import AskRequest
from plvmctl.methods import make_engine
from plvmctl.recipe import load_recipe
from plvmctl.runtime import load_runtime
from plvmctl.serve.users import KeyedUsers, add_user, hash_key, key_matches
from plvmctl.store import ConceptStore
from serving import data_url, people, question, running

pytestmark = pytest.mark.usefixtures("one_thread")


def test_add_user_prints_a_key_once_and_keeps_only_its_hash(tmp_path):
    users = tmp_path / "users.json"
    result = CliRunner().invoke(main, ["serve", "add-user", "alice", "--users", str(users)])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert key.startswith("plvm-")
    text = users.read_text()
    assert key not in text and key.split("-", 2)[2] not in text
    record = json.loads(text)["users"]["alice"]
    assert record["key_hash"].startswith("scrypt$") and key_matches(key, record["key_hash"])
    assert (users.stat().st_mode & 0o777) == 0o600
    again = CliRunner().invoke(main, ["serve", "add-user", "alice", "--users", str(users)])
    assert again.exit_code == 1 and "already exists" in again.output
    bad = CliRunner().invoke(main, ["serve", "add-user", "../alice", "--users", str(users)])
    assert bad.exit_code == 1 and "invalid user name" in bad.output


def test_keys_check_against_their_hash_only(tmp_path):
    stored = hash_key("plvm-abc-secret")
    assert key_matches("plvm-abc-secret", stored)
    assert not key_matches("plvm-abc-secreT", stored) and not key_matches("plvm-abc-secret", "nonsense")
    path = tmp_path / "users.json"
    alice = add_user(path, "alice")
    users = KeyedUsers(path, tmp_path / "stores")
    assert users.authenticate(alice).name == "alice"
    assert users.authenticate(alice).store.root == tmp_path / "stores" / "alice"
    assert users.authenticate(alice[:-1] + ("x" if alice[-1] != "x" else "y")) is None
    assert users.authenticate("") is None and users.authenticate("plvm-") is None
    replaced = add_user(path, "alice", replace=True)  # the old key stops working at once
    assert users.authenticate(alice) is None and users.authenticate(replaced).name == "alice"


@pytest.fixture(scope="module")
def pocket():
    return load_runtime(load_recipe("pocket", ["serve.max_wait_ms=150"]), device="cpu")


@pytest.fixture(scope="module")
def world():
    return people(3, seed=11)


@pytest.fixture(scope="module")
def server(pocket, world, tmp_path_factory):
    """Alice and Bob; each has a concept called <pet> (different people) and one of their own."""
    folder = tmp_path_factory.mktemp("users")
    users = folder / "users.json"
    keys = {name: add_user(users, name) for name in ("alice", "bob")}
    _, portraits, _ = world
    stores = {name: ConceptStore(folder / "stores" / name) for name in keys}
    stores["alice"].save(pocket.encode_concept("pet", portraits[0]))
    stores["alice"].save(pocket.encode_concept("secret-friend", portraits[2]))
    stores["bob"].save(pocket.encode_concept("pet", portraits[1]))
    stores["bob"].save(pocket.encode_concept("bobcat", portraits[2]))
    with running(pocket, None, users_file=str(users)) as (url, service):
        yield url, keys, stores, users


def call(server, user, method, path, **kwargs):
    headers = {"Authorization": f"Bearer {server[1][user]}"} if user else {}
    return httpx2.request(method, server[0] + path, headers=headers, timeout=60, **kwargs)


def test_requests_need_a_valid_key(server):
    for headers in ({}, {"Authorization": "Bearer plvm-000000000000-nope"}, {"Authorization": "Basic abc"}):
        response = httpx2.get(server[0] + "/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert call(server, "alice", "GET", "/v1/models").status_code == 200
    assert httpx2.get(server[0] + "/health").status_code == 200  # the health check needs no key


def test_each_user_sees_only_their_own_concepts(server):
    listed = {user: {c["id"] for c in call(server, user, "GET", "/v1/concepts").json()["data"]}
              for user in ("alice", "bob")}
    assert listed == {"alice": {"pet", "secret-friend"}, "bob": {"pet", "bobcat"}}


def test_another_users_concept_cannot_be_used_and_errors_name_only_your_own(server):
    response = call(server, "bob", "POST", "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "Is <secret-friend> here?"}]})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert response.json()["error"]["code"] == "unknown_concept"
    assert "<bobcat>" in message and "<pet>" in message  # bob's own names...
    assert message.count("secret-friend") == 1  # ...and the one he asked about, nothing of alice's


def test_another_users_concept_cannot_be_deleted_even_by_path(server):
    for path in ("/v1/concepts/secret-friend", "/v1/concepts/..%2Falice%2Fsecret-friend",
                 "/v1/concepts/%2E%2E%2Falice%2Fsecret-friend"):
        response = call(server, "bob", "DELETE", path)
        assert response.status_code in (400, 404), (path, response.text)
        assert "alice" not in response.json()["error"]["message"].replace("alice%2F", "")
    assert "secret-friend" in server[2]["alice"]


def test_a_name_both_users_have_means_each_users_own(server, pocket, world):
    """Alice's and Bob's <pet> asked at once: each answer is the one their own store gives."""
    _, _, scenes = world
    asks = [(user, f"Is <pet> in this photo?", scenes[i % 2]) for i, user in enumerate(["alice", "bob"] * 3)]
    expected = [make_engine(pocket, server[2][user]).ask([AskRequest(text, scene)])[0].answer
                for user, text, scene in asks]
    assert expected[0] != expected[1] or expected[2] != expected[3]  # the two <pet>s answer differently

    async def all_at_once():
        clients = {user: openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=key, max_retries=0)
                   for user, key in server[1].items()}
        answers = await asyncio.gather(*[clients[user].chat.completions.create(
            model="pocket", messages=question(text, scene)) for user, text, scene in asks])
        for client in clients.values():
            await client.close()
        return [whole(answer.choices[0].message) for answer in answers]

    assert asyncio.run(all_at_once()) == expected


def whole(message) -> str:
    """The whole answer: the comparison the pocket model makes first, then its conclusion."""
    thought = (message.model_extra or {}).get("reasoning_content")
    return f"{thought} {message.content}" if thought else message.content


def test_a_users_new_concept_lands_in_their_store_only(server, world):
    _, portraits, _ = world
    response = call(server, "bob", "POST", "/v1/concepts", json={"name": "newpal", "image": data_url(portraits[0])})
    assert response.status_code == 201
    assert "newpal" in server[2]["bob"] and "newpal" not in server[2]["alice"]
    assert call(server, "alice", "DELETE", "/v1/concepts/newpal").status_code == 404
    assert "newpal" in server[2]["bob"]


def test_a_user_added_while_serving_can_call_at_once(server):
    key = add_user(server[3], "carol")
    response = httpx2.get(server[0] + "/v1/concepts", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200 and response.json()["data"] == []


def test_without_users_the_server_listens_on_loopback_only():
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "127.0.0.1 only" in result.output

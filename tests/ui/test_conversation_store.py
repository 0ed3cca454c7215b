"""The sidebar's conversation store and its REST API, against a real jupyter server (pytest-jupyter)."""

from __future__ import annotations

import json

import pytest
import tornado.httpclient
from jupyter_server.auth.identity import IdentityProvider, User
from jupyter_server.utils import url_path_join

from workbench.server.conversations import ConversationError, ConversationStore, conversation_handlers

pytest_plugins = ["pytest_jupyter.jupyter_server"]


def conversation(cid: str, title: str, updated: float, text: str = "hello") -> dict:
    return {
        "id": cid, "title": title, "created": 1.0, "updated": updated, "model": "glm-tiny",
        "messages": [{"kind": "user", "id": "u1", "text": text, "context": []}],
    }


# -- the store itself --------------------------------------------------------------------------------------

def test_store_round_trip_lists_newest_first_and_deletes(tmp_path):
    store = ConversationStore(tmp_path)
    store.put("ada", "c-1", conversation("c-1", "first", updated=10))
    store.put("ada", "c-2", conversation("c-2", "second", updated=20, text="思考 ✓"))
    assert [s["id"] for s in store.list("ada")] == ["c-2", "c-1"]
    assert store.list("ada")[0] == {
        "id": "c-2", "title": "second", "created": 1.0, "updated": 20, "model": "glm-tiny", "text": "思考 ✓"
    }
    assert store.get("ada", "c-2")["messages"][0]["text"] == "思考 ✓"
    store.put("ada", "c-1", conversation("c-1", "first, renamed", updated=30))
    assert [s["title"] for s in store.list("ada")] == ["first, renamed", "second"]
    store.delete("ada", "c-1")
    assert [s["id"] for s in store.list("ada")] == ["c-2"]
    with pytest.raises(ConversationError) as missing:
        store.get("ada", "c-1")
    assert missing.value.status == 404


def test_store_keeps_users_apart(tmp_path):
    store = ConversationStore(tmp_path)
    store.put("ada", "c-1", conversation("c-1", "ada's", updated=1))
    store.put("ada/../bob", "c-1", conversation("c-1", "not bob's", updated=1))
    assert store.list("bob") == []
    assert store.get("ada", "c-1")["title"] == "ada's"
    assert store.get("ada/../bob", "c-1")["title"] == "not bob's"
    # every user folder stays inside the root, whatever the name holds
    assert all(p.parent == tmp_path for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    ("cid", "body", "match", "status"),
    [
        ("../etc", conversation("../etc", "x", 1), "Invalid conversation id", 400),
        ("c-1", [1, 2], "JSON object", 400),
        ("c-1", conversation("c-2", "x", 1), "does not match", 400),
        ("c-1", {"id": "c-1", "title": "x"}, "messages", 400),
        ("c-1", {"id": "c-1", "title": 3, "messages": []}, "title", 400),
        ("c-1", conversation("c-1", "x", 1, text="y" * 2000), "larger than", 413),
        ("c-1", conversation("c-1", "x", 1) | {"tree": []}, "'tree' must be an object", 400),
        ("c-1", conversation("c-1", "x", 1) | {"tree": {"nodes": {}, "children": {}}}, "tree.selected", 400),
        ("c-1", conversation("c-1", "x", 1) | {"tree": {"nodes": {}, "children": {"": ["ghost"]}, "selected": {}}},
         "ids of 'tree.nodes'", 400),
        ("c-1", conversation("c-1", "x", 1) | {"tree": {"nodes": {}, "children": {}, "selected": {"": "0"}}},
         "integers", 400),
        ("c-1", conversation("c-1", "x", 1) | {"settings": "hot"}, "'settings' must be an object", 400),
    ],
)
def test_store_refuses_bad_conversations(tmp_path, cid, body, match, status):
    store = ConversationStore(tmp_path, max_bytes=1000)
    with pytest.raises(ConversationError, match=match) as refused:
        store.put("ada", cid, body)
    assert refused.value.status == status


def branched_conversation(cid: str) -> dict:
    """The format since branches: the shown path in ``messages``, every message in ``tree``, and ``settings``."""
    q = {"kind": "user", "id": "u1", "text": "What is 2+2?", "context": []}
    old = {"kind": "assistant", "id": "a1", "content": "5", "reasoning": "", "toolCalls": [], "status": "done"}
    new = {**old, "id": "a2", "content": "4"}
    return {
        "id": cid, "title": "Sums", "titleEdited": True, "created": 1.0, "updated": 2.0, "model": "remote/glm-4.5-air",
        "messages": [q, new],
        "tree": {"nodes": {"u1": q, "a1": old, "a2": new}, "children": {"": ["u1"], "u1": ["a1", "a2"]},
                 "selected": {"": 0, "u1": 1, "a2": -1}},
        "settings": {"model": "remote/glm-4.5-air", "thinkingMode": "off", "temperature": 0.2, "maxTokens": 512},
    }


def test_store_keeps_the_tree_and_settings(tmp_path):
    store = ConversationStore(tmp_path)
    saved = branched_conversation("c-1")
    store.put("ada", "c-1", saved)
    assert store.get("ada", "c-1") == saved  # the store keeps every branch, version and setting as sent
    assert store.list("ada")[0]["text"] == "What is 2+2? 4"  # the shown branch is what search finds


def test_store_reads_conversations_saved_before_the_tree(tmp_path):
    """A file as the store wrote it before branches (no tree, no settings) is listed, read and can be saved on."""
    store = ConversationStore(tmp_path)
    old = conversation("c-old", "old one", updated=5, text="an old question")
    folder = store._user_dir("ada")
    folder.mkdir(parents=True)
    (folder / "c-old.json").write_text(json.dumps(old), encoding="utf-8")
    assert store.list("ada") == [{"id": "c-old", "title": "old one", "created": 1.0, "updated": 5,
                                  "model": "glm-tiny", "text": "an old question"}]
    assert store.get("ada", "c-old") == old
    # the sidebar then saves it in the new format (its one branch as the tree)
    store.put("ada", "c-old", branched_conversation("c-old"))
    assert store.get("ada", "c-old")["tree"]["children"]["u1"] == ["a1", "a2"]


def test_store_caps_the_number_of_conversations(tmp_path):
    store = ConversationStore(tmp_path, max_conversations=2)
    store.put("ada", "a", conversation("a", "a", 1))
    store.put("ada", "b", conversation("b", "b", 2))
    store.put("ada", "b", conversation("b", "b again", 3))  # overwriting is always allowed
    with pytest.raises(ConversationError, match="delete some") as full:
        store.put("ada", "c", conversation("c", "c", 4))
    assert full.value.status == 409


# -- the REST API on a real jupyter server -----------------------------------------------------------------

class HeaderIdentityProvider(IdentityProvider):
    """A multi-user identity provider for the test: the user is named by a header (after token auth)."""

    async def get_user(self, handler):
        user = await super()._get_user(handler)
        name = handler.request.headers.get("X-Test-User")
        return User(name) if user is not None and name else user


@pytest.fixture
def store(jp_serverapp, tmp_path):
    store = ConversationStore(tmp_path / "conversations")
    base_url = jp_serverapp.web_app.settings["base_url"]
    specs = conversation_handlers(store)
    jp_serverapp.web_app.add_handlers(".*$", [(url_path_join(base_url, p), h, kw) for p, h, kw in specs])
    return store


async def test_api_round_trip(store, jp_fetch):
    body = conversation("c-1", "hello there", updated=5)
    saved = await jp_fetch("glm", "api", "conversations", "c-1", method="PUT", body=json.dumps(body))
    assert json.loads(saved.body)["title"] == "hello there"
    listed = json.loads((await jp_fetch("glm", "api", "conversations")).body)
    assert [c["id"] for c in listed["conversations"]] == ["c-1"]
    got = json.loads((await jp_fetch("glm", "api", "conversations", "c-1")).body)
    assert got["messages"] == body["messages"]
    deleted = await jp_fetch("glm", "api", "conversations", "c-1", method="DELETE")
    assert deleted.code == 204
    assert json.loads((await jp_fetch("glm", "api", "conversations")).body) == {"conversations": []}


async def test_api_errors_are_openai_shaped(store, jp_fetch):
    with pytest.raises(tornado.httpclient.HTTPClientError) as missing:
        await jp_fetch("glm", "api", "conversations", "nope")
    assert missing.value.code == 404
    assert "No conversation" in json.loads(missing.value.response.body)["error"]["message"]
    with pytest.raises(tornado.httpclient.HTTPClientError) as bad:
        await jp_fetch("glm", "api", "conversations", "c-1", method="PUT", body="{not json")
    assert bad.value.code == 400
    assert "not valid JSON" in json.loads(bad.value.response.body)["error"]["message"]


async def test_api_needs_authentication(store, jp_fetch):
    with pytest.raises(tornado.httpclient.HTTPClientError) as denied:
        await jp_fetch("glm", "api", "conversations", headers={"Authorization": ""})
    assert denied.value.code == 403


class TestMultiUser:
    """With an identity provider that names users, each user sees only their own conversations."""

    @pytest.fixture
    def jp_server_config(self):
        return {"ServerApp": {"identity_provider_class": HeaderIdentityProvider}}

    async def test_api_is_per_user(self, store, jp_fetch):
        await jp_fetch("glm", "api", "conversations", "c-1", method="PUT",
                       body=json.dumps(conversation("c-1", "ada's", 1)), headers={"X-Test-User": "ada"})
        ada = json.loads((await jp_fetch("glm", "api", "conversations", headers={"X-Test-User": "ada"})).body)
        bob = json.loads((await jp_fetch("glm", "api", "conversations", headers={"X-Test-User": "bob"})).body)
        assert [c["title"] for c in ada["conversations"]] == ["ada's"]
        assert bob["conversations"] == []

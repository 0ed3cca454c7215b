"""Saved chat conversations of the JupyterLab sidebar: a per-user store on the server's disk and its REST API.

Owns the storage (one JSON file per conversation under ``<root>/<user>/``, written atomically) and the
handlers under ``{base_url}glm/api/conversations``:

- ``GET    glm/api/conversations``       -> ``{"conversations": [{id, title, created, updated, model, text}, ...]}``
  newest first (``text``: the first characters of the shown messages, for the sidebar's search)
- ``GET    glm/api/conversations/{id}``  -> the conversation as the sidebar saved it
- ``PUT    glm/api/conversations/{id}``  <- a conversation object (``id`` must match the URL) -> its summary
- ``DELETE glm/api/conversations/{id}``  -> 204

Knows nothing of models or the engine: a conversation is an opaque JSON document to it, checked only for
shape and size. Its format: ``{id, title, created, updated, model, messages}`` (``messages``: the messages the
sidebar shows, one branch), and since branches and versions also ``tree`` (every message: ``{nodes, children,
selected}``, see labextension/src/conversationTree.ts) and ``settings`` (the conversation's model, thinking mode,
temperature, max tokens). Conversations saved before ``tree`` have only ``messages``: they are read as one branch.
The store checks the shape of ``tree`` and ``settings`` where present (and, as every GLM API body, for depth,
huge literals and lone surrogates; a large body is parsed and written off the event loop). Errors are the GLM
API's OpenAI-shaped ones, ``{"error": {"message", "type", "param", "code"}}``, tornado's own (403, 405) included.

Register with ``self.handlers.extend(conversation_handlers(ConversationStore(...)))`` in the server
ExtensionApp's ``initialize_handlers`` (patterns are relative to the server's base_url).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import tornado.web
from jupyter_core.paths import jupyter_data_dir
from jupyter_server.auth.identity import IdentityProvider, PasswordIdentityProvider

from workbench.chat.protocol import APIError, check_json_values, loads_json
from workbench.server.handlers import GLMHandler, check_body_size, off_loop

CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # whole ids only: fullmatch ("abc\n" is not "abc")
SUMMARY_FIELDS = ("id", "title", "created", "updated", "model")
SEARCH_TEXT_CHARS = 2000  # per conversation in the list: enough to find it by a word of its questions and answers


def search_text(data: dict[str, Any]) -> str:
    """The shown messages' text (questions and answers), shortened: what the history's search filters on."""
    parts = []
    for message in data.get("messages") or []:
        if isinstance(message, dict):
            text = message.get("text") if message.get("kind") == "user" else message.get("content")
            if isinstance(text, str) and text:
                parts.append(text)
    return " ".join(" ".join(parts).split())[:SEARCH_TEXT_CHARS]


def check_tree(tree: Any) -> None:
    """The ``tree`` of a conversation: three objects (nodes by id, children lists, selected indices)."""
    if not isinstance(tree, dict):
        raise ConversationError("'tree' must be an object {nodes, children, selected}.", param="tree")
    for key, kind in (("nodes", dict), ("children", dict), ("selected", dict)):
        if not isinstance(tree.get(key), kind):
            raise ConversationError(f"'tree.{key}' must be an object.", param=f"tree.{key}")
    for parent, kids in tree["children"].items():
        if not isinstance(kids, list) or not all(isinstance(k, str) and k in tree["nodes"] for k in kids):
            raise ConversationError(
                f"'tree.children[{parent[:40]!r}]' must list ids of 'tree.nodes'.", param="tree.children")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in tree["selected"].values()):
        raise ConversationError("'tree.selected' must map ids to child indices (integers).", param="tree.selected")


def default_conversations_dir() -> Path:
    """Where conversations live unless the server is configured otherwise (Jupyter's data directory)."""
    return Path(jupyter_data_dir()) / "glm_workbench" / "conversations"


class ConversationError(ValueError):
    """A request the store refuses; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None,
                 code: str = "invalid_value") -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    def api_error(self) -> APIError:
        return APIError(self.status, str(self), param=self.param, code=self.code)


class ConversationStore:
    """One folder per user, one ``{id}.json`` per conversation. Thread-safe enough for one server: each write
    replaces the whole file atomically, and the last write wins."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, max_bytes: int = 8_000_000,
                 max_conversations: int = 1000) -> None:
        self.root = Path(root) if root is not None else default_conversations_dir()
        self.max_bytes = max_bytes
        self.max_conversations = max_conversations

    def _user_dir(self, user: str) -> Path:
        # A readable prefix plus a hash: distinct users never share a folder, whatever characters names hold.
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", user)[:40] or "user"
        digest = hashlib.sha256(user.encode("utf-8")).hexdigest()[:12]
        return self.root / f"{safe}-{digest}"

    def _path(self, user: str, conversation_id: str) -> Path:
        if not CONVERSATION_ID.fullmatch(conversation_id):
            raise ConversationError(
                f"Invalid conversation id {conversation_id[:80]!r}: use 1-64 letters, digits, '-' or '_'.",
                param="conversation_id", code="invalid_conversation_id")
        return self._user_dir(user) / f"{conversation_id}.json"

    def list(self, user: str) -> list[dict[str, Any]]:
        folder = self._user_dir(user)
        if not folder.is_dir():
            return []
        summaries = []
        for path in folder.glob("*.json"):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # a file being replaced, or damaged by hand: skip it rather than fail the list
            if isinstance(data, dict):
                summaries.append({key: data.get(key) for key in SUMMARY_FIELDS} | {"text": search_text(data)})
        summaries.sort(key=lambda s: s.get("updated") or 0, reverse=True)
        return summaries

    def get(self, user: str, conversation_id: str) -> dict[str, Any]:
        path = self._path(user, conversation_id)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConversationError(f"No conversation {conversation_id!r}.", status=404, param="conversation_id",
                                    code="conversation_not_found") from None

    def put(self, user: str, conversation_id: str, data: Any) -> dict[str, Any]:
        path = self._path(user, conversation_id)
        if not isinstance(data, dict):
            raise ConversationError("A conversation must be a JSON object.", code="invalid_json")
        if data.get("id", conversation_id) != conversation_id:
            raise ConversationError(
                f"The body's id {str(data.get('id'))[:80]!r} does not match the URL's {conversation_id!r}.",
                param="id")
        if not isinstance(data.get("messages"), list):
            raise ConversationError("A conversation needs a 'messages' list.", param="messages")
        if not isinstance(data.get("title", ""), str):
            raise ConversationError("'title' must be a string.", param="title")
        if "tree" in data:
            check_tree(data["tree"])
        if not isinstance(data.get("settings", {}), dict):
            raise ConversationError("'settings' must be an object.", param="settings")
        text = json.dumps({**data, "id": conversation_id}, ensure_ascii=False)
        if len(text.encode("utf-8")) > self.max_bytes:
            raise ConversationError(
                f"The conversation is larger than {self.max_bytes} bytes; start a new one.", status=413,
                code="request_too_large")
        folder = path.parent
        folder.mkdir(parents=True, exist_ok=True)
        if not path.exists() and sum(1 for _ in folder.glob("*.json")) >= self.max_conversations:
            raise ConversationError(
                f"You have {self.max_conversations} saved conversations; delete some first.", status=409,
                code="too_many_conversations")
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return {key: data.get(key) for key in SUMMARY_FIELDS} | {"id": conversation_id, "text": search_text(data)}

    def delete(self, user: str, conversation_id: str) -> None:
        path = self._path(user, conversation_id)
        try:
            path.unlink()
        except FileNotFoundError:
            raise ConversationError(f"No conversation {conversation_id!r}.", status=404, param="conversation_id",
                                    code="conversation_not_found") from None


class _ConversationHandler(GLMHandler):
    def initialize(self, store: ConversationStore) -> None:
        self.store = store

    @property
    def storage_user(self) -> str:
        """Whose conversations these are.

        With Jupyter's stock token/password login, a server belongs to one person, but every browser gets a
        fresh anonymous identity: keying by it would lose the history on a new browser. There the server's
        OS user is the owner. Any other identity provider (JupyterHub, custom) names real users: use that.
        """
        if type(self.identity_provider) in (IdentityProvider, PasswordIdentityProvider):
            return getpass.getuser()
        return self.current_user.username

    def _fail(self, error: ConversationError | APIError) -> None:
        self.send_api_error(error.api_error() if isinstance(error, ConversationError) else error)


class ConversationListHandler(_ConversationHandler):
    @tornado.web.authenticated
    def get(self) -> None:
        self.finish(json.dumps({"conversations": self.store.list(self.storage_user)}))


def _parse_conversation(body: bytes) -> Any:
    data = loads_json(body or b"null", what="The conversation")
    check_json_values(data)
    return data


class ConversationItemHandler(_ConversationHandler):
    @tornado.web.authenticated
    def get(self, conversation_id: str) -> None:
        try:
            self.finish(json.dumps(self.store.get(self.storage_user, conversation_id)))
        except ConversationError as error:
            self._fail(error)

    @tornado.web.authenticated
    async def put(self, conversation_id: str) -> None:
        body = self.request.body
        try:
            self.store._path(self.storage_user, conversation_id)  # a bad id is refused before the body is read
            # the stored document may be up to max_bytes; its JSON escapes can make the body somewhat longer
            check_body_size(body, 2 * self.store.max_bytes, what="conversation")
            data = await off_loop(_parse_conversation, body, size=len(body))
            summary = await off_loop(self.store.put, self.storage_user, conversation_id, data, size=len(body))
        except (ConversationError, APIError) as error:
            self._fail(error)
            return
        self.finish(json.dumps(summary | {"saved_at": time.time()}))

    @tornado.web.authenticated
    def delete(self, conversation_id: str) -> None:
        try:
            self.store.delete(self.storage_user, conversation_id)
        except ConversationError as error:
            self._fail(error)
            return
        self.set_status(204)
        self.finish()


def conversation_handlers(store: ConversationStore | None = None) -> list[tuple[str, type, dict[str, Any]]]:
    """Handler specs for an ExtensionApp's ``handlers`` (relative to base_url)."""
    store = store or ConversationStore()
    return [
        (r"glm/api/conversations/?", ConversationListHandler, {"store": store}),
        (r"glm/api/conversations/(?P<conversation_id>[^/]+)", ConversationItemHandler, {"store": store}),
    ]

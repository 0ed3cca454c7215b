"""The Anthropic Messages format, translated to and from the chat layer's own (OpenAI-shaped) requests and chunks.

Owns the translation only, both ways, so that any backend serves clients built for Anthropic's API (the official
`anthropic` client, coding agents that take a base URL and a bearer token):

- `parse_messages_request(body)`: an Anthropic `POST /v1/messages` body -> a `ChatCompletionRequest` (and
  whether the client wants events). System
  prompt (a string or text blocks), content blocks (`text`; `tool_use` and `thinking` in assistant turns;
  `tool_result` in user turns, which become `tool` messages), `tools` (`input_schema` -> `parameters`),
  `tool_choice` (`auto` / `any` / `tool` / `none`), `thinking` (`enabled`, `adaptive`, `between_tools` -> GLM
  thinking on; `disabled` or absent -> off, as Anthropic's API defaults), `stop_sequences`, `temperature`,
  `top_p`, `max_tokens` (required, as there). Hints that concern Anthropic's own service (cache_control,
  service_tier, speed, output_config.effort, ...) are accepted and change nothing. Every problem is an
  `APIError` naming the Anthropic parameter.
- `MessageEvents`: chat completion chunks in, the Anthropic stream's events out (`message_start`,
  `content_block_start` / `_delta` / `_stop` with `thinking_delta`, `text_delta` and `input_json_delta`,
  `message_delta` with `stop_reason` and usage, `message_stop`); `message()` is the whole message the same events
  add up to, which is what a non-streaming request answers, so both answers come from one translation.
- `error_body(error)`: an `APIError` in Anthropic's error shape.

What GLM cannot do is refused, not faked: images and documents, server tools (web search, code execution) and
structured outputs are a 400 naming what to do instead; `top_k` is accepted and ignored (the chat API's sampling
has no top-k); a thinking `budget_tokens` is checked as Anthropic checks it (below max_tokens) and passed on as
the chat API's `thinking.budget_tokens`: the workbench engine closes the thinking there.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from workbench.chat.protocol import (
    APIError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    check_json_values,
    loads_json,
    parse_request,
    validation_error_to_api_error,
)

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                502: "api_error", 503: "overloaded_error", 504: "api_error", 529: "overloaded_error"}
# OpenAI finish reasons -> Anthropic stop reasons (a matched stop string is "stop_sequence", see MessageEvents).
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def error_body(error: APIError) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}}`, Anthropic's shape for every error."""
    kind = _ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


# ---------------------------------------------------------------------------------------------------- requests

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _CacheControlled(_Strict):
    cache_control: dict[str, Any] | None = None  # prompt caching hints: accepted, nothing to do here


class TextBlock(_CacheControlled):
    type: Literal["text"]
    text: str
    citations: list[Any] | None = None


class ToolUseBlock(_CacheControlled):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(_CacheControlled):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock] = ""
    is_error: StrictBool = False


class ThinkingBlock(_Strict):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Strict):
    type: Literal["redacted_thinking"]
    data: str


class UnsupportedBlock(BaseModel):
    """Image and document blocks: recognised, so that the error can say why they cannot be used."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image", "document", "search_result", "server_tool_use", "web_search_tool_result"]


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock
                  | UnsupportedBlock, Field(discriminator="type")]


class InputMessage(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolDefinition(BaseModel):
    """A client tool. Newer hints beside the schema (`strict`, `defer_loading`, `allowed_callers`, ...) are
    accepted and have no effect here; Anthropic's own server tools (a `type` such as `web_search_20250305`)
    are refused by `_openai_tools`."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: StrictBool | None = None


class ThinkingConfig(_Strict):
    """`enabled` (with a budget), `adaptive` and `between_tools` all turn GLM's thinking on (GLM decides how much
    to think, as `adaptive` asks); `disabled` turns it off. `display: "omitted"` keeps the thinking text out of
    the answer (its blocks stay, empty)."""

    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: StrictInt | None = Field(default=None, ge=1)
    display: Literal["summarized", "omitted"] | None = None


class OutputConfig(_Strict):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None  # accepted; GLM has no effort knob
    format: dict[str, Any] | None = None


class _Request(_Strict):
    model: str = Field(min_length=1)
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    # Hints about caching, placement and accounting on Anthropic's side: accepted, nothing to do here.
    cache_control: dict[str, Any] | None = None
    container: Any = None
    diagnostics: Any = None
    inference_geo: str | None = None
    service_tier: str | None = None
    speed: str | None = None
    metadata: dict[str, Any] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None


class MessagesRequest(_Request):
    max_tokens: StrictInt = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: StrictBool = False
    # Sampling: the current `anthropic` client no longer sends these, but older ones and raw HTTP clients do.
    temperature: StrictFloat | StrictInt | None = Field(default=None, ge=0.0, le=1.0)
    top_p: StrictFloat | StrictInt | None = Field(default=None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(default=None, ge=0)


class CountTokensRequest(_Request):
    pass


def _validated(model: type[BaseModel], body: bytes | str | dict[str, Any]) -> Any:
    if isinstance(body, bytes | str):
        body = loads_json(body)
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object with 'model', 'messages' and 'max_tokens'.",
                       code="invalid_json")
    check_json_values(body)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error_to_api_error(exc) from None


def _text(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(block.text for block in content)


def _openai_messages(request: MessagesRequest | CountTokensRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": _text(request.system)})
    for index, message in enumerate(request.messages):
        blocks = [TextBlock(type="text", text=message.content)] if isinstance(message.content, str) \
            else message.content
        where = f"messages[{index}].content"
        for position, block in enumerate(blocks):
            if isinstance(block, UnsupportedBlock):
                raise APIError(400, f"{where}[{position}]: {block.type} blocks are not supported: GLM-4.5 reads "
                                    "text only. Send the text instead.", param=f"{where}[{position}]",
                               code="invalid_value")
            allowed = (TextBlock, ToolResultBlock) if message.role == "user" else \
                (TextBlock, ToolUseBlock, ThinkingBlock, RedactedThinkingBlock)
            if not isinstance(block, allowed):
                raise APIError(400, f"{where}[{position}]: a {block.type} block cannot be in a {message.role} "
                                    "message", param=f"{where}[{position}]", code="invalid_value")
        text = "".join(block.text for block in blocks if isinstance(block, TextBlock))
        if message.role == "user":
            for block in blocks:  # tool results answer the previous assistant turn's calls: they come first
                if isinstance(block, ToolResultBlock):
                    result = _text(block.content)
                    messages.append({"role": "tool", "tool_call_id": block.tool_use_id,
                                     "content": f"Error: {result}" if block.is_error else result})
            if text or not any(isinstance(block, ToolResultBlock) for block in blocks):
                messages.append({"role": "user", "content": text})
        else:
            reply: dict[str, Any] = {"role": "assistant", "content": text or None}
            thinking = "".join(block.thinking for block in blocks if isinstance(block, ThinkingBlock))
            if thinking:
                reply["reasoning_content"] = thinking
            calls = [{"id": block.id, "type": "function",
                      "function": {"name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}}
                     for block in blocks if isinstance(block, ToolUseBlock)]
            if calls:
                reply["tool_calls"] = calls
            messages.append(reply)
    return messages


def _openai_tools(request: MessagesRequest | CountTokensRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for index, tool in enumerate(request.tools or []):
        server_tool = tool.type not in (None, "custom")
        if server_tool or tool.input_schema is None:
            what = f"a server tool ({tool.type})" if server_tool else "a tool without input_schema"
            raise APIError(400, f"tools[{index}] ({tool.name}) is {what}: this server runs only client tools, each "
                                "with a name, a description and an input_schema.", param=f"tools[{index}]",
                           code="invalid_value")
    if request.tools:
        fields["tools"] = [{"type": "function", "function": {
            "name": tool.name, "description": tool.description, "parameters": tool.input_schema}}
            for tool in request.tools]
    if request.output_config is not None and request.output_config.format is not None:
        raise APIError(400, "output_config.format: structured outputs are not supported here (the engine cannot "
                            "constrain its output to a schema); describe the format in the prompt instead.",
                       param="output_config.format", code="invalid_value")
    choice = request.tool_choice
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise APIError(400, "tool_choice.name: required when tool_choice.type is 'tool'",
                               param="tool_choice.name", code="invalid_value")
            fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    return fields


def _thinking(request: MessagesRequest | CountTokensRequest) -> dict[str, Any]:
    enabled = request.thinking is not None and request.thinking.type != "disabled"
    if request.thinking is not None and request.thinking.type == "enabled" and request.thinking.budget_tokens is None:
        raise APIError(400, "thinking.budget_tokens: required when thinking is enabled",
                       param="thinking.budget_tokens", code="invalid_value")
    budget = request.thinking.budget_tokens if enabled and request.thinking is not None else None
    return {"type": "enabled" if enabled else "disabled", **({"budget_tokens": budget} if budget else {})}


class ParsedMessages(NamedTuple):
    request: ChatCompletionRequest  # always a streaming request with usage: both answers are built from chunks
    stream: bool  # whether the client asked for events (else one whole message)
    show_thinking: bool  # False for thinking.display "omitted"


def parse_messages_request(body: bytes | str | dict[str, Any]) -> ParsedMessages:
    """An Anthropic Messages request as the chat layer's request; every problem is a 400 naming its parameter."""
    request: MessagesRequest = _validated(MessagesRequest, body)
    if request.thinking and request.thinking.budget_tokens and request.thinking.budget_tokens >= request.max_tokens:
        raise APIError(400, f"thinking.budget_tokens ({request.thinking.budget_tokens}) must be less than "
                            f"max_tokens ({request.max_tokens}): the answer comes after the thinking.",
                       param="thinking.budget_tokens", code="invalid_value")
    chat: dict[str, Any] = {
        "model": request.model, "messages": _openai_messages(request), "max_tokens": request.max_tokens,
        "stream": True, "stream_options": {"include_usage": True},
        "thinking": _thinking(request), **_openai_tools(request)}
    if request.stop_sequences:
        chat["stop"] = request.stop_sequences
    if request.temperature is not None:
        chat["temperature"] = float(request.temperature)
    if request.top_p is not None:
        chat["top_p"] = float(request.top_p)
    return ParsedMessages(parse_request({key: value for key, value in chat.items() if value is not None}),
                          request.stream, not (request.thinking and request.thinking.display == "omitted"))


def parse_count_tokens_request(body: bytes | str | dict[str, Any]) -> ChatCompletionRequest:
    """A `count_tokens` body as a chat request whose prompt is the one a Messages request would render."""
    request: CountTokensRequest = _validated(CountTokensRequest, body)
    return parse_request({"model": request.model, "messages": _openai_messages(request), "max_tokens": 1,
                          "thinking": _thinking(request), **_openai_tools(request)})


# ---------------------------------------------------------------------------------------------------- responses

def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


class MessageEvents:
    """Chat completion chunks in, Anthropic stream events out; `message()` is what the events add up to.

    Each kind of output is its own content block: thinking (the chunks' `reasoning_content`), text (`content`)
    and one `tool_use` block per tool call (its arguments as `input_json_delta`s). A block ends when another
    kind begins; the message ends with `message_delta` (stop reason, usage) and `message_stop`."""

    def __init__(self, model: str, message_id: str | None = None, show_thinking: bool = True) -> None:
        self.model = model
        self.show_thinking = show_thinking
        self.id = message_id or new_message_id()
        self.blocks: list[dict[str, Any]] = []  # the message's content, as it grows
        self._open: tuple[str, int | None] | None = None  # the open block: ("thinking" | "text" | "tool_use", call)
        self._arguments: dict[int, str] = {}  # tool call index -> its JSON arguments so far
        self._finish_reason: str | None = None
        self._stop_string: str | None = None
        self._usage = {"input_tokens": 0, "output_tokens": 0}
        self._started = False

    def start(self) -> list[tuple[str, dict[str, Any]]]:
        self._started = True
        return [("message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": dict(self._usage)}})]

    def feed(self, chunk: ChatCompletionChunk) -> list[tuple[str, dict[str, Any]]]:
        events = [] if self._started else self.start()
        if chunk.usage is not None:
            self._usage = {"input_tokens": chunk.usage.prompt_tokens, "output_tokens": chunk.usage.completion_tokens}
        for choice in chunk.choices:
            delta = choice.delta
            if delta.reasoning_content:
                events += self._to_block("thinking", None, {"type": "thinking", "thinking": "", "signature": ""})
                if self.show_thinking:
                    self.blocks[-1]["thinking"] += delta.reasoning_content
                    events.append(self._delta({"type": "thinking_delta", "thinking": delta.reasoning_content}))
            if delta.content:
                events += self._to_block("text", None, {"type": "text", "text": ""})
                self.blocks[-1]["text"] += delta.content
                events.append(self._delta({"type": "text_delta", "text": delta.content}))
            for call in delta.tool_calls or []:
                function = call.function
                events += self._to_block("tool_use", call.index, {
                    "type": "tool_use", "id": call.id or f"toolu_{uuid.uuid4().hex[:24]}",
                    "name": function.name if function and function.name else "", "input": {}})
                if function is not None and function.arguments:
                    self._arguments[call.index] = self._arguments.get(call.index, "") + function.arguments
                    events.append(self._delta({"type": "input_json_delta", "partial_json": function.arguments}))
            if choice.finish_reason:
                self._finish_reason = choice.finish_reason
                # a stop token's id (vLLM's int) ends the turn; only a stop string is a stop_sequence
                self._stop_string = choice.stop_reason if isinstance(choice.stop_reason, str) else None
        return events

    def finish(self) -> list[tuple[str, dict[str, Any]]]:
        events = ([] if self._started else self.start()) + self._close_block()
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": self.stop_reason, "stop_sequence": self._stop_string},
                                         "usage": dict(self._usage)}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    @property
    def stop_reason(self) -> str:
        if self._stop_string is not None:
            return "stop_sequence"
        return _STOP_REASONS.get(self._finish_reason or "stop", "end_turn")

    def message(self) -> dict[str, Any]:
        """The whole message (after `finish`): what a non-streaming request answers."""
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": self.blocks,
                "stop_reason": self.stop_reason, "stop_sequence": self._stop_string, "usage": dict(self._usage)}

    def _to_block(self, kind: str, call: int | None, start: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if self._open == (kind, call):
            return []
        events = self._close_block()
        self._open = (kind, call)
        self.blocks.append(start)
        events.append(("content_block_start", {"type": "content_block_start", "index": len(self.blocks) - 1,
                                               "content_block": dict(start)}))
        return events

    def _delta(self, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return ("content_block_delta", {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta})

    def _close_block(self) -> list[tuple[str, dict[str, Any]]]:
        if self._open is None:
            return []
        kind, call = self._open
        if kind == "tool_use":
            arguments = self._arguments.get(call, "") or "{}"
            try:
                self.blocks[-1]["input"] = json.loads(arguments)
            except json.JSONDecodeError:  # the parser only emits calls whose arguments parse; keep the text if not
                self.blocks[-1]["input"] = {"_arguments": arguments}
        self._open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": len(self.blocks) - 1})]

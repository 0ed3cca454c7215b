"""Protocol types of the chat API: OpenAI chat completions with GLM's additions, and OpenAI-shaped errors.

(Over 600 lines: the whole wire contract in one file, to be read against the OpenAI and GLM specs side by side.)

Owns what a request may say and what a response says (GLM45_FORMAT.md section 5). Requests are validated
strictly: an unknown field, a bad role, a message out of order, an invalid tool schema or a sampling value out
of range is an `APIError` naming the offending `param`, which the server sends as a 400. So is a body no valid
request looks like: JSON nested deeper than `MAX_JSON_DEPTH`, an integer literal longer than `MAX_INT_DIGITS`
digits, NaN/Infinity, a lone surrogate (`"\\ud800"`) in any string, more than 4 stop strings or one longer than
`MAX_STOP_CHARS`. Responses are permissive (extra fields allowed) so that a remote endpoint's additions pass
through unchanged.

GLM additions: `thinking: {"type": "enabled" | "disabled", "budget_tokens"?: N}` (absent: the model decides; the
budget is the workbench's: its engine closes the thinking after N tokens, OpenRouter takes it as
`reasoning.max_tokens`, other endpoints have no such knob and think as long as they like), assistant
`reasoning_content`, and the workbench's own `"routing": true`. Accepted for compatibility with clients of other
GLM servers: vLLM/SGLang's `chat_template_kwargs.enable_thinking` and `ignore_eos`, and Z.ai's `do_sample`,
`request_id`, `user_id` (which the `zai-sdk` client sends).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

# --------------------------------------------------------------------------------------------------- errors

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error", 500: "server_error", 502: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error the API answers with, in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"


def _param_path(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as the dotted/indexed path OpenAI names in `param`: `messages[1].content`."""
    path = ""
    for index, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        previous = loc[index - 1] if index else None
        # pydantic puts union branch names in the location: a message's role tag, `str`, `list[TextPart]`, ...
        if (isinstance(previous, int) and part in _ROLES) or not str(part).isidentifier() or part in (
                "str", "list", "dict", "int", "float", "bool", "none"):
            continue
        path += f".{part}" if path else str(part)
    return path or None


def validation_error_to_api_error(exc: ValidationError) -> APIError:
    """The first validation error as a 400 naming its parameter."""
    first = exc.errors(include_url=False)[0]
    param = _param_path(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unrecognized_argument")
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if first.get("type") == "missing":
        message = "required field is missing"
    if first.get("type") == "union_tag_invalid":  # a message with an unknown role
        param = f"{param}.role" if param else "role"
        message = f"role {first['ctx'].get('tag')!r} is not one of system, user, assistant, tool"
    if first.get("type") == "union_tag_not_found":
        param = f"{param}.role" if param else "role"
        message = "each message needs a 'role': system, user, assistant or tool"
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


# ------------------------------------------------------------------------------------------------- messages

_ROLES = ("system", "user", "assistant", "tool")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


def _check_content(value: Any) -> Any:
    # One clear message instead of pydantic's per-branch union errors.
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of text parts [{'type': 'text', 'text': '...'}]")
    for index, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            got = f"type {kind!r}" if kind else f"{type(part).__name__} {part!r:.40}"
            raise ValueError(f"part [{index}] is {got}: only text parts {{'type': 'text', 'text': '...'}} are "
                             "supported (this model reads text only)")
    return value


Content = Annotated[str | list[TextPart], BeforeValidator(_check_content)]


class SystemMessage(_Strict):
    role: Literal["system"]
    content: Content
    name: str | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: Content
    name: str | None = None


class FunctionCall(_Strict):
    name: str = Field(min_length=1)
    # a JSON object serialised as a string, as OpenAI sends it (Hugging Face-style messages hold the object itself)
    arguments: str | dict[str, Any]

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        if isinstance(value, dict):
            return value
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"must be a JSON object serialised as a string; it is not valid JSON ({exc})") from exc
        if not isinstance(decoded, dict):
            raise ValueError("must be a JSON object serialised as a string, e.g. '{\"city\": \"Paris\"}'")
        return value


class ToolCall(_Strict):
    id: str | None = Field(default=None, min_length=1)  # OpenAI clients always send it; HF-style messages may not
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: Content | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_or_calls(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: Content
    tool_call_id: str | None = Field(default=None, min_length=1)


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]

# ---------------------------------------------------------------------------------------------------- tools

_FUNCTION_NAME = r"^[A-Za-z0-9_.\-]{1,64}$"


class FunctionDefinition(_Strict):
    name: str = Field(pattern=_FUNCTION_NAME, description="a-z, A-Z, 0-9, '_', '.', '-'; at most 64 characters")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None

    @field_validator("parameters")
    @classmethod
    def _json_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is None:
            return None
        dialect = schema.get("$schema", "")
        if not isinstance(dialect, str):
            raise ValueError(f"'$schema' must be a string, the URI of a JSON Schema dialect (e.g. "
                             f"'https://json-schema.org/draft/2020-12/schema'), not {type(dialect).__name__}")
        try:
            jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"is not a valid JSON Schema: {exc.message}") from exc
        except (RecursionError, TypeError, AttributeError, LookupError, ValueError) as exc:
            # jsonschema's own failures on schemas its metaschema does not expect
            raise ValueError(f"is not a JSON Schema that can be checked ({type(exc).__name__}: {str(exc)[:200]})"
                             ) from exc
        if schema.get("type", "object") != "object":
            raise ValueError("must be a JSON Schema of type 'object' (the function's named arguments)")
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise ValueError("'properties' must be an object mapping argument names to schemas")
        return schema


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class Thinking(_Strict):
    type: Literal["enabled", "disabled"]
    budget_tokens: StrictInt | None = Field(default=None, ge=1, le=1_000_000,
                                            description="most reasoning tokens before the answer (workbench engine; "
                                                        "OpenRouter's reasoning.max_tokens)")


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class ResponseFormat(_Strict):
    type: Literal["text"] = Field(description="only 'text': this server cannot constrain output to JSON")


class ChatTemplateKwargs(_Strict):
    enable_thinking: StrictBool | None = None


# -------------------------------------------------------------------------------------------------- request


MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_CHARS = 512  # a stop string is a marker, not a document; the engine holds back up to this much text
MAX_JSON_DEPTH = 64  # far beyond any real tool schema; deeper bodies could exhaust recursion in the layers below
MAX_INT_DIGITS = 100  # seeds take 20; longer literals only cost time (Python refuses 4,300 on its own)


class ChatCompletionRequest(_Strict):
    """`POST v1/chat/completions`. Scalars are strict, as the spec's JSON types: `false` is no temperature and
    `"5"` no max_tokens (pydantic would otherwise coerce them)."""

    # characters of every string in the body, counted while it was checked (a cheap size of the prompt)
    _text_chars: int | None = PrivateAttr(default=None)
    # the messages and tools as the template renders them, dumped once (prompt_messages, tools_for_prompt)
    _prompt_messages: list[dict[str, Any]] | None = PrivateAttr(default=None)
    _prompt_tools: list[dict[str, Any]] | None = PrivateAttr(default=None)

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    thinking: Thinking | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(2**63), lt=2**64)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    routing: StrictBool = False
    # compatibility with clients of other GLM servers
    chat_template_kwargs: ChatTemplateKwargs | None = None
    ignore_eos: StrictBool = False  # vLLM's: generate max_tokens tokens whatever the model says (benchmarks, tests)
    response_format: ResponseFormat | None = None  # zai-sdk always sends it (null); only plain text is supported
    do_sample: StrictBool | None = None
    request_id: str | None = None
    user_id: str | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: send several requests for several answers")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        items = [stop] if isinstance(stop, str) else stop or []
        if len(items) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences (got {len(items)})")
        if any(not item for item in items):
            raise ValueError("stop sequences must be non-empty strings")
        longest = max((len(item) for item in items), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"each stop sequence may be at most {MAX_STOP_CHARS} characters long (one is "
                             f"{longest}): stop on a shorter string")
        return stop

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None and (
                self.max_tokens != self.max_completion_tokens):
            raise _FieldError("max_completion_tokens", "max_tokens and max_completion_tokens disagree: send one")
        if self.stream_options is not None and not self.stream:
            raise _FieldError("stream_options", "stream_options is only allowed when stream is true")
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) != len(names):
            raise _FieldError("tools", "two tools have the same function name")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise _FieldError("tool_choice", "tool_choice needs tools: offer at least one in 'tools'")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise _FieldError("tool_choice", f"tool_choice names {self.tool_choice.function.name!r}, which is not "
                                             f"one of the offered tools ({', '.join(names)})")
        _check_message_order(self.messages)
        return self

    # --- what the request means, in one place

    @property
    def enable_thinking(self) -> bool:
        """Thinking on unless switched off (`thinking.type = disabled` or vLLM-style `enable_thinking: false`)."""
        if self.thinking is not None:
            return self.thinking.type == "enabled"
        if self.chat_template_kwargs is not None and self.chat_template_kwargs.enable_thinking is not None:
            return self.chat_template_kwargs.enable_thinking
        return True

    @property
    def thinking_budget(self) -> int | None:
        """Most reasoning tokens, when thinking is on and a budget was given."""
        if self.thinking is None or self.thinking.type != "enabled":
            return None
        return self.thinking.budget_tokens

    @property
    def text_chars(self) -> int:
        """Characters of the request's strings: an upper bound on the prompt's message text, known without
        rendering it (counted by `parse_request`, or here for a request built in code)."""
        if self._text_chars is None:
            self._text_chars = check_json_values(self.model_dump(exclude_none=True))
        return self._text_chars

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def greedy(self) -> bool:
        return self.do_sample is False or self.temperature == 0.0

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def prompt_messages(self) -> list[dict[str, Any]]:
        """The messages as the template renders them (plain dicts), dumped once per request."""
        if self._prompt_messages is None:
            self._prompt_messages = [message.model_dump(exclude_none=True) for message in self.messages]
        return self._prompt_messages

    def tools_for_prompt(self) -> list[dict[str, Any]] | None:
        """Tool definitions as the template renders them (and the output parser reads them), dumped once per
        request; none when tool_choice is 'none'."""
        if not self.tools or self.tool_choice == "none":
            return None
        if self._prompt_tools is None:
            self._prompt_tools = [tool.model_dump(exclude_none=True) for tool in self.tools]
        return self._prompt_tools


class _FieldError(ValueError):
    """A request-level rule broken by one field: the server names `param`."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _check_message_order(messages: list[Any]) -> None:
    open_call_ids: set[str] | None = None  # ids of the last assistant turn's calls, while tool results may follow
    for index, message in enumerate(messages):
        if message.role == "tool":
            if open_call_ids is None:
                raise _FieldError(f"messages[{index}].role", f"messages[{index}] is a tool result, but it does not "
                                  "follow an assistant message with tool_calls (or another tool result)")
            if open_call_ids and message.tool_call_id is not None and message.tool_call_id not in open_call_ids:
                raise _FieldError(f"messages[{index}].tool_call_id",
                                  f"messages[{index}].tool_call_id {message.tool_call_id!r} matches none of the "
                                  f"preceding assistant message's tool_calls ids ({', '.join(sorted(open_call_ids))})")
            continue
        open_call_ids = ({call.id for call in message.tool_calls if call.id is not None}
                         if message.role == "assistant" and message.tool_calls else None)
    if messages[-1].role == "assistant":
        raise _FieldError(f"messages[{len(messages) - 1}].role",
                          "the last message is an assistant message: end with a user, tool or system message, "
                          "the model answers with the next assistant message")


class _LiteralError(ValueError):
    """A JSON literal no request may hold (a huge integer, NaN, Infinity)."""


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _LiteralError(f"an integer literal of {digits} digits (at most {MAX_INT_DIGITS} are accepted)")
    return int(text)


def _parse_constant(name: str) -> Any:
    raise _LiteralError(f"the literal {name}, which is not JSON (numbers must be finite)")


_DECODER = json.JSONDecoder(parse_int=_parse_int, parse_constant=_parse_constant)
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def loads_json(body: bytes | str, what: str = "The request body") -> Any:
    """Strict JSON for request bodies: every problem, deep nesting and huge literals too, is a 400 naming the
    top-level field where it is (`param`)."""
    try:
        text = body.decode(json.detect_encoding(body)) if isinstance(body, bytes) else body
        value, end = _DECODER.raw_decode(text, _WHITESPACE.match(text, 0).end())
        if _WHITESPACE.match(text, end).end() != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
        return value
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"{what} is not valid JSON ({exc}); send a JSON object.", code="invalid_json") from None
    except (RecursionError, _LiteralError) as exc:
        problem = (f"JSON nested more than {MAX_JSON_DEPTH} levels deep" if isinstance(exc, RecursionError)
                   else str(exc))
        param = _top_level_field_at_fault(text)
        where = f" in '{param}'" if param else ""
        raise APIError(400, f"{what} holds {problem}{where}.", param=param, code="invalid_json") from None


def _top_level_field_at_fault(text: str) -> str | None:
    """The top-level field whose value fails to parse (the body's other values are parsed to skip them)."""
    try:
        index = _WHITESPACE.match(text, 0).end()
        if text[index:index + 1] != "{":
            return None
        index += 1
        while True:
            index = _WHITESPACE.match(text, index).end()
            if text[index:index + 1] != '"':
                return None
            key, index = json.decoder.scanstring(text, index + 1)
            index = _WHITESPACE.match(text, index).end()
            if text[index:index + 1] != ":":
                return None
            index = _WHITESPACE.match(text, index + 1).end()
            try:
                _, index = _DECODER.raw_decode(text, index)
            except (RecursionError, _LiteralError):
                return _safe_name(key)
            index = _WHITESPACE.match(text, index).end()
            if text[index:index + 1] != ",":
                return None
            index += 1
    except (ValueError, RecursionError):
        return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _safe_name(key: str) -> str:
    """A key as it can appear in a param path: printable ASCII-safe, and short."""
    return key if key.isidentifier() and key.isascii() else json.dumps(key[:40])


def check_json_values(body: Any) -> int:
    """Refuse what JSON allows but no request may hold: nesting deeper than `MAX_JSON_DEPTH`, lone surrogates
    in any string or key. Returns the characters of all strings (the request's size in text). Iterative: any
    depth is safe to check."""
    chars = 0
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            chars += len(value)
            if _SURROGATE.search(value):
                _surrogate_error(path)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth >= MAX_JSON_DEPTH:
            param = _PATH_PART.match(path).group() if path else None
            raise APIError(400, f"{param or 'The request body'}: JSON nested more than {MAX_JSON_DEPTH} levels "
                                f"deep; flatten it", param=param, code="invalid_value")
        if isinstance(value, dict):
            for key, item in value.items():
                name = _safe_name(key) if isinstance(key, str) else str(key)
                child = f"{path}.{name}" if path else name
                if isinstance(key, str):
                    chars += len(key)
                    if _SURROGATE.search(key):
                        _surrogate_error(child)
                stack.append((item, child, depth + 1))
        else:
            stack.extend((item, f"{path}[{index}]", depth + 1) for index, item in enumerate(value))
    return chars


# a param path cut to its first four parts: `tools[0].function.parameters`, `messages[3].content`
_PATH_PART = re.compile(r"[^.\[]+(?:\[\d+\]|\.[^.\[]+){0,3}")


def _surrogate_error(path: str) -> None:
    param = path or None
    raise APIError(400, f"{param or 'The request body'}: the string holds a lone surrogate (a \\ud800-\\udfff "
                        "escape without its pair), which is not text; send valid Unicode", param=param,
                   code="invalid_value")


def parse_request(body: bytes | str | dict[str, Any]) -> ChatCompletionRequest:
    """Validate a request body; every problem is an `APIError` (400) naming its parameter."""
    if isinstance(body, bytes | str):
        body = loads_json(body)
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object with 'model' and 'messages'.",
                       code="invalid_json")
    chars = check_json_values(body)
    try:
        request = ChatCompletionRequest.model_validate(body)
        request._text_chars = chars
        return request
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            cause = (error.get("ctx") or {}).get("error")
            if isinstance(cause, _FieldError):
                raise APIError(400, str(cause), param=cause.param, code="invalid_value") from None
        raise validation_error_to_api_error(exc) from None


# ------------------------------------------------------------------------------------------------ responses


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionCallOut(_Open):
    name: str
    arguments: str


class ToolCallOut(_Open):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ResponseMessage(_Open):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # what the request cost at its provider's prices: {"input", "output", "total", "currency"} (priced models only)
    cost: Any = None  # an upstream may send its own (OpenRouter: a number); the provider registry replaces it


class Choice(_Open):
    index: int = 0
    message: ResponseMessage
    finish_reason: str | None = None


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletion(_Open):
    id: str = Field(default_factory=new_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class FunctionCallDelta(_Open):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Open):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class Delta(_Open):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(_Open):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    # vLLM's field: the stop string that ended the answer (finish_reason "stop"); vLLM also sends a stop token's id
    stop_reason: str | int | None = None


class ChatCompletionChunk(_Open):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(_Open):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "glm-workbench"
    # the workbench's own fields: provider, provider_kind, dialect, model (the provider's own name), context_length,
    # capabilities, prices, free, state (workbench.chat.providers.ModelEntry.card)
    workbench: dict[str, Any] | None = None


class ModelList(_Open):
    object: Literal["list"] = "list"
    data: list[ModelCard]


SSE_DONE = "[DONE]"  # the last event of an OpenAI-style stream


def sse_data(line: str) -> str | None:
    """The payload of one line of a server-sent-events stream: what follows `data:`, or None for the lines that
    carry none (comments, event names, keep-alives, the blank line between events)."""
    if not line.startswith("data:"):
        return None
    return line[len("data:"):].strip()


def to_json(model: BaseModel) -> str:
    """A response as JSON without null fields (OpenAI clients read an absent field as null)."""
    return model.model_dump_json(exclude_none=True)

"""The chat layer: messages <-> GLM-4.5 prompt (the chat template and the one way to build a prompt), output
parsing, and the backends that generate.

Knows messages, the prompt format and how to parse output; drives the local engine or a remote endpoint
through one `Backend` interface. Knows nothing of HTTP serving (that is `workbench.server`).
"""

from workbench.chat.backends import Backend, LocalBackend, RemoteBackend
from workbench.chat.parser import OutputParser, ParsedCompletion, ParsedToolCall, ParserDelta, parse_completion
from workbench.chat.prompt import prompt_ids, render_prompt
from workbench.chat.protocol import APIError, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, parse_request

__all__ = [
    "APIError", "Backend", "ChatCompletion", "ChatCompletionChunk", "ChatCompletionRequest", "LocalBackend",
    "OutputParser", "ParsedCompletion", "ParsedToolCall", "ParserDelta", "RemoteBackend", "parse_completion",
    "parse_request", "prompt_ids", "render_prompt",
]

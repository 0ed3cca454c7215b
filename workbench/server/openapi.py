"""The OpenAPI 3.1 description of the GLM API (`GET api/openapi.json`), built from the protocol's pydantic models.

Owns the path table; the schemas come from `workbench.chat.protocol`, so the description cannot drift from what
the server validates.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic.json_schema import models_json_schema

from workbench.chat import protocol

_ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


@lru_cache(maxsize=1)
def _schemas() -> dict[str, Any]:
    _, top = models_json_schema(
        [(protocol.ChatCompletionRequest, "validation"), (protocol.ChatCompletion, "serialization"),
         (protocol.ChatCompletionChunk, "serialization"), (protocol.ModelList, "serialization")],
        ref_template="#/components/schemas/{model}")
    schemas = dict(top["$defs"])
    schemas["Error"] = _ERROR_SCHEMA
    schemas["Status"] = {"type": "object", "description": "backend, model, state, device, memory, "
                         "active_requests, queued_requests, recent_tokens_per_second, ...",
                         "required": ["backend", "model", "state"], "additionalProperties": True}
    schemas["RoutingTrace"] = {"type": "object", "description": "expert ids [L][T][K], weights [L][T][K], token "
                               "ids, tokens, layer ids, num_experts, top_k, prompt_len (see workbench.engine.routing)",
                               "required": ["expert_ids", "weights", "token_ids", "layer_ids"],
                               "additionalProperties": True}
    schemas["WebFetchRequest"] = {
        "type": "object", "required": ["url"], "additionalProperties": False,
        "properties": {"url": {"type": "string", "description": "an http or https URL"},
                       "max_chars": {"type": "integer", "minimum": 1, "maximum": 200_000, "default": 20_000,
                                     "description": "longest text to hand back"}}}
    schemas["WebFetchResult"] = {
        "type": "object", "required": ["url", "final_url", "title", "text", "links", "truncated"],
        "properties": {
            "url": {"type": "string"}, "final_url": {"type": "string", "description": "after redirects"},
            "title": {"type": "string"},
            "text": {"type": "string", "description": "the main text as Markdown (HTML pages), or the body as it "
                                                      "is (plain text, JSON, XML)"},
            "links": {"type": "array", "maxItems": 100, "items": {
                "type": "object", "required": ["text", "url"],
                "properties": {"text": {"type": "string"}, "url": {"type": "string"}}}},
            "truncated": {"type": "boolean", "description": "text cut at max_chars, or the body at the server's "
                                                            "web_fetch_max_bytes"},
            "content_type": {"type": "string"}}}
    return schemas


def openapi_spec(base_url: str = "/") -> dict[str, Any]:
    """The description, with paths under `{base_url}glm/`."""
    root = base_url.rstrip("/") + "/glm"
    authenticated = [{"token": []}]
    common_errors = {"403": _error("not authenticated (no or wrong Jupyter token)")}
    return {
        "openapi": "3.1.0",
        "info": {"title": "GLM Workbench API", "version": "1",
                 "description": "OpenAI-compatible chat completions for GLM-4.5 models, with thinking "
                                "(reasoning_content), tool calls and MoE routing traces."},
        "servers": [{"url": root}],
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer",
                                          "description": "the Jupyter server's token (`token <t>` works too)"}},
        },
        "security": authenticated,
        "paths": {
            "/v1/chat/completions": {"post": {
                "operationId": "createChatCompletion", "summary": "A chat completion, whole or streamed (SSE)",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}},
                "responses": {
                    "200": {"description": "the completion (JSON), or `data: {chunk}` events ending in "
                                           "`data: [DONE]` when stream is true",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}},
                                        "text/event-stream": {"schema": {
                                            "$ref": "#/components/schemas/ChatCompletionChunk"}}}},
                    "400": _error("malformed request: bad JSON, roles, message order, tool schema, sampling value, "
                                  "more than 4 stop strings or one over 512 characters, JSON nested over 64 levels, "
                                  "an integer over 100 digits, a lone surrogate, or context too long"),
                    "404": _error("unknown model"),
                    "413": _error("the body is larger than the server's max_request_bytes (8 MiB by default)"),
                    "429": _error("the queue is full: retry after the Retry-After header's seconds"),
                    "500": _error("the engine failed on this request"),
                    "503": _error("no model loaded (see api/status)"),
                    **common_errors,
                }}},
            "/v1/models": {"get": {
                "operationId": "listModels", "summary": "Every model of every provider, as provider/model ids",
                "responses": {"200": {"description": "models", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ModelList"}}}}, **common_errors}}},
            "/api/status": {"get": {
                "operationId": "getStatus", "summary": "Backend, model, device, memory, load, recent tok/s",
                "responses": {"200": {"description": "status", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Status"}}}}, **common_errors}}},
            "/api/count_tokens": {"post": {
                "operationId": "countTokens", "summary": "The tokens a chat request's prompt renders to for its model "
                                                        "(local engines, and workbench or vLLM providers)",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}},
                "responses": {"200": {"description": "{model, prompt_tokens}", "content": {"application/json": {
                    "schema": {"type": "object", "properties": {"model": {"type": "string"},
                                                                "prompt_tokens": {"type": "integer"}}}}}},
                    "400": _error("malformed request, or a provider that cannot count tokens"),
                    "404": _error("unknown model"), **common_errors}}},
            "/api/routing/{completion_id}": {"get": {
                "operationId": "getRoutingTrace", "summary": "Routing trace of a recent completion made with "
                                                             "\"routing\": true (local backend)",
                "parameters": [{"name": "completion_id", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the trace", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/RoutingTrace"}}}},
                    "404": _error("no trace kept under this id"), **common_errors}}},
            "/api/tools/web_fetch": {"post": {
                "operationId": "webFetch", "summary": "A web page's readable text (title, Markdown, links); public "
                                                      "addresses only unless the server allows private ones",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/WebFetchRequest"}}}},
                "responses": {
                    "200": {"description": "the page", "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/WebFetchResult"}}}},
                    "400": _error("bad body, URL or max_chars; a scheme other than http or https"),
                    "403": _error("a loopback, private, link-local or other non-public address (after DNS or a "
                                  "redirect), or not authenticated"),
                    "415": _error("not HTML or text (a PDF, an image, other binaries)"),
                    "502": _error("the page could not be fetched: unresolved, unreachable, an HTTP error, too "
                                  "large, too many redirects"),
                    "504": _error("the fetch took longer than the server's web_fetch_timeout"),
                }}},
            "/api/openapi.json": {"get": {
                "operationId": "getOpenAPI", "summary": "This description",
                "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}},
                              **common_errors}}},
        },
    }

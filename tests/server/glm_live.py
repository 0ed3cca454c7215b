"""Helpers of the server tests: the scripted tiny model (a checkpoint trained in seconds to answer three prompts
with known GLM-4.5 output: reasoning, a tool call, an answer to the tool result) and live `jupyter server`
processes on free loopback ports. Real reasoning and real tool calls come out of the real engine, parser and
HTTP layer: nothing in between is replaced.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from workbench.server.launch import GLMServer, start_server

MODEL = "ckpt"  # the served model id: the checkpoint folder's name

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
TOOLS = [WEATHER_TOOL]
THINK_QUESTION = [{"role": "user", "content": "Say hello."}]
THINK_ANSWER = "\n<think>The user greets me.</think>\nHello!"
TOOL_QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
TOOL_ANSWER = ("\n<think>Need the tool.</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
               "<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>")
TOOL_RESULT_TURN = [
    *TOOL_QUESTION,
    {"role": "assistant", "content": "", "reasoning_content": "Need the tool.", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 2})}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
]
TOOL_RESULT_ANSWER = "\n<think>It is sunny.</think>\nSunny in Paris."
SCRIPTS = [  # (messages, tools, the model's output, stop token)
    (THINK_QUESTION, None, THINK_ANSWER, "<|user|>"),
    (TOOL_QUESTION, TOOLS, TOOL_ANSWER, "<|observation|>"),
    (TOOL_RESULT_TURN, TOOLS, TOOL_RESULT_ANSWER, "<|user|>"),
]


def train_scripted(folder: Path, steps: int = 80, lr: float = 1e-2) -> Path:
    """Overfit the tiny checkpoint in `folder` on SCRIPTS (loss on the answers only) and save it in place."""
    from workbench.chat import render_prompt
    from workbench.engine import Engine
    from workbench.engine.weights import save_checkpoint

    torch.manual_seed(0)
    engine = Engine.from_pretrained(folder, dtype="float32", device="cpu", kernels="torch")
    tokenizer, model = engine.tokenizer, engine.model
    rows: list[tuple[list[int], list[tuple[int, int]]]] = []  # (ids, spans trained on)
    for messages, tools, answer, stop in SCRIPTS:
        prompt = tokenizer.encode(render_prompt(messages, tools))
        seq = prompt + tokenizer.encode(answer) + [tokenizer.token_to_id(stop)]
        rows.append((seq, [(len(prompt), len(seq))]))
    # A conversation whose later turn's prompt starts with an earlier turn's whole sequence trains as one row.
    merged = []
    for seq, spans in rows:
        longer = next((other for other in rows if len(other[0]) > len(seq) and other[0][:len(seq)] == seq), None)
        if longer is not None:
            longer[1].extend(spans)
        else:
            merged.append((seq, spans))
    width = max(len(seq) for seq, _ in merged)
    ids = torch.zeros(len(merged), width, dtype=torch.long)
    mask = torch.zeros(len(merged), width - 1)
    for row, (seq, spans) in enumerate(merged):
        ids[row, :len(seq)] = torch.tensor(seq)
        for start, stop in spans:  # logits at position p predict token p + 1
            mask[row, start - 1:stop - 1] = 1.0
    model.train()
    for param in model.parameters():
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="none")
        loss = (loss * mask.reshape(-1)).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    save_checkpoint(model, folder, dtype=torch.float32)
    return folder


# ------------------------------------------------------------------------------------------ live servers


def start_live_server(tmp: Path, glm_config: dict, env: dict[str, str] | None = None,
                      token: str = "test-token") -> GLMServer:
    """A live server for the tests: one torch thread (the cores are shared)."""
    return start_server(tmp, glm_config, env={"OMP_NUM_THREADS": "1", **(env or {})}, token=token)

"""The sidebar's "Try tools" on the bundled demo model: the request it sends (its prompt, only the tool it names,
read_cells named in tool_choice) is answered with a read_cells call the sidebar can show for approval, whatever
the seed. The bundled model never saw the notebook tools, so asked freely it does not call them (issue 12)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from bench_scripts import load_bench_script

from workbench.chat import LocalBackend, parse_request

SRC = Path(__file__).resolve().parents[2] / "labextension" / "src"


def _sidebar_tools() -> list[dict]:
    """bench/server_load.py's SIDEBAR_TOOLS: the one Python copy of labextension/src/tools.ts's NOTEBOOK_TOOLS, as
    the sidebar sends them (the names are checked against the file below)."""
    return load_bench_script("server_load").SIDEBAR_TOOLS


NOTEBOOK_TOOLS = _sidebar_tools()


def sidebar_tool_demo() -> tuple[str, str]:
    """TOOL_DEMO's prompt and tool, read from chatModel.ts (the test follows the sidebar if they change)."""
    source = (SRC / "chatModel.ts").read_text()
    block = re.search(r"export const TOOL_DEMO = \{(.*?)\} as const;", source, re.DOTALL)
    assert block, "TOOL_DEMO is not in labextension/src/chatModel.ts any more: update this test"
    prompt = re.search(r"prompt: '([^']*)'", block.group(1)).group(1)
    tool = re.search(r"tool: '([^']*)'", block.group(1)).group(1)
    return prompt, tool


def test_the_python_copy_of_the_notebook_tools_matches_the_sidebars():
    source = (SRC / "tools.ts").read_text()
    names = re.findall(r"^\s+name: '(\w+)'", source, re.MULTILINE)
    assert names == [t["function"]["name"] for t in NOTEBOOK_TOOLS]


@pytest.fixture(scope="module")
def bundled_backend():
    import torch

    from workbench.engine import Engine
    from workbench.models import default_model_path

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine.from_pretrained(str(default_model_path()), dtype="float32", device="cpu", cpu_kernels="torch")
    yield LocalBackend(engine, model_id="glm45-air-mini")
    torch.set_num_threads(threads)


@pytest.mark.parametrize("seed", range(6))
def test_try_tools_gets_a_read_cells_call_from_the_bundled_model(bundled_backend, seed):
    prompt, tool = sidebar_tool_demo()
    # the demo sends only the tool it names (chatModel.ts buildRequest)
    offered = [t for t in NOTEBOOK_TOOLS if t["function"]["name"] == tool]
    body = {"model": "glm45-air-mini", "messages": [{"role": "user", "content": prompt}], "tools": offered,
            "tool_choice": {"type": "function", "function": {"name": tool}}, "temperature": 0.6, "seed": seed}

    async def run():
        try:
            return await bundled_backend.complete(parse_request(body))
        finally:
            await bundled_backend.close()

    choice = asyncio.run(run()).choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    assert call.function.name == tool
    assert isinstance(json.loads(call.function.arguments), dict)  # what the sidebar's card shows and runs

"""Server load: does the GLM API batch concurrent clients, and what does HTTP add to the first token?

Measured side by side in one run, against a live `jupyter server` with the extension (local engine):

1. aggregate tokens/s of N concurrent streaming clients against the same N requests one after another
   (target: at least 4x with N = 8): the scheduler should put concurrent requests into shared decode steps;
2. time to the first token through HTTP (a streaming request for one token, until its finish event) against a
   direct `Engine.generate(max_new_tokens=1)` call on the same prompt in this process (target: under 20 ms
   extra): rendering, tokenizing, the scheduler hand-off and server-sent events should cost little;
3. N concurrent clients that send no max_tokens (each may run to the end of the context, and stops where the
   model stops): aggregate tokens/s and the most requests seen decoding at once in api/status (KV blocks are
   taken as sequences grow, so these run together instead of one whole-context reservation at a time);
4. what a routing trace costs: --routing-answers answers one after another as the sidebar sends them (streamed,
   its notebook tools offered, --max-tokens each), alternately with `routing: true` and without; the sidebar asks
   for routing only while a routing view is open (or its keepRouting setting says always), and this says what the
   others save.

The model is --model (default: the bundled model when it is installed, else a random-weight checkpoint of
--preset written to a temporary folder). Requests 1 and 2 use ignore_eos so every client generates exactly --max-tokens.

    python bench/server_load.py [--model PATH] [--preset bench-10m] [--clients 8] [--max-tokens 64] [--device cpu]
                                [--routing-answers 12] [--routing-only]

The last line reads `concurrent_vs_sequential=X.XX ttft_overhead_ms=Y.Y routing_vs_plain=Z.ZZ` (the last: the
server's CPU time of an answer with routing over one without).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import torch

from workbench.chat import render_prompt
from workbench.server.launch import GLMServer, start_server

# The notebook tools the sidebar offers with every answer by default (labextension/src/tools.ts; its test,
# tests/ui/test_tool_demo.py, checks the names against that file and uses this list): a sidebar answer's prompt is
# mostly their definitions.
SIDEBAR_TOOLS = [
    {"type": "function", "function": {
        "name": "read_cells",
        "description": "Read cells of the active notebook: index, type, source and (for code cells) a text summary "
                       "of the outputs.",
        "parameters": {"type": "object", "properties": {
            "start": {"type": "integer", "description": "First cell index to read (0-based). Default 0."},
            "end": {"type": "integer", "description": "One past the last cell index to read. Default: all cells."}}}}},
    {"type": "function", "function": {
        "name": "insert_cell", "description": "Insert a new cell into the active notebook.",
        "parameters": {"type": "object", "properties": {
            "source": {"type": "string", "description": "The text of the new cell."},
            "cell_type": {"type": "string", "enum": ["code", "markdown"], "description": "Default: code."},
            "index": {"type": "integer",
                      "description": "Where the new cell goes (0-based). Default: below the active cell."}},
            "required": ["source"]}}},
    {"type": "function", "function": {
        "name": "edit_cell",
        "description": "Replace the source of a cell of the active notebook (its outputs stay until it runs again).",
        "parameters": {"type": "object", "properties": {
            "index": {"type": "integer", "description": "Index of the cell to edit (0-based)."},
            "source": {"type": "string", "description": "The new text of the cell."}},
            "required": ["index", "source"]}}},
    {"type": "function", "function": {
        "name": "run_cell", "description": "Run a code cell of the active notebook and return its outputs as text.",
        "parameters": {"type": "object", "properties": {
            "index": {"type": "integer", "description": "Index of the cell to run (0-based)."}},
            "required": ["index"]}}},
    {"type": "function", "function": {
        "name": "read_output",
        "description": "Read the outputs of a code cell as text: streams, results, images as a note, and an error "
                       "as its name, value and traceback.",
        "parameters": {"type": "object", "properties": {
            "index": {"type": "integer", "description": "Index of the cell (0-based)."}},
            "required": ["index"]}}},
    {"type": "function", "function": {
        "name": "list_variables",
        "description": "List the variables defined in the active notebook's kernel: name, type and a short preview.",
        "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "web_fetch",
        "description": "Fetch a web page (http or https) and return its title, readable text as Markdown and links.",
        "parameters": {"type": "object", "properties": {
            "url": {"type": "string", "description": "The http(s) URL of the page."}},
            "required": ["url"]}}},
]


def messages_for(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Client {i}: summarise the benefits of mixture-of-experts models."}]


async def stream_one(client: httpx.AsyncClient, server: GLMServer, model: str, i: int, max_tokens: int | None,
                     routing: bool = False, tools: list[dict] | None = None) -> int:
    """One streaming request to its end; returns the completion tokens the server counted. Without max_tokens the
    request runs until the model stops (or the context is full), as a chat client's default does."""
    body = {"model": model, "messages": messages_for(i), "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if routing:
        body["routing"] = True
    if tools:
        body["tools"] = tools
    if max_tokens is not None:
        body.update(max_tokens=max_tokens, ignore_eos=True)
    tokens = 0
    async with client.stream("POST", f"{server.api}/chat/completions", json=body, headers=server.headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"request {i} failed: {r.status_code} {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"request {i} failed mid-stream: {chunk['error']}")
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return tokens


async def throughput(server: GLMServer, model: str, clients: int, max_tokens: int) -> tuple[float, float]:
    """(sequential tok/s, concurrent tok/s) for the same `clients` requests."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients * 2)) as client:
        await stream_one(client, server, model, 0, 4)  # warm-up
        start = time.perf_counter()
        sequential_tokens = 0
        for i in range(clients):
            sequential_tokens += await stream_one(client, server, model, i, max_tokens)
        sequential = sequential_tokens / (time.perf_counter() - start)
        start = time.perf_counter()
        counts = await asyncio.gather(*[stream_one(client, server, model, i, max_tokens) for i in range(clients)])
        concurrent = sum(counts) / (time.perf_counter() - start)
    expected = clients * max_tokens
    if sequential_tokens != expected or sum(counts) != expected:
        raise RuntimeError(f"token counts are off: sequential {sequential_tokens}, concurrent {sum(counts)}, "
                           f"expected {expected} each")
    return sequential, concurrent


async def open_ended(server: GLMServer, model: str, clients: int) -> tuple[float, int, int]:
    """(aggregate tok/s, completion tokens, most requests decoding at once) of `clients` concurrent requests that
    send no max_tokens."""
    most_running, done = 0, asyncio.Event()

    async def watch(client: httpx.AsyncClient) -> None:
        nonlocal most_running
        while not done.is_set():
            status = (await client.get(f"{server.url}/glm/api/status", headers=server.headers)).json()
            most_running = max(most_running, status["active_requests"])
            await asyncio.sleep(0.05)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients * 2)) as client:
        watcher = asyncio.create_task(watch(client))
        start = time.perf_counter()
        counts = await asyncio.gather(*[stream_one(client, server, model, i, None) for i in range(clients)])
        elapsed = time.perf_counter() - start
        done.set()
        await watcher
    return sum(counts) / elapsed, sum(counts), most_running


async def routing_cost(server: GLMServer, model: str, answers: int, max_tokens: int) -> dict[bool, tuple[float, float]]:
    """{routing: (median wall seconds, mean server CPU seconds)} of one sidebar answer (streamed, `max_tokens`
    tokens, the sidebar's notebook tools offered) with `routing: true` and without, alternated answer by answer so
    that both see the same machine. The server process's CPU time is what the answer cost it, much less moved than
    wall time by other processes on a busy machine."""
    server_process = psutil.Process(server.process.pid)
    times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    async with httpx.AsyncClient(timeout=600) as client:
        await stream_one(client, server, model, 0, 4, routing=True)  # warm-up
        for i in range(2 * answers):
            routing = i % 2 == 0
            cpu = sum(server_process.cpu_times()[:2])
            start = time.perf_counter()
            tokens = await stream_one(client, server, model, i // 2, max_tokens, routing=routing, tools=SIDEBAR_TOOLS)
            times[routing].append((time.perf_counter() - start, sum(server_process.cpu_times()[:2]) - cpu))
            if tokens != max_tokens:
                raise RuntimeError(f"answer {i} has {tokens} tokens, not {max_tokens}")
    # CPU time comes in clock ticks (10 ms): its mean over the answers, not a median of ticks, resolves the cost.
    return {flag: (statistics.median(w for w, _ in runs), statistics.fmean(c for _, c in runs))
            for flag, runs in times.items()}


def first_token_ms(server: GLMServer, model: str, model_path: Path, device: str, runs: int) -> tuple[float, float]:
    """Median ms to the first token via HTTP (a one-token streaming request, until its finish event) and via a
    direct `Engine.generate(max_new_tokens=1)` in this process on the same prompt, alternated run by run so that
    both see the same machine (the server's engine is idle during the direct calls)."""
    from workbench.engine import Engine

    engine = Engine.from_pretrained(model_path, dtype="float32" if device == "cpu" else "bfloat16", device=device)
    ids = engine.tokenizer.encode(render_prompt(messages_for(0), template=engine.tokenizer.chat_template))
    body = {"model": model, "messages": messages_for(0), "max_tokens": 1, "temperature": 0, "ignore_eos": True,
            "stream": True}
    http_times, direct_times = [], []
    with httpx.Client(timeout=120, headers=server.headers) as client:
        for run in range(runs + 2):
            start = time.perf_counter()
            with client.stream("POST", f"{server.api}/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if '"finish_reason"' in line:
                        http_ms = (time.perf_counter() - start) * 1000
                        break
                else:
                    raise RuntimeError(f"no finish event: {response.status_code}")
            start = time.perf_counter()
            engine.generate(ids, max_new_tokens=1, temperature=0, stop_token_ids=[])
            direct_ms = (time.perf_counter() - start) * 1000
            if run >= 2:  # two warm-up rounds
                http_times.append(http_ms)
                direct_times.append(direct_ms)
    return statistics.median(http_times), statistics.median(direct_times)


def default_model(preset: str, workdir: Path) -> Path:
    try:
        from workbench.models import default_model_path

        return default_model_path()
    except (ImportError, FileNotFoundError):
        from workbench.engine.testing import write_tiny_checkpoint

        print(f"(no bundled model: using a random-weight '{preset}' checkpoint)")
        return write_tiny_checkpoint(workdir / "model", preset, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: bundled model, else --preset)")
    parser.add_argument("--preset", default="bench-10m", help="preset of the random checkpoint when no model")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ttft-runs", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (server and direct engine)")
    parser.add_argument("--routing-answers", type=int, default=12,
                        help="answers timed with routing and as many without (section 4)")
    parser.add_argument("--routing-only", action="store_true", help="run section 4 alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="glm-server-load-") as tmp:
        workdir = Path(tmp)
        model_path = args.model or default_model(args.preset, workdir)
        server = start_server(workdir / "server", {
            "model_path": str(model_path), "device": args.device, "max_concurrent_sequences": args.clients,
            "max_queued_requests": args.clients}, env={"OMP_NUM_THREADS": str(args.threads)}, log_level="WARN")
        try:
            status = server.status()
            if status["state"] != "ready":
                raise RuntimeError(f"the server did not load the model: {status.get('message')}")
            model = status["model"]
            print(f"model {model_path} on {status['device']} ({status['dtype']}, kernels={status['kernels']}), "
                  f"{args.clients} clients x {args.max_tokens} tokens")
            if not args.routing_only:
                sequential, concurrent = asyncio.run(throughput(server, model, args.clients, args.max_tokens))
                open_rate, open_tokens, open_running = asyncio.run(open_ended(server, model, args.clients))
                http_ms, direct_ms = first_token_ms(server, model, model_path, args.device, args.ttft_runs)
            routing = asyncio.run(routing_cost(server, model, args.routing_answers, args.max_tokens))
        finally:
            server.stop()

    (routed_wall, routed_cpu), (plain_wall, plain_cpu) = routing[True], routing[False]
    routing_line = (f"routing      {routed_wall * 1000:9.1f} ms an answer with routing: true, {plain_wall * 1000:.1f} "
                    f"ms without; server CPU {routed_cpu * 1000:.1f} ms against {plain_cpu * 1000:.1f} ms "
                    f"({args.max_tokens} tokens; {args.routing_answers} answers each: median wall time, mean CPU time)")
    if args.routing_only:
        print(routing_line)
        print(f"routing_vs_plain={routed_cpu / plain_cpu:.2f}")
        return
    ratio = concurrent / sequential
    overhead = http_ms - direct_ms
    print(f"sequential   {sequential:9.1f} tok/s  ({args.clients} requests one after another)")
    print(f"concurrent   {concurrent:9.1f} tok/s  ({args.clients} streaming clients at once)   target >= 4x")
    print(f"no max_tokens {open_rate:8.1f} tok/s  ({args.clients} clients at once, {open_tokens} tokens; at most "
          f"{open_running} decoding together)")
    print(f"first token  {http_ms:9.1f} ms via HTTP, {direct_ms:.1f} ms direct (median of {args.ttft_runs})   "
          "target < 20 ms extra")
    print(routing_line)
    print(f"concurrent_vs_sequential={ratio:.2f} ttft_overhead_ms={overhead:.1f} "
          f"routing_vs_plain={routed_cpu / plain_cpu:.2f}")


if __name__ == "__main__":
    main()

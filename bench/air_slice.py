"""The benchmark at real width: our engine against llama.cpp on an "Air-width slice" of GLM-4.5-Air.

The slice has GLM-4.5-Air's exact config (hidden 4096, 96 heads, 8 kv heads, head_dim 128, 128 routed experts
top-8 of width 1408, one shared expert, dense width 10944, vocab 151,552, partial rotary 0.5, qkv bias) and few
layers (`--layers 1+2`: one dense and two MoE layers, ~6.2B parameters, 12.4 GB in bf16; `1+1`: ~7.7 GB), with
random weights at the real model's scale (normal, std 0.02; norms near 1). It is written once under `--workdir`
as a Hugging Face checkpoint (bf16) and, with `python -m workbench export-gguf`, as GGUF F16, Q8_0 and Q4_K.

Contenders: ours bf16 / int8 / int4 (`Engine.from_pretrained(path, dtype="bfloat16", quantize=None|"int8"|
"int4")`) against llama.cpp F16 / Q8_0 / Q4_K (`llama_cpp`, from the `bench` extra). Each is measured in its own
process, one at a time (a contender holds up to the slice's size in memory), in interleaved rounds: every round
loads each contender in turn (the order rotates) and measures batch-1 decode of `--decode-tokens` tokens and a
`--prefill-tokens` prefill at each of `--threads`; the table shows medians over rounds. For each contender it
also gives the bytes of weights read per token (attention, dense and shared MLPs, 8 of the 128 experts, the
router and the lm_head; one row of the embedding), counted from the loaded model or the GGUF's tensor table,
and the decode's achieved GB/s against this machine's memory bandwidth, measured first (a 1 GiB torch read and
copy at each thread count). The last line (at the largest thread count):

    decode_vs_llamacpp_q8=X decode_vs_llamacpp_q4=Y prefill_vs_llamacpp_q4=Z

(ours int8 / llama.cpp Q8_0 decode, ours int4 / llama.cpp Q4_K decode, ours int4 / llama.cpp Q4_K prefill;
`nan` where a side could not run). Targets: X >= 1.0, Y >= 1.0, Z >= 1.5, int4 decode >= 70% of bandwidth.

    pip install -e '.[bench]'     # builds llama-cpp-python from source: the first build takes ~15 minutes on
                                  # 2 cores. On an Intel CPU with AMX build it without the AMX flags (a native
                                  # build dies with SIGILL in its AMX Q8_0 kernel, an open upstream bug):
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AMX_TILE=OFF \
        -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install -e '.[bench]'
    python bench/air_slice.py [--layers 1+2] [--workdir DIR] [--threads 1,2] [--rounds 3]

Without `llama_cpp` (or without the GGUF exporter) the llama.cpp rows say why they are missing and ours still run.
A `--workdir` you name is kept (a second run reuses the files it finds complete there); the default, a
temporary folder, is deleted at the end. Disk: the 1+2 slice takes ~35 GB in all four files, 1+1 ~22 GB.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.engine.config import GLMConfig

OURS = {"ours bf16": None, "ours int8": "int8", "ours int4": "int4"}
LLAMA = {"llama.cpp F16": "f16", "llama.cpp Q8_0": "q8_0", "llama.cpp Q4_K": "q4_k"}
CONTENDERS = [*OURS, *LLAMA]
# The pairs the last line compares: (ours, llama.cpp), each of the same bits per weight or near it.
PAIRS = {"bf16": ("ours bf16", "llama.cpp F16"), "q8": ("ours int8", "llama.cpp Q8_0"),
         "q4": ("ours int4", "llama.cpp Q4_K")}
TARGETS = {"decode_vs_llamacpp_q8": 1.0, "decode_vs_llamacpp_q4": 1.0, "prefill_vs_llamacpp_q4": 1.5,
           "int4_decode_bandwidth_pct": 70.0}
WEIGHT_STD = 0.02  # GLM-4.5's initializer_range, and the spread of its trained projection weights
SHARD_BYTES = 1 << 30
PROMPT_IDS = (100, 4000)  # prompt token ids are drawn from here: real tokens of the slice's tokenizer


# --- the slice ----------------------------------------------------------------------------------------------
def parse_layers(text: str) -> tuple[int, int]:
    """'1+2' -> (1 dense, 2 MoE)."""
    try:
        dense, moe = (int(part) for part in text.split("+"))
    except ValueError:
        raise SystemExit(f"--layers {text!r}: give DENSE+MOE layer counts, e.g. 1+2 or 1+1") from None
    if dense < 0 or moe < 1:
        raise SystemExit(f"--layers {text!r}: need at least one MoE layer and no negative count")
    return dense, moe


def slice_config(dense: int, moe: int, shape: str = "air") -> GLMConfig:
    """GLM-4.5-Air's config with `dense` + `moe` layers (no multi-token-prediction layer). `shape="tiny"` keeps
    the structure at test size (the script's whole path in seconds)."""
    preset = "glm-4.5-air" if shape == "air" else "tiny"
    return GLMConfig.preset(preset, num_hidden_layers=dense + moe, first_k_dense_replace=dense,
                            num_nextn_predict_layers=0, max_position_embeddings=4096)


def slice_tensors(config: GLMConfig) -> list[tuple[str, tuple[int, ...], torch.dtype, str]]:
    """(Hugging Face name, shape, dtype, kind) of every tensor of the checkpoint, in file order; kind is how its
    random values are drawn: 'weight', 'norm', 'bias' or 'correction'."""
    d, hd = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    bf16, fp32 = torch.bfloat16, torch.float32
    out = [("model.embed_tokens.weight", (config.vocab_size, d), bf16, "weight")]
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (d,), bf16, "norm"),
                (p + "post_attention_layernorm.weight", (d,), bf16, "norm")]
        for name, rows in (("q", q), ("k", kv), ("v", kv)):
            out.append((p + f"self_attn.{name}_proj.weight", (rows, d), bf16, "weight"))
            if config.attention_bias:
                out.append((p + f"self_attn.{name}_proj.bias", (rows,), bf16, "bias"))
        out.append((p + "self_attn.o_proj.weight", (d, q), bf16, "weight"))
        if config.use_qk_norm:
            out += [(p + "self_attn.q_norm.weight", (hd,), bf16, "norm"),
                    (p + "self_attn.k_norm.weight", (hd,), bf16, "norm")]

        def mlp(prefix: str, width: int) -> list:
            return [(prefix + "gate_proj.weight", (width, d), bf16, "weight"),
                    (prefix + "up_proj.weight", (width, d), bf16, "weight"),
                    (prefix + "down_proj.weight", (d, width), bf16, "weight")]

        if not config.is_moe_layer(layer):
            out += mlp(p + "mlp.", config.intermediate_size)
            continue
        # The router stays fp32 in real checkpoints too: it decides discrete expert choices.
        out += [(p + "mlp.gate.weight", (config.n_routed_experts, d), fp32, "weight"),
                (p + "mlp.gate.e_score_correction_bias", (config.n_routed_experts,), fp32, "correction")]
        for expert in range(config.n_routed_experts):
            out += mlp(p + f"mlp.experts.{expert}.", config.moe_intermediate_size)
        out += mlp(p + "mlp.shared_experts.", config.moe_intermediate_size * config.n_shared_experts)
    out += [("model.norm.weight", (d,), bf16, "norm"), ("lm_head.weight", (config.vocab_size, d), bf16, "weight")]
    return out


def _random(shape, dtype, kind: str, generator: torch.Generator, std: float) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype)
    if kind == "norm":  # trained RMSNorm gains sit near 1
        return tensor.normal_(1.0, 0.05, generator=generator)
    if kind == "correction":
        return tensor.normal_(0.0, 0.05, generator=generator)
    return tensor.normal_(0.0, std, generator=generator)  # weights and the q/k/v biases


def write_slice(folder: str | Path, config: GLMConfig, seed: int = 0, std: float = WEIGHT_STD,
                shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a random-weight checkpoint of `config` in the Hugging Face layout the engine loads (config.json,
    sharded model.safetensors with its index, the test tokenizer), streaming: at most one shard in memory.

    Random weights need no model object: a 1+2 Air slice is 12 GB in bf16, and building it as a model first
    (workbench.engine.testing.write_tiny_checkpoint) would hold it in fp32 twice over."""
    from safetensors.torch import save_file

    from workbench.engine.testing import build_tokenizer, write_tokenizer_files

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    specs = slice_tensors(config)
    shards: list[list[int]] = [[]]  # spec indices per shard, cut at shard_bytes
    size = 0
    for i, (_, shape, dtype, _) in enumerate(specs):
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for number, members in enumerate(shards, 1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {specs[i][0]: _random(specs[i][1], specs[i][2], specs[i][3], generator, std) for i in members}
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file_name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config_dict = {**config.to_dict(), "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    write_tokenizer_files(folder, build_tokenizer(min(config.vocab_size, 4096)))
    return folder


def export_gguf(checkpoint: Path, out: Path, gguf_type: str) -> str | None:
    """`python -m workbench export-gguf CHECKPOINT OUT --type T` in a child process; None, or why it failed."""
    partial = out.with_name(out.name + ".partial")
    command = [sys.executable, "-m", "workbench", "export-gguf", str(checkpoint), str(partial), "--type", gguf_type]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        lines = (done.stderr or done.stdout).strip().splitlines()
        return f"export-gguf --type {gguf_type} failed: {lines[-1] if lines else f'exit {done.returncode}'}"
    partial.rename(out)
    return None


# --- the machine ----------------------------------------------------------------------------------------------
def cpu_description() -> dict[str, str]:
    """The CPU's model name and the flags that decide which kernels run (from /proc/cpuinfo on Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
              "amx_tile", "amx_int8", "amx_bf16"]
    return {"model": model, "flags": " ".join(f for f in wanted if f in flags), "cores": str(os.cpu_count())}


def measure_bandwidth(threads: int, nbytes: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
    """This machine's memory bandwidth in GB/s at `threads` torch threads, best of `repeats`: 'read' sums a
    buffer (bytes read / s: what a decode step does to its weights), 'copy' copies one (bytes read + written / s,
    STREAM's convention). The buffer is far larger than any cache, and in huge pages where the OS gives them, as
    the engine's weights are (workbench.engine.huge_pages): 4 KiB pages measure the TLB as much as the memory."""
    from workbench.engine import huge_pages

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        source = huge_pages.empty((nbytes // 4,), torch.float32).fill_(1.0)
        target = huge_pages.empty((nbytes // 4,), torch.float32)
        best = {"read": 0.0, "copy": 0.0}
        for _ in range(repeats):
            start = time.perf_counter()
            source.sum()
            best["read"] = max(best["read"], nbytes / (time.perf_counter() - start) / 1e9)
            start = time.perf_counter()
            target.copy_(source)
            best["copy"] = max(best["copy"], 2 * nbytes / (time.perf_counter() - start) / 1e9)
        del source, target
        return best
    finally:
        torch.set_num_threads(previous)


# --- bytes of weights per token ---------------------------------------------------------------------------------
def _tensors_in(value, seen: set[int], depth: int = 0):
    """Tensors held by a module attribute: a tensor, a tuple/list of them, or an object (a quantized weight)
    whose fields are tensors. `seen` keeps object ids so nothing is visited twice."""
    if depth > 3 or id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _tensors_in(item, seen, depth + 1)
    elif hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module | type) and not callable(value):
        for item in vars(value).values():
            yield from _tensors_in(item, seen, depth + 1)


def engine_bytes_per_token(model: torch.nn.Module, config: GLMConfig) -> int:
    """Bytes of weights one batch-1 decode step reads from the loaded model: every tensor once (views of one
    storage count once), routed experts' tensors at top_k / n_routed_experts of their size, the embedding at
    one row. Quantized weights count their packed bytes and scales, whatever object holds them."""
    storages: dict[int, tuple[int, float]] = {}  # storage address -> (bytes, fraction read per token)
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if module_name.endswith("embed_tokens"):
            fraction = 1 / config.vocab_size
        elif module_name.endswith("mlp.experts"):
            fraction = config.num_experts_per_tok / config.n_routed_experts
        else:
            fraction = 1.0
        values = [*module._parameters.values(), *module._buffers.values(),
                  *(v for k, v in vars(module).items() if not k.startswith("_"))]
        for value in values:
            if value is None:
                continue
            for tensor in _tensors_in(value, seen):
                if tensor.device.type == "meta" or not tensor.is_floating_point() and tensor.dtype not in (
                        torch.int8, torch.uint8, torch.int32):
                    continue
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key not in storages:
                    storages[key] = (storage.nbytes(), fraction)
    return int(sum(nbytes * fraction for nbytes, fraction in storages.values()))


def gguf_bytes_per_token(path: Path) -> int:
    """The same count from a GGUF's tensor table: `*_exps` tensors at top_k / experts, token_embd at one row."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in reader.fields.values()}

    def number(suffix: str) -> int:
        field = next(f for name, f in fields.items() if name.endswith(suffix))
        return int(field.parts[field.data[0]][0])

    top_k, experts = number(".expert_used_count"), number(".expert_count")
    total = 0.0
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            total += tensor.n_bytes / int(tensor.shape[-1])  # gguf lists dims innermost first: rows are last
        elif "_exps." in tensor.name:
            total += tensor.n_bytes * top_k / experts
        else:
            total += tensor.n_bytes
    return int(total)


# --- one contender in one process -------------------------------------------------------------------------------
@dataclass
class Job:
    contender: str
    checkpoint: Path
    gguf: Path | None
    threads: list[int]
    decode_tokens: int
    prefill_tokens: int
    seed: int

    def prompts(self, vocab: int) -> tuple[list[int], list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        low, high = PROMPT_IDS[0], min(PROMPT_IDS[1], vocab)
        short = torch.randint(low, high, (16,), generator=generator).tolist()
        long = torch.randint(low, high, (self.prefill_tokens,), generator=generator).tolist()
        return short, long


def run_ours(job: Job) -> dict:
    from workbench.engine import Engine

    quantize = OURS[job.contender]
    start = time.perf_counter()
    kwargs = {} if quantize is None else {"quantize": quantize}
    engine = Engine.from_pretrained(job.checkpoint, dtype="bfloat16", max_batch_size=1,
                                    cache_tokens=job.prefill_tokens + job.decode_tokens + 64, **kwargs)
    load_seconds = time.perf_counter() - start
    short, long = job.prompts(engine.config.vocab_size)

    def decode(n: int) -> tuple[float, list[int]]:
        result = engine.generate(short, max_new_tokens=n, temperature=0.0, stop_token_ids=[])
        return result.decode_tokens_per_second, list(result.token_ids)

    def prefill(tokens: list[int]) -> float:
        start = time.perf_counter()
        engine.generate(tokens, max_new_tokens=1, temperature=0.0, stop_token_ids=[])
        return len(tokens) / (time.perf_counter() - start)

    torch.set_num_threads(job.threads[0])
    decode(4)  # warm-up: first touches of every weight page, the kernels' one-time set-up
    prefill(long[:64])
    figures = {}
    for threads in job.threads:
        torch.set_num_threads(threads)
        rate, tokens = decode(job.decode_tokens)
        figures[str(threads)] = {"decode": rate, "prefill": prefill(long)}
    # The engine's own count where it has one (Engine.weights, with the integer formats); the same rule otherwise.
    summary = getattr(engine, "weights", None)
    if isinstance(summary, dict) and "bytes_per_token" in summary:
        bytes_per_token = summary["bytes_per_token"]
        weight_format = f"{summary['format']}, {summary['bits_per_weight']} bits per matrix weight"
    else:
        bytes_per_token, weight_format = engine_bytes_per_token(engine.model, engine.config), "bfloat16"
    from glm_kernels import quant_linear

    prefill_gemm = "bf16 GEMM" if quant_linear.bf16_gemm_min_rows(torch.bfloat16) else "integer kernels"
    kernels = (f"ours {weight_format}, cpu kernels {engine.cpu_kernels}, isa {quant_linear.isa()}, quantized "
               f"prefill products: {prefill_gemm}")
    return {"load_seconds": load_seconds, "bytes_per_token": bytes_per_token, "figures": figures,
            "tokens": tokens[:16], "kernels": kernels}


class LlamaCpp:
    """A GGUF loaded by llama.cpp (`llama_cpp`, the `bench` extra), driven through its C API one batch at a time:
    greedy decoding by argmax of the last row's logits, no sampler chain, so the timed work is llama.cpp's
    forward pass, as the engine's figures time its own."""

    def __init__(self, path: str | Path, threads: int = 1, n_ctx: int = 1024, n_batch: int = 512) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                                   n_threads_batch=threads, verbose=False, use_mmap=True)
        self.ctx, self.vocab = self.llm.ctx, self.llm.n_vocab()

    def set_threads(self, threads: int) -> None:
        self._lib.llama_set_n_threads(self.ctx, threads, threads)

    def clear(self) -> None:
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self.ctx), True)

    def forward(self, tokens: list[int]) -> int:
        """Decode `tokens` after what the cache holds; the greedy next token."""
        import numpy as np

        lib = self._lib
        array = (lib.llama_token * len(tokens))(*tokens)
        if lib.llama_decode(self.ctx, lib.llama_batch_get_one(array, len(tokens))) != 0:
            raise RuntimeError(f"llama_decode failed on a batch of {len(tokens)} tokens")
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, -1), shape=(self.vocab,))
        return int(logits.argmax())

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], float]:
        """n greedy tokens after `prompt` and the decode rate as GenerationResult.decode_tokens_per_second
        counts it: the n - 1 steps after the prompt's forward pass."""
        self.clear()
        tokens = [self.forward(prompt)]
        start = time.perf_counter()
        for _ in range(n - 1):
            tokens.append(self.forward(tokens[-1:]))
        seconds = time.perf_counter() - start
        return tokens, (n - 1) / seconds if n > 1 else 0.0

    def prefill(self, tokens: list[int]) -> float:
        """Prompt tok/s of one forward pass over `tokens` from an empty cache."""
        self.clear()
        start = time.perf_counter()
        self.forward(tokens)
        return len(tokens) / (time.perf_counter() - start)

    def close(self) -> None:
        self.llm.close()


def run_llama(job: Job) -> dict:
    import llama_cpp

    start = time.perf_counter()
    llm = LlamaCpp(job.gguf, job.threads[0], n_ctx=job.prefill_tokens + job.decode_tokens + 64,
                   n_batch=job.prefill_tokens)
    load_seconds = time.perf_counter() - start
    short, long = job.prompts(llm.vocab)
    llm.greedy(short, 4)  # warm-up: first touches of every weight page
    llm.prefill(long[:64])
    figures = {}
    for threads in job.threads:
        llm.set_threads(threads)
        tokens, rate = llm.greedy(short, job.decode_tokens)
        figures[str(threads)] = {"decode": rate, "prefill": llm.prefill(long)}
    llm.close()
    return {"load_seconds": load_seconds, "bytes_per_token": gguf_bytes_per_token(job.gguf), "figures": figures,
            "tokens": tokens[:16], "kernels": "llama.cpp " + llama_cpp.__version__}


def run_job_in_child(job: Job, timeout: float) -> dict:
    """One contender, one round, in a fresh process: its memory is given back whole when it exits, and a crash
    (llama.cpp's SIGILL on AMX, an out-of-memory kill) costs that row, not the run."""
    spec = {**vars(job), "checkpoint": str(job.checkpoint), "gguf": str(job.gguf) if job.gguf else None}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"ran past {timeout:.0f} s"}
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        why = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        return {"error": f"{why}: {lines[-1] if lines else 'no output'}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_main(spec: str) -> None:
    raw = json.loads(spec)
    job = Job(**{**raw, "checkpoint": Path(raw["checkpoint"]), "gguf": Path(raw["gguf"]) if raw["gguf"] else None})
    result = run_ours(job) if job.contender in OURS else run_llama(job)
    print(json.dumps(result))


# --- the run ----------------------------------------------------------------------------------------------------
def unavailable_reason(contender: str) -> str | None:
    """Why a contender cannot run here (checked before any file is written), or None. Ours always try: an engine
    without a quantize format says so when the first round loads it."""
    if contender in LLAMA:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return "llama_cpp is not installed (pip install -e '.[bench]')"
    return None


def prepare_files(workdir: Path, config: GLMConfig, tag: str, contenders: list[str], seed: int) -> tuple[
        Path, dict[str, Path], dict[str, str]]:
    """The slice's checkpoint and GGUF files under `workdir`, written unless a complete one is there."""
    checkpoint = workdir / f"slice-{tag}"
    if not (checkpoint / "config.json").is_file():
        start = time.perf_counter()
        shutil.rmtree(checkpoint, ignore_errors=True)
        write_slice(checkpoint.with_name(checkpoint.name + ".partial"), config, seed=seed)
        checkpoint.with_name(checkpoint.name + ".partial").rename(checkpoint)
        print(f"wrote {checkpoint} in {time.perf_counter() - start:.0f} s", flush=True)
    ggufs: dict[str, Path] = {}
    failed: dict[str, str] = {}
    for contender in contenders:
        if contender not in LLAMA:
            continue
        out = workdir / f"slice-{tag}-{LLAMA[contender]}.gguf"
        if not out.is_file():
            start = time.perf_counter()
            why = export_gguf(checkpoint, out, LLAMA[contender])
            if why:
                failed[contender] = why
                continue
            print(f"wrote {out.name} ({out.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s",
                  flush=True)
        ggufs[contender] = out
    return checkpoint, ggufs, failed


def median_figures(results: list[dict], threads: list[int]) -> dict:
    """Medians over the rounds that ran; the first success gives bytes per token and tokens."""
    good = [r for r in results if "error" not in r]
    if not good:
        return {"error": results[-1]["error"] if results else "not run"}
    out = {"bytes_per_token": good[0]["bytes_per_token"], "kernels": good[0]["kernels"],
           "load_seconds": statistics.median(r["load_seconds"] for r in good), "rounds": len(good), "figures": {}}
    for t in threads:
        out["figures"][t] = {key: statistics.median(r["figures"][str(t)][key] for r in good)
                             for key in ("decode", "prefill")}
    return out


def ratio(summary: dict, ours: str, theirs: str, key: str, threads: int) -> float:
    a, b = summary.get(ours, {}), summary.get(theirs, {})
    if "figures" not in a or "figures" not in b:
        return float("nan")
    return a["figures"][threads][key] / b["figures"][threads][key]


def scaling_line(summary: dict, low: int, high: int) -> str:
    """`decode_2t_vs_1t: ours_bf16=X ours_int8=Y ...`: each contender's decode at `high` threads over `low`, from
    the same rounds (each round measures both thread counts in one process, one after the other)."""
    ratios = [f"{name.replace('llama.cpp', 'llamacpp').replace(' ', '_').lower()}="
              f"{e['figures'][high]['decode'] / e['figures'][low]['decode']:.2f}"
              for name, e in summary.items() if "figures" in e]
    return f"decode_{high}t_vs_{low}t: " + " ".join(ratios)


def report(summary: dict, bandwidth: dict[int, dict[str, float]], threads: list[int]) -> list[str]:
    lines = [f"{'contender':16}{'thr':>4}{'decode tok/s':>14}{'prefill tok/s':>15}{'GB/token':>10}"
             f"{'decode GB/s':>13}{'% of read bw':>14}{'load s':>8}"]
    for name, entry in summary.items():
        if "error" in entry:
            lines.append(f"{name:16}  not measured: {entry['error']}")
            continue
        gb = entry["bytes_per_token"] / 1e9
        for t in threads:
            fig = entry["figures"][t]
            lines.append(f"{name:16}{t:4d}{fig['decode']:14.2f}{fig['prefill']:15.1f}{gb:10.3f}"
                         f"{gb * fig['decode']:13.2f}{100 * gb * fig['decode'] / bandwidth[t]['read']:13.0f}%"
                         f"{entry['load_seconds']:8.0f}")
    for name, entry in summary.items():
        if "kernels" in entry:
            lines.append(f"  {name}: {entry['kernels']}")
    if len(threads) > 1:
        low, high = threads[0], threads[-1]
        scaling = [f"{name} {e['figures'][high]['decode'] / e['figures'][low]['decode']:.2f}x"
                   for name, e in summary.items() if "figures" in e]
        lines.append(f"decode scaling {low}->{high} threads: " + ", ".join(scaling))
        lines.append(scaling_line(summary, low, high))
    for t in threads:
        pairs = [f"{label} decode {ratio(summary, *pair, 'decode', t):.2f} "
                 f"prefill {ratio(summary, *pair, 'prefill', t):.2f}" for label, pair in PAIRS.items()]
        lines.append(f"ours / llama.cpp at {t} thread(s): " + "; ".join(pairs))
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="1+2", help="DENSE+MOE layers of the slice (default 1+2; 1+1 "
                        "takes ~7.7 GB in bf16 against ~12.4 GB)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for the slice's files (kept; reused when complete); default a temporary one")
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default 1,2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help=f"comma-separated subset of: {', '.join(CONTENDERS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one contender's round may take")
    parser.add_argument("--shape", choices=("air", "tiny"), default="air",
                        help="tiny: the same path at test size (its figures mean nothing)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child)
        return {}

    dense, moe = parse_layers(args.layers)
    threads = sorted({int(t) for t in args.threads.split(",")})
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown:
        raise SystemExit(f"--contenders: unknown {unknown}; choose from {', '.join(CONTENDERS)}")
    config = slice_config(dense, moe, args.shape)
    cpu = cpu_description()
    print(f"CPU: {cpu['model']} ({cpu['cores']} cores; {cpu['flags']})")
    print(f"slice: {args.shape} width, {dense} dense + {moe} MoE layers, {config.num_parameters() / 1e9:.2f}B "
          f"parameters ({config.num_parameters(active_only=True) / 1e9:.2f}B active), bf16 "
          f"{config.num_parameters() * 2 / 1e9:.1f} GB")
    try:
        import llama_cpp

        system = llama_cpp.llama_print_system_info().decode().strip()
        print(f"llama.cpp: llama-cpp-python {llama_cpp.__version__}; {system}")
    except ImportError:
        pass

    skipped = {c: why for c in contenders if (why := unavailable_reason(c))}
    runnable = [c for c in contenders if c not in skipped]
    bandwidth = {t: measure_bandwidth(t) for t in threads}
    for t, bw in bandwidth.items():
        print(f"memory bandwidth at {t} thread(s): read {bw['read']:.1f} GB/s, copy {bw['copy']:.1f} GB/s "
              f"(load average {os.getloadavg()[0]:.2f})")

    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="glm-air-slice-")) if temporary else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        tag = f"{args.shape}-{dense}+{moe}-s{args.seed}"
        checkpoint, ggufs, failed = prepare_files(workdir, config, tag, runnable, args.seed)
        skipped.update(failed)
        runnable = [c for c in runnable if c not in failed]
        results: dict[str, list[dict]] = {c: [] for c in runnable}
        for number in range(args.rounds):
            order = runnable[number % len(runnable):] + runnable[:number % len(runnable)] if runnable else []
            for contender in order:
                job = Job(contender, checkpoint, ggufs.get(contender), threads, args.decode_tokens,
                          args.prefill_tokens, args.seed)
                if results[contender] and all("error" in r for r in results[contender]):
                    continue  # failed in its first round: it would fail again
                result = run_job_in_child(job, args.timeout)
                results[contender].append(result)
                if "error" in result:
                    print(f"round {number + 1} {contender}: {result['error']}", flush=True)
                else:
                    shown = ", ".join(f"{t} thr {f['decode']:.2f} / {f['prefill']:.1f}"
                                      for t, f in result["figures"].items())
                    # The machine may be shared: the load average says how much of it the figures had.
                    print(f"round {number + 1} {contender}: decode / prefill tok/s {shown} "
                          f"(load average {os.getloadavg()[0]:.2f})", flush=True)
                gc.collect()
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)

    summary = {c: median_figures(results[c], threads) for c in runnable}
    summary.update({c: {"error": why} for c, why in skipped.items()})
    summary = {c: summary[c] for c in contenders}
    for line in report(summary, bandwidth, threads):
        print(line)
    top = threads[-1]
    last = {"decode_vs_llamacpp_q8": ratio(summary, *PAIRS["q8"], "decode", top),
            "decode_vs_llamacpp_q4": ratio(summary, *PAIRS["q4"], "decode", top),
            "prefill_vs_llamacpp_q4": ratio(summary, *PAIRS["q4"], "prefill", top)}
    figures = {"cpu": cpu, "layers": args.layers, "shape": args.shape, "threads": threads,
               "bandwidth": bandwidth, "contenders": summary, "last_line": last}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print(" ".join(f"{key}={value:.2f}" for key, value in last.items()))
    return figures


if __name__ == "__main__":
    main()

"""Tiny checkpoints made in code, for tests, benchmarks and demos that must not download anything.

Owns `write_tiny_checkpoint`: a random-weight GLM-4.5-architecture model of any preset plus a small byte-level
BPE tokenizer that has every GLM-4.5 special token, written in the Hugging Face layout the engine loads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from workbench.engine.config import GLMConfig
from workbench.engine.glm45_template import GLM45_CHAT_TEMPLATE
from workbench.engine.model import GLMForCausalLM
from workbench.engine.weights import save_checkpoint

GLM_SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<think>", "</think>", "<tool_call>",
    "</tool_call>", "<tool_response>", "</tool_response>", "<arg_key>", "</arg_key>", "<arg_value>",
    "</arg_value>", "/nothink",
]
STOP_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]

_TRAINING_TEXT = """
def fizzbuzz(n):
    for i in range(1, n + 1):
        if i % 15 == 0:
            print("FizzBuzz")
        elif i % 3 == 0:
            print("Fizz")
        else:
            print(i)
The quick brown fox jumps over the lazy dog. Mixture-of-experts models route every token to a few experts.
Привет, мир! 你好，世界。 {"city": "Paris", "days": 2} [1, 2, 3] <tool_call>get_weather
"""


def build_tokenizer(vocab_size: int, corpus: list[str] | None = None):
    """A byte-level BPE with the GLM special tokens as single ids (ids 0..len(specials)-1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=GLM_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus or [_TRAINING_TEXT] * 4, trainer=trainer)
    return tokenizer


def write_tokenizer_files(folder: Path, tokenizer) -> None:
    """tokenizer.json, tokenizer_config.json (with GLM-4.5's chat template) and generation_config.json."""
    tokenizer.save(str(folder / "tokenizer.json"))
    added = {str(tokenizer.token_to_id(t)): {"content": t, "special": True} for t in GLM_SPECIAL_TOKENS}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "chat_template": GLM45_CHAT_TEMPLATE, "added_tokens_decoder": added,
              "model_max_length": 131072}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    stop_ids = [tokenizer.token_to_id(t) for t in STOP_TOKENS]
    generation = {"eos_token_id": stop_ids, "pad_token_id": stop_ids[0]}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def random_model(config: GLMConfig, seed: int = 0, std: float = 0.08) -> GLMForCausalLM:
    """Random weights with enough spread that routing and greedy decoding are not degenerate."""
    generator = torch.Generator().manual_seed(seed)
    model = GLMForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith("e_score_correction_bias"):
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias"):
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(std * torch.randn(param.shape, generator=generator))
    return model


def write_tiny_checkpoint(folder: str | Path, preset: str | GLMConfig = "tiny", seed: int = 0,
                          dtype: torch.dtype = torch.float32, max_shard_bytes: int | None = None,
                          **overrides) -> Path:
    """A complete checkpoint folder (config, weights, tokenizer files) for a preset, with random weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = preset if isinstance(preset, GLMConfig) else GLMConfig.preset(preset, **overrides)
    tokenizer = build_tokenizer(min(config.vocab_size, 4096))
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(f"the test tokenizer needs a vocab of at least {tokenizer.get_vocab_size()}")
    save_checkpoint(random_model(config, seed), folder, dtype=dtype, max_shard_bytes=max_shard_bytes)
    write_tokenizer_files(folder, tokenizer)
    return folder


_LOAD_MEMORY_CHILD = r"""
import json, sys, torch
from pathlib import Path
from workbench.engine import Engine
torch.set_num_threads(1)

def status(key):  # kB figures of /proc/self/status
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

# VmHWM is this process's own peak (ru_maxrss is not: Linux carries the parent's peak across fork and exec);
# writing 5 to clear_refs resets it, so the peak below is the load's alone.
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
quantize = sys.argv[3] if len(sys.argv) > 3 else None
engine = Engine.from_pretrained(sys.argv[1], dtype=sys.argv[2], kernels="torch", cache_tokens=1024, quantize=quantize)
weights = engine.weights["weight_bytes"]  # parameters and the quantized weights' buffers
print(json.dumps({"growth": status("VmHWM") - before, "weights": weights}))
"""


def measure_load_memory(folder: str | Path, dtype: str, quantize: str | None = None) -> dict[str, int]:
    """Load `folder` in a fresh process (Linux), quantized if asked, and return its peak RSS growth and the
    weights' bytes."""
    out = subprocess.run([sys.executable, "-c", _LOAD_MEMORY_CHILD, str(folder), dtype, *([quantize] if quantize
                                                                                         else [])],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- synthetic GGUFs ----------------------------------------------------------------------------------------------
class _RandomBlocks:
    """What GGUFWriter needs of a tensor (shape in bytes, dtype, nbytes, tofile), its bytes random blocks of a GGML
    type made one leading slice (one expert) at a time: a GGUF of any size is written in bounded memory."""

    def __init__(self, shape: tuple[int, ...], qtype, rng, scale: float) -> None:
        import gguf
        import numpy as np

        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        self.qtype, self.rng, self.scale, self.block_bytes = qtype, rng, scale, block_bytes
        self.values = shape
        self.shape = (*shape[:-1], shape[-1] // block * block_bytes)
        self.dtype = np.dtype(np.uint8)
        self.nbytes = int(np.prod(self.shape))

    def _slice(self, shape: tuple[int, ...]):
        import numpy as np
        from gguf import GGMLQuantizationType as T

        raw = self.rng.integers(0, 256, size=(*shape[:-1], shape[-1] // self.block_bytes, self.block_bytes),
                                dtype=np.uint8)
        offset = {T.Q8_0: 0, T.Q4_K: 0, T.Q6_K: 208}[self.qtype]  # finite fp16 scales
        d = np.abs(self.rng.normal(self.scale, self.scale / 4, size=raw.shape[:-1])).astype(np.float32)
        raw[..., offset:offset + 2] = d.astype(np.float16)[..., None].view(np.uint8)
        if self.qtype == T.Q4_K:  # centred: dmin * mn = 7.5 * d * sc, the middle of q's 0..15
            raw[..., 2:4] = (7.5 * d).astype(np.float16)[..., None].view(np.uint8)
            scales = raw[..., 4:16]
            scales[..., 0:4] &= 0x0F  # sub-scales below 16 (high bits clear), the minimums equal to them
            scales[..., 4:8] = scales[..., 0:4]
            scales[..., 8:12] = (scales[..., 8:12] & 0x0F) | ((scales[..., 8:12] & 0x0F) << 4)
        return raw.reshape(shape)

    def tofile(self, f) -> None:
        if len(self.shape) == 3:
            for _ in range(self.shape[0]):
                self._slice(self.shape[1:]).tofile(f)
        else:
            self._slice(self.shape).tofile(f)


def write_synthetic_gguf(path: str | Path, config: GLMConfig, qtype: str = "q8_0", seed: int = 0) -> Path:
    """A glm4moe GGUF of `config` with random block-quantized matrices (`qtype`: q8_0, q4_k or q6_k; routed
    experts stacked as llama.cpp writes them), F32 norms, router and correction bias, an F16 token embedding and a
    tiny byte-level BPE tokenizer: a file of any size (GLM-4.5-Air's width, say) written in bounded memory and
    time, without an HF checkpoint to convert (the weights are random blocks, not a quantized model)."""
    import tempfile

    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as T

    from workbench.engine.gguf_export import ALIGNMENT, add_hparams, add_tokenizer

    block_type = {"q8_0": T.Q8_0, "q4_k": T.Q4_K, "q6_k": T.Q6_K}[qtype]
    path = Path(path)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "glm4moe")
    writer.add_custom_alignment(ALIGNMENT)
    add_hparams(writer, config, 0, "q8_0" if qtype == "q8_0" else "q4_k", path.stem)
    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer_files(Path(folder), build_tokenizer(min(config.vocab_size, 4096)))
        add_tokenizer(writer, Path(folder), config.vocab_size)
    d, heads, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    scale = 0.02 / 64  # Q8_0's d for weights of std ~0.01 (q uniform over the int8 range); Q4_K/Q6_K alike

    def dense(name, shape, value=None):
        data = np.full(shape, value, np.float32) if value is not None else \
            (0.02 * rng.standard_normal(shape)).astype(np.float32)
        writer.add_tensor(name, data)

    def blocks(name, shape):
        writer.add_tensor(name, _RandomBlocks(shape, block_type, rng, scale),  # type: ignore[arg-type]
                          raw_dtype=block_type)

    writer.add_tensor("token_embd.weight", (0.5 * rng.standard_normal((config.vocab_size, d))).astype(np.float16))
    for layer in range(config.num_hidden_layers):
        p = f"blk.{layer}."
        dense(p + "attn_norm.weight", (d,), 1.0)
        dense(p + "post_attention_norm.weight", (d,), 1.0)
        blocks(p + "attn_q.weight", (heads * hd, d))
        blocks(p + "attn_k.weight", (kv * hd, d))
        blocks(p + "attn_v.weight", (kv * hd, d))
        blocks(p + "attn_output.weight", (d, heads * hd))
        if config.attention_bias:
            dense(p + "attn_q.bias", (heads * hd,))
            dense(p + "attn_k.bias", (kv * hd,))
            dense(p + "attn_v.bias", (kv * hd,))
        if config.use_qk_norm:
            dense(p + "attn_q_norm.weight", (hd,), 1.0)
            dense(p + "attn_k_norm.weight", (hd,), 1.0)
        if layer < config.first_k_dense_replace:
            inter = config.intermediate_size
            blocks(p + "ffn_gate.weight", (inter, d))
            blocks(p + "ffn_up.weight", (inter, d))
            blocks(p + "ffn_down.weight", (d, inter))
            continue
        experts, inter = config.n_routed_experts, config.moe_intermediate_size
        dense(p + "ffn_gate_inp.weight", (experts, d))
        dense(p + "exp_probs_b.bias", (experts,))
        blocks(p + "ffn_gate_exps.weight", (experts, inter, d))
        blocks(p + "ffn_up_exps.weight", (experts, inter, d))
        blocks(p + "ffn_down_exps.weight", (experts, d, inter))
        shared = inter * config.n_shared_experts
        blocks(p + "ffn_gate_shexp.weight", (shared, d))
        blocks(p + "ffn_up_shexp.weight", (shared, d))
        blocks(p + "ffn_down_shexp.weight", (d, shared))
    dense("output_norm.weight", (d,), 1.0)
    if not config.tie_word_embeddings:
        blocks("output.weight", (config.vocab_size, d))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


_GGUF_LOAD_CHILD = r"""
import json, sys, time
from pathlib import Path
from workbench.engine import Engine

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

path, cache, decode = sys.argv[1], sys.argv[2], int(sys.argv[3])
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
start = time.perf_counter()
engine = Engine.from_pretrained(path, dtype="float32", gguf_cache=cache, cache_tokens=256)
seconds = time.perf_counter() - start
growth = status("VmHWM") - before
if decode:
    engine.generate([10, 11, 12, 13], max_new_tokens=decode, temperature=0.0)
print(json.dumps({"seconds": seconds, "growth": growth, "decode_growth": status("VmHWM") - before}))
"""


def measure_gguf_load(path: str | Path, cache: str | Path, decode: int = 0) -> dict[str, float]:
    """Load a GGUF in a fresh process (Linux) with the repack cache folder `cache` ("off": into memory): the load's
    seconds, its peak RSS growth and (after `decode` greedy tokens) the peak growth with the decode."""
    out = subprocess.run([sys.executable, "-c", _GGUF_LOAD_CHILD, str(path), str(cache), str(decode)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])

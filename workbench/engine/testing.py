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

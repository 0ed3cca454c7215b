"""GGUF out: an HF-layout GLM-4.5 checkpoint folder written as a `glm4moe` GGUF that llama.cpp and Ollama load.

Owns `export_gguf` (and `python -m workbench export-gguf`): metadata, tokenizer and chat template, tensor names
and types as llama.cpp's convert_hf_to_gguf.py (class Glm4MoeModel) writes them, so that a checkpoint of any
config (the bundled model, one trained in notebook 4, an Air-width slice with random weights) goes to llama.cpp.

Tensor types by `--type` (the converter's and llama-quantize's rules where they apply):
- 1-D tensors (norms, biases, the expert-score correction bias) and the router (ffn_gate_inp) stay F32 always;
- f32: everything F32; f16: the rest F16;
- q8_0: the rest Q8_0 (gguf.quants' quantizer, bit-exact with ggml's); rows not a multiple of 32 fall back to
  F16, as the converter does;
- q4_k: the rest Q4_K (our quantizer, gguf_blocks.encode_q4_k), except output.weight in Q8_0 (llama-quantize
  gives it Q6_K; we write no Q6_K, so it gets the finer type). Rows not a multiple of 256 take llama.cpp's
  fallback for Q4_K, Q5_0 (llama-quant.cpp: "tensor cols not divisible by 256 ... using fallback
  quantization"); rows not a multiple of 32 either are F16.

Experts are stacked per layer ([E, N, K], one tensor per projection) and written one expert at a time, so memory
holds one expert's conversion, not the stack. The multi-token-prediction layer is written only when the checkpoint
holds it (the engine's own checkpoints do not); otherwise nextn_predict_layers is 0, so that every llama.cpp
version (older ones require the nextn tensors a nonzero count announces) loads the file.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from workbench.engine import gguf_blocks
from workbench.engine.config import GLMConfig
from workbench.engine.gguf_file import (
    ARCH,
    EXPERT_NAMES,
    GLM4_PRETOKENIZER_REGEX,
    GLOBAL_NAMES,
    LAYER_NAMES,
    NEXTN_NAMES,
    GGUFError,
)
from workbench.engine.weights import iter_checkpoint_tensors

log = logging.getLogger(__name__)

EXPORT_TYPES = ("f32", "f16", "q8_0", "q4_k")
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S}

_HF_GLOBAL = {hf: g for g, hf in GLOBAL_NAMES.items()}
_HF_LAYER = {hf: g for g, hf in LAYER_NAMES.items()}
_HF_NEXTN = {hf: g for g, hf in NEXTN_NAMES.items()}
_HF_EXPERT = {hf: g for g, hf in EXPERT_NAMES.items()}
_HF_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT_NAME = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_HF_FUSED_EXPERTS = re.compile(r"mlp\.experts\.(gate_up_proj|down_proj)$")


def tensor_type(name: str, shape: tuple[int, ...], gguf_type: str) -> T:
    """The GGML type `name` is written in for an export of `gguf_type` (see the module docstring)."""
    if gguf_type not in EXPORT_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}: use one of {', '.join(EXPORT_TYPES)}")
    if gguf_type == "f32" or len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
        return T.F32
    k = shape[-1]
    if gguf_type == "f16" or k % 32:
        return T.F16
    if gguf_type == "q8_0" or name == "output.weight":
        return T.Q8_0
    return T.Q4_K if k % gguf_blocks.QK_K == 0 else T.Q5_0


def _encode(values: torch.Tensor, qtype: T) -> np.ndarray:
    if qtype == T.F32:
        return values.float().contiguous().numpy()
    if qtype == T.F16:
        return values.to(torch.float16).contiguous().numpy()
    if qtype == T.Q4_K:
        return gguf_blocks.encode_q4_k(values)
    return gguf_blocks.encode_with_gguf(values, qtype)


class _LazyTensor:
    """What GGUFWriter needs of a tensor (shape, dtype, nbytes, tofile), converted only when it is written, in
    parts (one expert of a stack at a time)."""

    def __init__(self, parts: list[Callable[[], torch.Tensor]], shape: tuple[int, ...], qtype: T) -> None:
        self.parts, self.qtype = parts, qtype
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        if qtype in (T.F32, T.F16):
            self.shape, self.dtype = shape, np.dtype(np.float32 if qtype == T.F32 else np.float16)
            self.nbytes = int(np.prod(shape)) * self.dtype.itemsize
        else:
            self.shape, self.dtype = (*shape[:-1], shape[-1] // block * block_bytes), np.dtype(np.uint8)
            self.nbytes = int(np.prod(self.shape))

    def tofile(self, f) -> None:
        for part in self.parts:
            _encode(part(), self.qtype).tofile(f)

    def byteswap(self, inplace: bool = False):  # pragma: no cover - big-endian hosts only
        raise GGUFError("exporting GGUF on a big-endian machine is not supported")


# 64-byte aligned tensor data (general.alignment; GGUF's default is 32): the engine then uses F32/F16 tensors in
# place, as views of the mapped file (its loader copies tensors its CPU GEMMs would read misaligned)
ALIGNMENT = 64


class _Writer(gguf.GGUFWriter):
    """gguf's writer, with general.alignment in every split file: each file's data is aligned so, and readers
    (llama.cpp's and gguf's) take each file's alignment from its own metadata (the plain writer puts the key in
    the first file only)."""

    def add_shard_kv_data(self) -> None:
        super().add_shard_kv_data()
        for kv_data in self.kv_data[1:]:
            kv_data[gguf.Keys.General.ALIGNMENT] = gguf.GGUFValue(ALIGNMENT, gguf.GGUFValueType.UINT32)


# --- tensors ------------------------------------------------------------------------------------------------
def _gguf_tensors(folder: Path, config: GLMConfig) -> tuple[dict[str, tuple[list[Callable], tuple[int, ...]]], int]:
    """GGUF name -> (parts, full shape), and the number of nextn layers the checkpoint holds."""
    out: dict[str, tuple[list[Callable], tuple[int, ...]]] = {}
    experts: dict[tuple[int, str], dict[int, tuple[Any, str]]] = {}
    nextn_layers: set[int] = set()
    for name, file in iter_checkpoint_tensors(folder):
        shape = tuple(file.entries[name].shape)

        def read(file=file, name=name) -> torch.Tensor:
            return file.tensor(name)

        if name in _HF_GLOBAL:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            out[_HF_GLOBAL[name]] = ([read], shape)
            continue
        match = _HF_LAYER_NAME.match(name)
        if match is None:
            raise GGUFError(f"unexpected tensor {name!r} in {file.path.name}: not part of a GLM-4.5 checkpoint")
        layer, rest = int(match[1]), match[2]
        if layer >= config.num_hidden_layers:
            nextn_layers.add(layer)
        prefix = f"blk.{layer}."
        if rest in _HF_LAYER:
            out[prefix + _HF_LAYER[rest]] = ([read], shape)
        elif layer >= config.num_hidden_layers and rest in _HF_NEXTN:
            out[prefix + _HF_NEXTN[rest]] = ([read], shape)
        elif expert := _HF_EXPERT_NAME.search(rest):
            experts.setdefault((layer, expert[2]), {})[int(expert[1])] = (file, name)
        elif fused := _HF_FUSED_EXPERTS.search(rest):  # transformers >= 5 keeps experts fused: [E, 2I, D] / [E, D, I]
            n = shape[0]
            if fused[1] == "down_proj":
                out[prefix + "ffn_down_exps.weight"] = ([lambda e=e, r=read: r()[e] for e in range(n)], shape)
            else:
                half = shape[1] // 2
                out[prefix + "ffn_gate_exps.weight"] = ([lambda e=e, r=read, h=half: r()[e, :h] for e in range(n)],
                                                        (n, half, shape[2]))
                out[prefix + "ffn_up_exps.weight"] = ([lambda e=e, r=read, h=half: r()[e, h:] for e in range(n)],
                                                      (n, half, shape[2]))
        else:
            raise GGUFError(f"tensor {name!r} has no GGUF name in the {ARCH} layout")
    for (layer, proj), by_expert in experts.items():
        want = config.n_routed_experts
        if sorted(by_expert) != list(range(want)):
            missing = sorted(set(range(want)) - set(by_expert))
            raise GGUFError(f"layer {layer} {proj}: the checkpoint lacks expert(s) {missing[:5]} of {want}")
        file0, name0 = by_expert[0]
        shape = (want, *file0.entries[name0].shape)
        parts = [lambda f=by_expert[e][0], n=by_expert[e][1]: f.tensor(n) for e in range(want)]
        out[f"blk.{layer}.{_HF_EXPERT[proj]}"] = (parts, shape)
    return out, len(nextn_layers)


# --- metadata -----------------------------------------------------------------------------------------------
def _pre_tokenizer_type(data: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json: 'glm4' for GLM-4.5's split, 'gpt-2' for a plain
    byte-level one (the bundled model's)."""
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        splits = [s for s in steps if s.get("type") == "Split"]
        if len(splits) == 1 and (splits[0].get("pattern") or {}).get("Regex") == GLM4_PRETOKENIZER_REGEX:
            return "glm4"
    raise GGUFError("the checkpoint's tokenizer.json splits text in a way llama.cpp has no pre-tokenizer type for "
                    "(expected GLM-4.5's split regex or a plain byte-level one)")


def _looks_special(token: str) -> bool:  # convert_hf_to_gguf's does_token_look_special, for <|...|> tokens
    return token.startswith("<|") and token.endswith("|>")


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int,
                  fallback_chat_template: str | None = None) -> None:
    """tokenizer.ggml.* and tokenizer.chat_template as the converter's _set_vocab_glm writes them: the checkpoint's
    own template, else `fallback_chat_template` (the CLI gives the chat layer's GLM-4.5 template), else none."""
    from tokenizers import Tokenizer as HFTokenizer

    from workbench.engine.tokenizer import Tokenizer

    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    hf = HFTokenizer.from_str(json.dumps(data))
    ours = Tokenizer.from_pretrained(folder)
    added = {t.content: t for t in hf.get_added_tokens_decoder().values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = hf.id_to_token(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token].special or _looks_special(token)
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    if hf.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise GGUFError(f"the tokenizer has {hf.get_vocab_size()} tokens, more than the model's vocab_size "
                        f"{vocab_size}")
    merges = data["model"].get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_type(data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")) \
        if (folder / "tokenizer_config.json").is_file() else {}

    def token_id(value: Any) -> int | None:
        text = value.get("content") if isinstance(value, dict) else value
        return hf.token_to_id(text) if isinstance(text, str) else None

    ids = {"bos": hf.token_to_id("[gMASK]"), "eos": token_id(config.get("eos_token")) or hf.token_to_id(
        "<|endoftext|>"), "eot": hf.token_to_id("<|user|>"), "unk": hf.token_to_id("<|endoftext|>"),
        "eom": hf.token_to_id("<|observation|>"), "pad": token_id(config.get("pad_token"))}
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "eot": writer.add_eot_token_id,
              "unk": writer.add_unk_token_id, "eom": writer.add_eom_token_id, "pad": writer.add_pad_token_id}
    for key, value in ids.items():
        if value is not None:
            adders[key](value)
    template = ours.chat_template or fallback_chat_template
    if template:
        writer.add_chat_template(template)
    else:
        log.warning("%s ships no chat template, so the GGUF has none: llama.cpp will format chats its own way",
                    folder)


def add_hparams(writer: gguf.GGUFWriter, config: GLMConfig, nextn: int, gguf_type: str, name: str) -> None:
    """The model's metadata as Glm4MoeModel.set_gguf_parameters writes it."""
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_block_count(config.num_hidden_layers + nextn)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.n_routed_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_group_count(config.n_group)
    writer.add_expert_group_used_count(config.topk_group)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_expert_shared_count(config.n_shared_experts)
    writer.add_leading_dense_block_count(config.first_k_dense_replace)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    writer.add_expert_weights_scale(config.routed_scaling_factor)
    writer.add_expert_weights_norm(config.norm_topk_prob)
    writer.add_nextn_predict_layers(nextn)
    writer.add_file_type(FILE_TYPES[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def export_gguf(checkpoint: str | Path, out: str | Path, gguf_type: str = "f16", *,
                split_max_bytes: int = 0, name: str | None = None,
                fallback_chat_template: str | None = None) -> list[Path]:
    """Write the HF-layout checkpoint folder `checkpoint` (config.json, safetensors, tokenizer files; any
    GLM-4.5-architecture config) as a glm4moe GGUF at `out`, of type f32, f16, q8_0 or q4_k. With
    `split_max_bytes`, the tensors go into split files `OUT-00001-of-0000N.gguf` of at most that many bytes each
    (as llama.cpp's gguf-split names them). The chat template is the checkpoint's own, else
    `fallback_chat_template`. Returns the files written."""
    folder = Path(checkpoint).expanduser()
    out = Path(out).expanduser()
    if gguf_type not in EXPORT_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}: use one of {', '.join(EXPORT_TYPES)}")
    config = GLMConfig.from_json(folder)
    if config.extra.get("quantization_config"):
        raise GGUFError(f"{folder} is an FP8 checkpoint: export a dense (bf16/fp16/fp32) one")
    if not (folder / "tokenizer.json").is_file():
        raise GGUFError(f"no tokenizer.json in {folder}: a GGUF carries the tokenizer, so the export needs it")
    tensors, nextn = _gguf_tensors(folder, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = _Writer(out, ARCH, split_max_size=split_max_bytes)
    writer.add_custom_alignment(ALIGNMENT)
    add_hparams(writer, config, nextn, gguf_type, name or folder.name)
    add_tokenizer(writer, folder, config.vocab_size, fallback_chat_template)
    for gguf_name, (parts, shape) in tensors.items():
        qtype = tensor_type(gguf_name, shape, gguf_type)
        lazy = _LazyTensor(parts, shape, qtype)
        writer.add_tensor(gguf_name, lazy, raw_dtype=None if qtype in (T.F32, T.F16) else qtype)  # type: ignore
    files = writer.format_shard_names(out)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [Path(f) for f in files]

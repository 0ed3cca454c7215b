"""GGUF in: a GLM-4.5 GGUF (architecture `glm4moe`, as llama.cpp's converter writes it) as config, tokenizer
and weights for the engine.

Owns finding the file(s) (one .gguf, a folder holding one, or split files `*-00001-of-0000N.gguf`), checking
them (architecture, tensor types, truncation: before anything is built), the GGUF <-> Hugging Face tensor name
table (shared with gguf_export), the GLMConfig the metadata describes, the tokenizer and chat template from
`tokenizer.ggml.*`, and the stream of (HF name, tensor | Int8Weight | Int4Weight) the model is built from.

Reading goes through the `gguf` package's GGUFReader, which maps each file (copy-on-write, never written):
F32/F16/BF16 tensors are views of the mapped file until the loader converts or places them; block-quantized
tensors are decoded one at a time as the stream reaches them (gguf_blocks, in row chunks copied out of the
mapping first), so the resident set grows by the converted weights, not by the file. Experts are stacked per
layer in GGUF ([E, N, K]); the stream yields each expert's slice under its HF name. The multi-token-prediction
(nextn) block after the decoder layers is skipped.

On the CPU, `gguf_cache.load_gguf` does not build from that stream directly: it repacks it once into a cache file of
the engine's formats and the model is built from views of that file's mapping, so a GGUF larger than RAM loads
and its routed experts page in as they are used (see gguf_cache.py for why a repack and not views of the GGUF;
`gguf_cache="off"` or WORKBENCH_GGUF_CACHE=off builds from the stream, in memory). GPUs dequantize the stream.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import mmap
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import Keys
from glm_kernels.blockquant import Int4Weight, Int8Weight, dequantize

from workbench.engine import gguf_blocks
from workbench.engine.config import ConfigError, GLMConfig
from workbench.engine.weights import CheckpointError

log = logging.getLogger(__name__)

ARCH = "glm4moe"
GGUF_MAGIC = b"GGUF"


class GGUFError(CheckpointError):
    """A GGUF file the engine cannot load; the message names the file, key or tensor and what is wrong."""


# --- names -----------------------------------------------------------------------------------------------
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
# per decoder layer: GGUF name after "blk.{L}." -> HF name after "model.layers.{L}."
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    **{f"attn_{x}.{kind}": f"self_attn.{x}_proj.{kind}" for x in "qkv" for kind in ("weight", "bias")},
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    **{f"ffn_{p}.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    **{f"ffn_{p}_shexp.weight": f"mlp.shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")},
}
# stacked experts [E, N, K]: GGUF name after "blk.{L}." -> the projection of HF's per-expert names
EXPERT_NAMES = {f"ffn_{p}_exps.weight": f"{p}_proj" for p in ("gate", "up", "down")}
# the multi-token-prediction block's own tensors (the block also has the ordinary layer tensors above)
NEXTN_NAMES = {"nextn.eh_proj.weight": "eh_proj.weight", "nextn.embed_tokens.weight": "embed_tokens.weight",
               "nextn.enorm.weight": "enorm.weight", "nextn.hnorm.weight": "hnorm.weight",
               "nextn.shared_head_head.weight": "shared_head.head.weight",
               "nextn.shared_head_norm.weight": "shared_head.norm.weight"}
_BLK = re.compile(r"blk\.(\d+)\.(.+)$")


# --- files ------------------------------------------------------------------------------------------------
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def is_gguf_path(path: str | Path) -> bool:
    """A .gguf file, or a folder that holds .gguf files and no config.json (an HF folder wins)."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".gguf" or _has_magic(path)
    return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))


def _has_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _model_name(first_file: Path) -> str:
    match = _SPLIT.match(first_file.name)
    return match["stem"] if match else first_file.name.removesuffix(".gguf")


def gguf_model_name(path: str | Path) -> str:
    """The name a GGUF model is served under (its file's stem, without a split's -0000k-of-0000N), known without
    reading it."""
    return _model_name(gguf_files(path)[0])


def gguf_files(path: str | Path) -> list[Path]:
    """The file(s) of one GGUF model: a file (with its sibling splits), or the one model in a folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if path.is_dir():
        candidates = sorted(path.glob("*.gguf"))
        firsts = [p for p in candidates if not _SPLIT.match(p.name) or _SPLIT.match(p.name)["no"] == "00001"]
        if not firsts:
            raise GGUFError(f"no .gguf file in {path} (split files need their first part, *-00001-of-*.gguf)")
        if len(firsts) > 1:
            raise GGUFError(f"{path} holds several GGUF models ({', '.join(p.name for p in firsts)}): point at one "
                            "file")
        path = firsts[0]
    match = _SPLIT.match(path.name)
    if not match:
        return [path]
    count = int(match["count"])
    files = [path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise GGUFError(f"{path.name} is part of a {count}-file split but {', '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} missing from {path.parent}")
    return files


class _Reader(gguf.GGUFReader):
    """gguf's reader, with every tensor's type and extent checked before its data is mapped, so that an
    unsupported type or a truncated file is an error naming the tensor (the plain reader fails on a reshape),
    and a faster `_get`."""

    def __init__(self, path: Path, mode: str = "c") -> None:
        self.path = path
        self._plain: np.ndarray | None = None
        super().__init__(path, mode=mode)

    def _get(self, offset: int, dtype, count: int = 1, override_order=None) -> np.ndarray:
        # as gguf's _get, over a plain-ndarray view of the same mapping: slicing an np.memmap costs a Python-level
        # __array_finalize__ per slice, which made a 151k-token vocabulary take a minute to parse
        if self._plain is None:
            self._plain = self.data.view(np.ndarray)
        count = int(count)
        size = np.dtype(dtype).itemsize * count
        arr = self._plain[offset:offset + size].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list[int], list]:
        # arrays in one pass: gguf parses them element by element (two numpy views per string, a recursive call
        # per number), which took a minute for GLM-4.5's 151k tokens and 318k merges. Parts: the item type, the
        # length, then one view per string (or one array of all the numbers); `data` indexes the values.
        if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        item_type = self._get(orig_offs, np.uint32)
        length = self._get(orig_offs + 4, np.uint64)
        sub = gguf.GGUFValueType(int(item_type[0]))
        offs = orig_offs + 12
        if sub == gguf.GGUFValueType.STRING:
            buf = self._plain
            view = memoryview(buf)
            parts: list = [item_type, length]
            for _ in range(int(length[0])):
                n = int.from_bytes(view[offs:offs + 8], "little")
                if offs + 8 + n > len(buf):
                    raise IndexError(f"a string at byte {offs} runs past the end of the file")
                parts.append(buf[offs + 8:offs + 8 + n])
                offs += 8 + n
            return offs - orig_offs, parts, list(range(2, len(parts))), [gguf.GGUFValueType.ARRAY, sub]
        scalar = self.gguf_scalar_to_np.get(sub)
        if scalar is None:  # nested arrays: gguf's own way
            return super()._get_field_parts(orig_offs, raw_type)
        values = self._get(offs, scalar, int(length[0]))
        if len(values) != int(length[0]):
            raise IndexError(f"an array at byte {offs} runs past the end of the file")
        return 12 + int(values.nbytes), [item_type, length, values], [2], [gguf.GGUFValueType.ARRAY, sub]

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        size = len(self.data)
        for info in fields:
            name = bytes(info.parts[1]).decode("utf-8", errors="replace")
            raw_type = int(info.parts[4][0])
            try:
                qtype = T(raw_type)
            except ValueError:
                raise GGUFError(f"{self.path}: tensor {name!r} has GGML type id {raw_type}, which the gguf library "
                                f"does not know; supported: {gguf_blocks.type_names()}") from None
            if qtype not in gguf_blocks.SUPPORTED_TYPES:
                raise GGUFError(f"{self.path}: tensor {name!r} is of GGML type {qtype.name}, which the engine does "
                                f"not read; supported: {gguf_blocks.type_names()} (re-quantize the model to one "
                                "of them, e.g. with llama-quantize)")
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            n = int(np.prod(info.parts[3].astype(np.int64)))
            if n % block:
                raise GGUFError(f"{self.path}: tensor {name!r} has {n} values, not a whole number of {qtype.name} "
                                f"blocks of {block}")
            end = start_offs + int(info.parts[5][0]) + n // block * block_bytes
            if end > size:
                raise GGUFError(f"{self.path} is truncated: tensor {name!r} ({qtype.name}, shape "
                                f"{list(reversed(info.parts[3].tolist()))}) ends at byte {end} but the file has "
                                f"{size}: {end - size} bytes are missing; download the file again")
        super()._build_tensors(start_offs, fields)


def _open(path: Path) -> _Reader:
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); the engine loads GGUF "
                        "files and Hugging Face checkpoint folders")
    try:
        reader = _Reader(path, mode="c")  # copy-on-write mapping: writable views, the file is never written
    except GGUFError:
        raise
    except (IndexError, ValueError, KeyError, UnicodeDecodeError, OverflowError) as exc:
        raise GGUFError(f"{path} is truncated or corrupt in its header ({size} bytes; {type(exc).__name__}: {exc}); "
                        "download the file again") from exc
    return reader


@dataclass
class GGUFModel:
    """One GGUF model: its readers (one per split), metadata and tensors by name."""

    files: list[Path]
    readers: list[_Reader]
    metadata: dict[str, Any]
    tensors: dict[str, tuple[_Reader, Any]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return _model_name(self.files[0])

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise GGUFError(f"{self.files[0]} has no metadata key {key!r}: it is not a complete {ARCH} GGUF (convert "
                            "the model again with llama.cpp's convert_hf_to_gguf.py or `python -m workbench "
                            "export-gguf`)")
        return self.metadata[key]


def _field_value(f: Any) -> Any:
    if not f.types:
        return None
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", errors="surrogateescape") for i in f.data]
        return np.concatenate([np.atleast_1d(f.parts[i]) for i in f.data]) if f.data else np.array([])
    return f.contents()


def open_gguf(path: str | Path) -> GGUFModel:
    """Open and check a GGUF model (every split), without building anything."""
    files = gguf_files(path)
    readers = [_open(p) for p in files]
    metadata = {key: _field_value(f) for key, f in readers[0].fields.items() if not key.startswith("GGUF.")}
    arch = metadata.get(Keys.General.ARCHITECTURE)
    if arch != ARCH:
        raise GGUFError(f"{files[0].name} is a GGUF of architecture {arch!r}; the engine runs GLM-4.5 family models, "
                        f"architecture {ARCH!r} (GLM-4.5, GLM-4.5-Air)")
    model = GGUFModel(files, readers, metadata)
    for reader in readers:
        for tensor in reader.tensors:
            if tensor.name in model.tensors:
                raise GGUFError(f"tensor {tensor.name!r} appears twice in the split files of {model.name}")
            model.tensors[tensor.name] = (reader, tensor)
    return model


# --- config -------------------------------------------------------------------------------------------------
def _key(name: str) -> str:
    return name.format(arch=ARCH)


def _f32(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05 is stored as 9.99999975e-06)."""
    return float(str(np.float32(value)))


def config_from_gguf(model: GGUFModel) -> GLMConfig:
    """The GLMConfig the metadata describes, read as llama.cpp reads it (its defaults where a key is optional)."""
    k = Keys.LLM
    get, req = model.get, model.require
    gating = get(_key(k.EXPERT_GATING_FUNC), 2)
    if gating not in (0, 2):  # 0: unset, which llama.cpp reads as sigmoid for glm4moe
        raise GGUFError(f"{model.files[0].name}: expert_gating_func = {gating}; GLM-4.5 routes with sigmoid (2)")
    scaling = get(_key(Keys.Rope.SCALING_TYPE), "none")
    if scaling not in ("none", None):
        raise GGUFError(f"{model.files[0].name}: rope scaling {scaling!r} is not supported (only plain RoPE)")
    nextn = int(get(_key(k.NEXTN_PREDICT_LAYERS), 0))
    heads = int(req(_key(Keys.Attention.HEAD_COUNT)))
    hidden = int(req(_key(k.EMBEDDING_LENGTH)))
    head_dim = int(get(_key(Keys.Attention.KEY_LENGTH), hidden // heads))
    rotary = int(get(_key(Keys.Rope.DIMENSION_COUNT), head_dim))
    tokens = get(Keys.Tokenizer.LIST)
    embed = model.tensors.get("token_embd.weight")
    vocab = int(embed[1].shape[1]) if embed else len(tokens or [])
    n_kv = get(_key(Keys.Attention.HEAD_COUNT_KV), heads)
    expert_width = get(_key(k.EXPERT_FEED_FORWARD_LENGTH))
    values = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(req(_key(k.FEED_FORWARD_LENGTH))),
        num_hidden_layers=int(req(_key(k.BLOCK_COUNT))) - nextn,
        num_attention_heads=heads,
        num_key_value_heads=int(n_kv if np.ndim(n_kv) == 0 else n_kv[0]),
        head_dim=head_dim,
        max_position_embeddings=int(get(_key(k.CONTEXT_LENGTH), 131072)),
        rms_norm_eps=_f32(req(_key(Keys.Attention.LAYERNORM_RMS_EPS))),
        tie_word_embeddings="output.weight" not in model.tensors,
        rope_theta=_f32(get(_key(Keys.Rope.FREQ_BASE), 10000.0)),
        partial_rotary_factor=rotary / head_dim,
        attention_bias="blk.0.attn_q.bias" in model.tensors,
        use_qk_norm="blk.0.attn_q_norm.weight" in model.tensors,
        moe_intermediate_size=int(expert_width if np.ndim(expert_width) == 0 else expert_width[-1])
        if expert_width is not None else int(req(_key(k.EXPERT_FEED_FORWARD_LENGTH))),
        num_experts_per_tok=int(req(_key(k.EXPERT_USED_COUNT))),
        n_shared_experts=int(req(_key(k.EXPERT_SHARED_COUNT))),
        n_routed_experts=int(req(_key(k.EXPERT_COUNT))),
        routed_scaling_factor=_f32(get(_key(k.EXPERT_WEIGHTS_SCALE), 1.0)),
        n_group=int(get(_key(k.EXPERT_GROUP_COUNT), 1) or 1),
        topk_group=int(get(_key(k.EXPERT_GROUP_USED_COUNT), 1) or 1),
        first_k_dense_replace=int(get(_key(k.LEADING_DENSE_BLOCK_COUNT), 0)),
        norm_topk_prob=bool(get(_key(k.EXPERT_WEIGHTS_NORM), False)),
        num_nextn_predict_layers=nextn,
    )
    try:
        return GLMConfig(**values)
    except ConfigError as exc:
        raise GGUFError(f"{model.files[0].name}: its metadata describes a model the engine cannot run: {exc}") from exc


# --- tokenizer ----------------------------------------------------------------------------------------------
# GLM-4 / GLM-4.5's pre-tokenizer split (llama.cpp's LLAMA_VOCAB_PRE_TYPE_CHATGLM4, pre-type "glm4")
GLM4_PRETOKENIZER_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GLM4_PRE_TYPES = ("glm4", "chatglm-bpe")
GPT2_PRE_TYPES = ("gpt-2", "default")


def tokenizer_from_gguf(model: GGUFModel):
    """Our Tokenizer over a `tokenizers` byte-level BPE built from tokenizer.ggml.{tokens,merges,token_type},
    with the GGUF's chat template and its eos/eot/eom ids (and GLM's stop tokens) as stop ids."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from workbench.engine.tokenizer import GLM_STOP_TOKENS, Tokenizer

    kind = model.get(Keys.Tokenizer.MODEL)
    if kind != "gpt2":
        raise GGUFError(f"{model.files[0].name}: tokenizer.ggml.model is {kind!r}; GLM-4.5 uses a byte-level BPE "
                        "('gpt2')")
    tokens: list[str] = model.require(Keys.Tokenizer.LIST)
    merges: list[str] = model.require(Keys.Tokenizer.MERGES)
    types = model.get(Keys.Tokenizer.TOKEN_TYPE)
    types = [int(t) for t in types] if types is not None else [1] * len(tokens)
    # every token keeps its id (added ones too: registering them below then reuses it); padding ids
    # ([PAD123], type UNUSED) are no tokens of the HF tokenizer, so they stay out
    normal = {tok: i for i, (tok, kind_) in enumerate(zip(tokens, types)) if kind_ != gguf.TokenType.UNUSED}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = HFTokenizer(models.BPE(vocab=normal, merges=pairs, fuse_unk=False, byte_fallback=False))
    pre = model.get(Keys.Tokenizer.PRE, "default")
    if pre in GPT2_PRE_TYPES:
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        if pre not in GLM4_PRE_TYPES:
            log.warning("%s: tokenizer.ggml.pre %r is not a GLM pre-tokenizer; splitting text as GLM-4.5 does",
                        model.files[0].name, pre)
        bpe.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GLM4_PRETOKENIZER_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    # added tokens: matched in text before the BPE runs (special = CONTROL: skipped by skip_special_tokens)
    special: dict[str, int] = {}
    for i, (tok, kind_) in enumerate(zip(tokens, types)):
        if kind_ in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            is_special = kind_ == gguf.TokenType.CONTROL
            added = AddedToken(tok, special=is_special, normalized=False, single_word=False, lstrip=False,
                               rstrip=False)
            bpe.add_special_tokens([added]) if is_special else bpe.add_tokens([added])
            if bpe.token_to_id(tok) != i:
                raise GGUFError(f"{model.files[0].name}: added token {tok!r} should have id {i} but the vocabulary "
                                f"gives it {bpe.token_to_id(tok)}: tokenizer.ggml.tokens is inconsistent")
            if is_special:
                special[tok] = i
    stop = {model.get(key) for key in (Keys.Tokenizer.EOS_ID, Keys.Tokenizer.EOT_ID, Keys.Tokenizer.EOM_ID)}
    stop |= {i for t in GLM_STOP_TOKENS if (i := bpe.token_to_id(t)) is not None}
    stop_ids = sorted(int(i) for i in stop if i is not None)
    return Tokenizer(bpe, model.get(Keys.Tokenizer.CHAT_TEMPLATE), stop_ids or None, special)


# --- tensors ------------------------------------------------------------------------------------------------
Weight = torch.Tensor | Int8Weight | Int4Weight


def decoder_tensors(model: GGUFModel, config: GLMConfig) -> Iterator[tuple[str, _Reader, Any, str | None]]:
    """(name, reader, tensor info, expert projection) for every tensor of the decoding model, in file order: the
    HF name and None for a whole tensor; for a stack of routed experts, the layer's prefix ("model.layers.3.") and
    the projection ("gate_proj", "up_proj" or "down_proj"). The nextn block's tensors are skipped (one log line);
    a name that is not part of a glm4moe model is a GGUFError. The one GGUF-to-HF name walk: the in-memory import
    (`hf_tensors`) and the repack cache (gguf_cache) both read the file through it."""
    skipped = 0
    for name, (reader, info) in model.tensors.items():
        if name in GLOBAL_NAMES:
            yield GLOBAL_NAMES[name], reader, info, None
            continue
        match = _BLK.match(name)
        if match is None:
            raise GGUFError(f"unexpected tensor {name!r} in {model.name}: not part of a {ARCH} model")
        layer, rest = int(match[1]), match[2]
        if layer >= config.num_hidden_layers:
            skipped += 1  # the multi-token-prediction block(s) after the decoder layers
            continue
        prefix = f"model.layers.{layer}."
        if rest in LAYER_NAMES:
            yield prefix + LAYER_NAMES[rest], reader, info, None
        elif rest in EXPERT_NAMES:
            yield prefix, reader, info, EXPERT_NAMES[rest]
        else:
            raise GGUFError(f"unexpected tensor {name!r} in {model.name}: not part of a {ARCH} decoder layer")
    if skipped:
        log.info("skipped %d tensors of the multi-token-prediction layer (not used for plain decoding)", skipped)


def hf_tensors(model: GGUFModel, config: GLMConfig) -> Iterator[tuple[str, Weight]]:
    """(HF name, weight) for every tensor of the decoding model, in file order, each decoded as it is reached;
    the nextn block's tensors are skipped. Float tensors are views of the mapped file."""
    for name, reader, info, projection in decoder_tensors(model, config):
        if projection is None:
            yield name, _decode(info)
        else:  # decoded expert by expert: the stack is never decoded whole beside the model
            for expert in range(int(info.shape[-1])):
                yield f"{name}mlp.experts.{expert}.{projection}.weight", _decode(info, expert)
        _release(reader, info)


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _release(reader: _Reader, info: Any, index: int | None = None) -> None:
    """Drop the resident pages of a tensor (or of its `index`-th slice along the first dimension: one expert of
    a stack) the consumer has taken (decoded, copied, or kept as a view: a private mapping never written
    refaults its pages from the file when read), so that reading a file does not leave it all in memory beside
    the model built from it."""
    if _LIBC is None:
        return
    page = mmap.PAGESIZE
    base = reader.data.ctypes.data + int(info.data_offset)
    nbytes = int(info.n_bytes)
    if index is not None:
        nbytes //= int(info.shape[-1])  # gguf lists the shape innermost first: the stack's count is last
        base += index * nbytes
    start = -(-base // page) * page  # whole pages inside the tensor only
    stop = (base + nbytes) // page * page
    if stop > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), mmap.MADV_DONTNEED)


# Block-quantized tensors are decoded in row chunks of about this many bytes, each first copied out of the mapping
# whole: a strided read straight from a file mapping (the decoders pick a block's quants apart from its scale) ran
# at ~30 MB/s here against ~250 MB/s from memory, and a chunk bounds the transient copy of a large matrix.
DECODE_CHUNK_BYTES = 8 << 20


def _decode(info: Any, index: int | None = None) -> Weight:
    raw = torch.from_numpy(info.data)  # a view of the copy-on-write mapping
    if index is not None:
        raw = raw[index]
    if info.tensor_type in gguf_blocks.FLOAT_TYPES:
        return gguf_blocks.decode(raw, info.tensor_type)  # a view: no copy
    raw = raw.reshape(*raw.shape[:-1], -1)
    lead = raw.shape[:-1]
    rows = raw.reshape(-1, raw.shape[-1])
    step = max(1, DECODE_CHUNK_BYTES // max(1, rows.shape[1]))
    if rows.shape[0] <= step:
        return gguf_blocks.decode(rows.clone().reshape(raw.shape), info.tensor_type)
    out = None
    for start in range(0, rows.shape[0], step):
        part = gguf_blocks.decode(rows[start:start + step].clone(), info.tensor_type)
        if out is None:  # the outputs' fields, allocated whole once their widths are known
            out = _map_weight(part, lambda t: torch.empty((rows.shape[0], *t.shape[1:]), dtype=t.dtype))
        _map_weight(out, lambda t, s=start: t[s:s + step], part, lambda dest, src: dest.copy_(src))
    return _map_weight(out, lambda t: t.reshape(*lead, t.shape[-1]))


def _map_weight(value: Weight, fn, other: Weight | None = None, pair=None) -> Weight:
    """`fn` over a weight's tensors (each field of a quantized one); with `other` and `pair`, pair(fn(mine),
    other's) for each field instead (returns None)."""
    if isinstance(value, torch.Tensor):
        return fn(value) if other is None else pair(fn(value), other)
    names = [f.name for f in dataclasses.fields(value) if isinstance(getattr(value, f.name), torch.Tensor)]
    if other is not None:
        for name in names:
            pair(fn(getattr(value, name)), getattr(other, name))
        return value
    return dataclasses.replace(value, **{name: fn(getattr(value, name)) for name in names})


def describe_types(model: GGUFModel) -> str:
    """One line: how many tensors (and bytes) of each type, and what the engine does with them."""
    counts: dict[str, list[int]] = {}
    for _reader, info in model.tensors.values():
        entry = counts.setdefault(info.tensor_type.name, [0, 0])
        entry[0] += 1
        entry[1] += int(info.n_bytes)

    def fate(name: str) -> str:
        qtype = T[name]
        if qtype in gguf_blocks.EXACT_TYPES:
            return gguf_blocks.EXACT_TYPES[qtype]
        return "as is" if qtype in gguf_blocks.FLOAT_TYPES else "dequantized"

    return ", ".join(f"{name} x{n} ({size / 2**20:.1f} MiB) -> {fate(name)}"
                     for name, (n, size) in sorted(counts.items()))


def _dequantize_note(model: GGUFModel, dtype: torch.dtype) -> str | None:
    """The cost of reading block types we do not pack: their bytes now and as `dtype` values."""
    slow = [(info.tensor_type.name, int(info.n_bytes), int(info.n_elements)) for _r, info in model.tensors.values()
            if info.tensor_type in gguf_blocks.DEQUANTIZED_TYPES]
    if not slow:
        return None
    names = sorted({s[0] for s in slow})
    before = sum(s[1] for s in slow)
    after = sum(s[2] for s in slow) * dtype.itemsize
    return (f"{len(slow)} tensors of type {'/'.join(names)} are dequantized to {str(dtype).removeprefix('torch.')} "
            f"(no packed format of ours for them): {before / 2**20:.1f} MiB in the file become "
            f"{after / 2**20:.1f} MiB in memory, and read at that width each token")


# --- the model ------------------------------------------------------------------------------------------------
class _Stream:
    """A TensorSource for the checkpoint loader over already-decoded GGUF tensors (dequantized on request)."""

    def __init__(self, path: Path, dtype: torch.dtype) -> None:
        self.path, self.dtype = path, dtype
        self.current: dict[str, Weight] = {}

    def tensor(self, name: str) -> torch.Tensor:
        value = self.current.pop(name)
        if isinstance(value, Int8Weight | Int4Weight):
            return dequantize(value, self.dtype)
        return value

    def release(self, name: str) -> None:
        pass


def build_model(config: GLMConfig, tensors: Iterator[tuple[str, Weight]], dtype: torch.dtype,
                device: torch.device, source: Path):
    """The engine's model from (HF name, weight) pairs: the one place a GGUF's weights enter the engine.

    On the CPU, the quantized model builder (int_quant.build_quantized_model) takes them as they are: Int8Weight
    and Int4Weight stay packed for the integer kernels, float tensors stay dense (quantize=None). On GPUs (no
    integer kernels there), quantized weights are dequantized to `dtype` here and placed by the checkpoint loader
    (weights.load_weights), one tensor at a time."""
    from workbench.engine import int_quant

    if device.type == "cpu":
        note = int_quant.cpu_note()
        if note:
            log.warning(note)
        model = int_quant.build_quantized_model(config, tensors, None, dtype=dtype)
        model.fuse_projections()
        return model
    return build_dequantized_model(config, tensors, dtype, device, source)


def build_dequantized_model(config: GLMConfig, tensors: Iterator[tuple[str, Weight]], dtype: torch.dtype,
                            device: torch.device, source: Path):
    """A plain model (every weight in `dtype`) from (HF name, weight) pairs, quantized ones dequantized one at a
    time: the GPU path, where no integer kernels run."""
    from workbench.engine.model import GLMForCausalLM
    from workbench.engine.weights import load_weights

    stream = _Stream(source, dtype)

    def pairs() -> Iterator[tuple[str, _Stream]]:
        for name, value in tensors:
            stream.current[name] = value
            yield name, stream

    with torch.device("meta"):
        model = GLMForCausalLM(config)
    load_weights(model, config, None, dtype, device, tensors=pairs())
    model.materialize_buffers(device)
    model.fuse_projections()
    return model

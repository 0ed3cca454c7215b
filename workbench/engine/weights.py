"""Checkpoint weights: safetensors files (single or sharded) read by memory map into a model built on `meta`.

Owns the file format checks, the checkpoint-name -> parameter table and the assignment. A tensor whose dtype
and layout already match is used in place (a view of the mapped file, no copy); one that must change dtype or
be stacked into an expert tensor is copied once into its destination, after which the pages it was read from
are dropped again (madvise), so the resident set grows by about the weights' size and not twice that.

We parse the safetensors header ourselves (8-byte little-endian length, JSON table, raw data) instead of going
through `safetensors.safe_open` because we need the byte offsets to release pages and to report truncation
precisely; writing checkpoints uses the `safetensors` library.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn

from workbench.engine import huge_pages, quant
from workbench.engine.config import GLMConfig

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint the engine cannot load; the message names the file or tensor and what is wrong."""


SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One .safetensors file, validated on open, its tensors served as zero-copy views of a private mapping."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path} is not a safetensors file: {size} bytes, shorter than its 8-byte header")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{path} is corrupt or truncated: its header claims {header_len} bytes but the "
                                      f"file has {size}")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{path} is corrupt: its header is not valid JSON ({exc})") from exc
            if not isinstance(header, dict):
                raise CheckpointError(f"{path} is corrupt: its header is not a JSON object")
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None
            if self._mmap is not None:
                huge_pages.advise(self._mmap)  # tensors used as views of the file are read through it every token
        data_start = 8 + header_len
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from exc
            expected = math.prod(shape) * dtype.itemsize
            if end - begin != expected or begin < 0:
                raise CheckpointError(f"{path}: tensor {name!r} spans {end - begin} bytes but shape {list(shape)} of "
                                      f"{info['dtype']} needs {expected}")
            if data_start + end > size:
                raise CheckpointError(f"{path} is truncated: tensor {name!r} needs bytes up to {data_start + end} but "
                                      f"the file has {size}; re-download or re-save the checkpoint")
            self.entries[name] = TensorEntry(dtype, shape, data_start + begin, data_start + end)

    def tensor(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        if entry.end == entry.begin:
            return torch.empty(entry.shape, dtype=entry.dtype)
        flat = torch.frombuffer(self._mmap, dtype=torch.uint8, count=entry.end - entry.begin, offset=entry.begin)
        return flat.view(entry.dtype).view(entry.shape)

    def release(self, name: str) -> None:
        """Drop the resident pages of a tensor that was copied elsewhere (they refault from the file if read)."""
        entry = self.entries[name]
        page = mmap.PAGESIZE
        start = (entry.begin + page - 1) // page * page  # only whole pages inside this tensor's range
        stop = entry.end // page * page
        if self._mmap is not None and stop > start and hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, from its index when sharded."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map' object)") from exc
        files = sorted({folder / shard for shard in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that are not in {folder}: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {folder}")


# --- the name table ----------------------------------------------------------------------------------------
# Checkpoint name (regex) -> parameter name template, and where the tensor goes in that parameter:
# None = the whole parameter; ("expert", i, part) = expert i's slot of a stacked [E, ...] tensor, part being
# "gate" (first half of gate_up_proj rows), "up" (second half) or "all".
_L = r"model\.layers\.(?P<layer>\d+)\."
NAME_TABLE: list[tuple[str, str, str | None]] = [
    (r"model\.embed_tokens\.weight", "embed_tokens.weight", None),
    (r"model\.norm\.weight", "norm.weight", None),
    (r"lm_head\.weight", "lm_head.weight", None),
    (_L + r"(?P<rest>(input_layernorm|post_attention_layernorm)\.weight)", "layers.{layer}.{rest}", None),
    (_L + r"(?P<rest>self_attn\.[qkvo]_proj\.(weight|bias))", "layers.{layer}.{rest}", None),
    (_L + r"(?P<rest>self_attn\.[qk]_norm\.weight)", "layers.{layer}.{rest}", None),
    (_L + r"(?P<rest>mlp\.(gate|up|down)_proj\.weight)", "layers.{layer}.{rest}", None),
    (_L + r"(?P<rest>mlp\.gate\.(weight|e_score_correction_bias))", "layers.{layer}.{rest}", None),
    (_L + r"(?P<rest>mlp\.shared_experts\.(gate|up|down)_proj\.weight)", "layers.{layer}.{rest}", None),
    (_L + r"mlp\.experts\.(?P<expert>\d+)\.gate_proj\.weight", "layers.{layer}.mlp.experts.gate_up_proj", "gate"),
    (_L + r"mlp\.experts\.(?P<expert>\d+)\.up_proj\.weight", "layers.{layer}.mlp.experts.gate_up_proj", "up"),
    (_L + r"mlp\.experts\.(?P<expert>\d+)\.down_proj\.weight", "layers.{layer}.mlp.experts.down_proj", "all"),
    # transformers >= 5 holds experts fused in memory; accept files saved in that layout too.
    (_L + r"(?P<rest>mlp\.experts\.(gate_up_proj|down_proj))", "layers.{layer}.{rest}", None),
]
_COMPILED = [(re.compile(pattern + "$"), target, part)
             for pattern, target, part in NAME_TABLE + quant.FP8_NAME_TABLE]  # + FP8 scales
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Placement:
    param: str
    expert: int | None = None
    part: str | None = None


def map_name(name: str) -> Placement | None:
    for pattern, target, part in _COMPILED:
        match = pattern.match(name)
        if match:
            groups = match.groupdict()
            expert = int(groups["expert"]) if "expert" in groups and groups["expert"] is not None else None
            return Placement(target.format(**groups), expert, part)
    return None


def _slot(dest: torch.Tensor, placement: Placement) -> torch.Tensor:
    if placement.expert is None:
        return dest
    if placement.expert >= dest.shape[0]:
        raise CheckpointError(f"expert index {placement.expert} is out of range for {placement.param} with "
                              f"{dest.shape[0]} experts (config n_routed_experts)")
    block = dest[placement.expert]
    half = block.shape[0] // 2
    return {"gate": block[:half], "up": block[half:], "all": block}[placement.part]


# safetensors aligns tensor data to 8 bytes only; CPU GEMMs on a misaligned weight ran about 3x slower here, so a
# view is used in place only at this alignment and is otherwise copied once (the copy replaces the view: 1x).
CPU_ALIGNMENT = 64

# Tensors kept in fp32 whatever the model dtype: they decide discrete routing choices.
FP32_PARAMS = re.compile(r"layers\.\d+\.mlp\.gate\.(weight|e_score_correction_bias)$")


class TensorSource(Protocol):
    """Where the loader reads a tensor from: a safetensors file, or any other file that serves tensors by name."""

    path: Path

    def tensor(self, name: str) -> torch.Tensor: ...

    def release(self, name: str) -> None: ...


def iter_checkpoint_tensors(folder: Path) -> Iterator[tuple[str, SafetensorsFile]]:
    for path in checkpoint_files(folder):
        file = SafetensorsFile(path)
        for name in file.entries:
            yield name, file


def check_expert_coverage(config: GLMConfig, covered: dict[str, set]) -> None:
    """Every routed expert's every part was read: `covered` maps a stacked expert parameter to the (expert, part)
    slots filled; the first missing tensor is named as a checkpoint names it."""
    for param, slots in covered.items():
        parts = ("gate", "up") if "gate_up_proj" in param else ("all",)
        want = {(e, p) for e in range(config.n_routed_experts) for p in parts}
        if slots != want:
            first = sorted(want - slots)[0]
            layer_id = param.split(".")[1]
            proj = "down_proj" if first[1] == "all" else f"{first[1]}_proj"
            raise CheckpointError(f"missing tensor 'model.layers.{layer_id}.mlp.experts.{first[0]}.{proj}.weight' "
                                  f"(and {len(want - slots) - 1} more expert tensors of layer {layer_id})")


def load_weights(model: nn.Module, config: GLMConfig, folder: Path | None, dtype: torch.dtype,
                 device: torch.device, tensors: Iterable[tuple[str, TensorSource]] | None = None) -> None:
    """Assign every parameter of `model` (built on the meta device) from the checkpoint in `folder`, or from
    `tensors`: (checkpoint name, source) pairs whose source serves `.tensor(name)` (a GGUF file's, say)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = config.tie_word_embeddings
    filled: dict[str, torch.Tensor] = {}  # real tensors for parameters assigned so far
    covered: dict[str, set] = {}  # stacked expert params: which (expert, part) slots were written
    skipped_mtp = 0
    scheme = getattr(model, "quant_scheme", None)  # set by quant.quantize_model when the model is FP8
    for name, file in tensors if tensors is not None else iter_checkpoint_tensors(folder):
        layer = _LAYER.match(name)
        if layer and int(layer.group(1)) >= config.num_hidden_layers:
            skipped_mtp += 1  # the multi-token-prediction layer(s) stored after the decoder layers
            continue
        if tied and name == "lm_head.weight":
            continue
        if quant.UNUSED_CHECKPOINT_TENSORS.search(name):
            continue  # static FP8 activation scales: activations are quantised per token, if at all
        placement = map_name(name)
        if placement is None or placement.param not in params:
            raise CheckpointError(f"unexpected tensor {name!r} in {file.path.name}: the {config.model_type} model "
                                  "built from config.json has no such parameter (does config.json match the weights?)")
        target_dtype = torch.float32 if FP32_PARAMS.search(placement.param) else dtype
        # FP8 models: a dense tensor bound for an FP8 parameter is quantised here (weight + scale).
        for param, source, target_dtype in quant.expand_fp8_load(  # noqa: B020 - each item replaces them
                placement.param, file.tensor(name), params[placement.param], target_dtype, device, scheme):
            placement = replace(placement, param=param)
            meta = params[placement.param]
            if placement.expert is None:
                if tuple(source.shape) != tuple(meta.shape):
                    raise CheckpointError(f"tensor {name!r} has shape {list(source.shape)} in the checkpoint but the "
                                          f"model expects {list(meta.shape)} (from config.json)")
                if source.dtype == target_dtype and device.type == "cpu" and source.data_ptr() % CPU_ALIGNMENT == 0:
                    filled[placement.param] = source  # a view of the mapped file: no copy
                else:
                    filled[placement.param] = huge_pages.empty(source.shape, target_dtype, device).copy_(source)
                    file.release(name)
                continue
            if placement.param not in filled:
                filled[placement.param] = huge_pages.empty(meta.shape, target_dtype, device)
            slot = _slot(filled[placement.param], placement)
            if tuple(source.shape) != tuple(slot.shape):
                raise CheckpointError(f"tensor {name!r} has shape {list(source.shape)} in the checkpoint but the "
                                      f"model expects {list(slot.shape)} (from config.json)")
            slot.copy_(source)
            file.release(name)
            covered.setdefault(placement.param, set()).add((placement.expert, placement.part))

    if tied:
        filled["lm_head.weight"] = filled.get("embed_tokens.weight")
    check_expert_coverage(config, covered)
    missing = [p for p in params if filled.get(p) is None]
    if missing:
        raise CheckpointError(f"missing tensor for parameter {missing[0]!r} (shape {list(params[missing[0]].shape)})"
                              f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}: the checkpoint is "
                              "incomplete or config.json describes a different model")
    if skipped_mtp:
        log.info("skipped %d tensors of the multi-token-prediction layer (not used for plain decoding)", skipped_mtp)
    for name, tensor in filled.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight


# --- writing ------------------------------------------------------------------------------------------------
def checkpoint_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face checkpoint names (experts unstacked), the inverse of the table."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            prefix = "model." + name.rsplit(".", 1)[0]
            width = tensor.shape[1] // 2
            for expert in range(tensor.shape[0]):
                if name.endswith("gate_up_proj"):
                    out[f"{prefix}.{expert}.gate_proj.weight"] = tensor[expert, :width]
                    out[f"{prefix}.{expert}.up_proj.weight"] = tensor[expert, width:]
                else:
                    out[f"{prefix}.{expert}.down_proj.weight"] = tensor[expert]
        elif name == "lm_head.weight":
            if not getattr(model.config, "tie_word_embeddings", False):
                out[name] = tensor
        else:
            out["model." + name] = tensor
    keep_fp32 = re.compile(r"mlp\.gate\.(weight|e_score_correction_bias)$")
    return {name: (t if dtype is None or keep_fp32.search(name) else t.to(dtype)).detach().contiguous().cpu()
            for name, t in out.items()}


def save_checkpoint(model: nn.Module, folder: str | Path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int | None = None) -> Path:
    """Write config.json and model.safetensors (or shards plus model.safetensors.index.json) in HF layout."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_dict = model.config.to_dict()
    if dtype is not None:
        config_dict["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    tensors = checkpoint_state_dict(model, dtype)
    if max_shard_bytes is None:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder

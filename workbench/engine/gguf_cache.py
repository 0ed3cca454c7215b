"""A GGUF's weights repacked once into the engine's formats, in a cache file that later loads memory-map.

Owns `load_gguf` (a GGUF as model, tokenizer and name: gguf_file reads and checks the file, this module decides
where the weights come from) and the repack cache: where it lives, its key, writing it (tensor by tensor, bounded
memory, atomic), and opening it as zero-copy views, so that a GGUF larger than RAM loads and runs with the routed
experts paging in from disk as the router picks them (and out again under memory pressure: they are clean
file-backed pages).

**Why a repack, not views of the GGUF itself.** GGUF interleaves each block's scale with its quants (Q8_0: 34-byte
blocks of fp16 d + 32 int8; Q4_K: 144-byte super-blocks), while our `Int8Weight` / `Int4Weight` hold planes (all
the quants, then all the scales; Q4_K's nibbles in another order, its 6-bit scales unpacked), which is what the
compiled kernels (csrc/, owned elsewhere) read with aligned SIMD loads. Pointing our weights straight into the
mapped GGUF would need a second kernel family for the interleaved layouts and every kernel change done twice.
The repack costs one pass over the file on first load (decoding is vectorized torch, disk-bound) and ~6% more
disk than a Q8_0/Q4_K file (Q6_K: +52%, its 16-value groups get fp32 scales); every later load maps the cache
in well under a second per GB, and the kernels see ordinary contiguous tensors.

**The file** (`<gguf stem>-<hash of its path>-<hash of the key>.wbq` in the cache folder): the tensors' bytes,
each at a 64-byte-aligned offset, then a JSON index, then the index's length (8 bytes, little-endian) and the
magic `GLMWBQ01`. The index holds the key (format version; every GGUF file's absolute path, size and mtime) and,
per HF tensor name, its kind (`float`, `int8` with its group, `int4`) and its fields (dtype, shape, offset). Routed
experts are stored stacked as the model holds them (`mlp.experts.gate_up_proj` [E, 2I, D], gate rows then up
rows; `mlp.experts.down_proj` [E, D, I]), so the model builder keeps them as views of the mapping: no copy.
Everything else (attention, dense and shared MLPs, embeddings, norms, router) is in the file too; the builder
copies the parts it fuses (q/k/v, gate/up: small) and keeps the rest as views where the dtype already matches.
Block types we have no packed format for (Q5_K, ...) are stored dequantized (fp32) and so are copied into
memory in the engine's dtype: their experts are not memory-mapped (the load logs it).

**Where**: `$WORKBENCH_GGUF_CACHE` if set (a folder; `off` loads into memory as before), else
`~/.cache/glm-workbench/gguf`. The file is written under a temporary name beside its final one and renamed when
complete (a crash leaves no half cache that a later load would take); an older cache of the same GGUF path is
removed then. A cache that cannot be written (folder unwritable, disk full: checked before starting, and on
ENOSPC) falls back to loading into memory with a warning saying how to fix it, or, when the weights would not fit
in the available memory either, is a clear error. A damaged or stale cache is rebuilt.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from glm_kernels.blockquant import Int4Weight, Int8Weight

from workbench.engine import gguf_file, huge_pages
from workbench.engine.config import GLMConfig

log = logging.getLogger(__name__)

CACHE_ENV = "WORKBENCH_GGUF_CACHE"
DEFAULT_DIR = Path("~/.cache/glm-workbench/gguf")
VERSION = 1
MAGIC = b"GLMWBQ01"
SUFFIX = ".wbq"
ALIGN = 64  # every field starts at a multiple of this (the kernels' SIMD loads and the loader's CPU_ALIGNMENT)
# bytes per value in the cache, by GGUF type (the disk check before a repack; see the module docstring)
_BYTES_PER_VALUE = {T.F32: 4.0, T.F16: 2.0, T.BF16: 2.0, T.Q8_0: 1 + 4 / 32, T.Q4_0: 1 + 4 / 32,
                    T.Q5_0: 1 + 4 / 32, T.Q6_K: 1 + 4 / 16, T.Q4_K: 0.5 + 8 / 256 + 2 / 32}
_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.int8,
                                                            torch.uint8)}


class CacheUnavailable(OSError):
    """The cache cannot be written (or read): the message says why and how to fix it."""


def cache_dir(setting: str | Path | None = None) -> Path | None:
    """The cache folder: `setting`, else $WORKBENCH_GGUF_CACHE, else ~/.cache/glm-workbench/gguf; None for "off"."""
    value = setting if setting is not None else os.environ.get(CACHE_ENV)
    if value is None or str(value) == "":
        return DEFAULT_DIR.expanduser()
    if str(value).lower() in ("off", "0", "false", "none", "no"):
        return None
    return Path(value).expanduser()


def cache_key(files: list[Path]) -> dict[str, Any]:
    stats = [(str(p.resolve()), p.stat()) for p in files]
    return {"version": VERSION, "files": [{"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
                                          for path, st in stats]}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def cache_path(folder: Path, files: list[Path], stem: str) -> Path:
    key = cache_key(files)
    return folder / f"{stem}-{_digest(key['files'][0]['path'])}-{_digest(key)}{SUFFIX}"


def estimated_bytes(model) -> int:
    """The cache file's size for a GGUFModel (within alignment padding)."""
    total = 0
    for _reader, info in model.tensors.values():
        total += int(int(info.n_elements) * _BYTES_PER_VALUE.get(info.tensor_type, 4.0)) + 6 * ALIGN
    return total


# --- writing ----------------------------------------------------------------------------------------------------
def _fields(value: torch.Tensor | Int8Weight | Int4Weight) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(kind record, {field: tensor}) of one decoded value."""
    if isinstance(value, Int8Weight):
        return {"kind": "int8", "group": value.group}, {"q": value.q, "scales": value.scales}
    if isinstance(value, Int4Weight):
        return {"kind": "int4"}, {f: getattr(value, f) for f in ("packed", "d", "dmin", "sc", "mn")}
    return {"kind": "float"}, {"values": value}


def _bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


class _Writer:
    """Appends aligned fields to an open file and records them; stacked entries reserve their region first."""

    def __init__(self, f) -> None:
        self.f, self.offset = f, 0
        self.index: dict[str, dict[str, Any]] = {}

    def _reserve(self, nbytes: int) -> int:
        start = -(-self.offset // ALIGN) * ALIGN
        self.offset = start + nbytes
        return start

    def _write_at(self, offset: int, data: memoryview) -> None:
        if len(data):
            os.pwrite(self.f.fileno(), data, offset)

    def put(self, name: str, value) -> None:
        record, fields = _fields(value)
        record["fields"] = {}
        for field, tensor in fields.items():
            offset = self._reserve(tensor.numel() * tensor.element_size())
            self._write_at(offset, _bytes(tensor))
            record["fields"][field] = {"dtype": str(tensor.dtype).removeprefix("torch."),
                                       "shape": list(tensor.shape), "offset": offset}
        self.index[name] = record

    def put_slot(self, name: str, experts: int, part: int, parts: int, expert: int, value) -> None:
        """Expert `expert`'s rows (part `part` of `parts` along the rows) of the stacked entry `name`."""
        record, fields = _fields(value)
        entry = self.index.get(name)
        if entry is None:
            entry = self.index[name] = {**record, "fields": {}}
            for field, tensor in fields.items():
                shape = [experts, tensor.shape[0] * parts, *tensor.shape[1:]]
                nbytes = int(np.prod(shape)) * tensor.element_size()
                entry["fields"][field] = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": shape,
                                          "offset": self._reserve(nbytes)}
        if {k: v for k, v in entry.items() if k != "fields"} != record or set(entry["fields"]) != set(fields):
            from workbench.engine.weights import CheckpointError

            raise CheckpointError(f"the parts of {name} come in different formats ({entry['kind']} and "
                                  f"{record['kind']}): one format per stacked expert tensor")
        for field, tensor in fields.items():
            spec = entry["fields"][field]
            rows = spec["shape"][1] // parts
            if list(tensor.shape) != [rows, *spec["shape"][2:]]:
                from workbench.engine.weights import CheckpointError

                raise CheckpointError(f"expert {expert} of {name} has shape {list(tensor.shape)}, the others "
                                      f"{[rows, *spec['shape'][2:]]}")
            row_bytes = tensor[0].numel() * tensor.element_size() if rows else 0
            start = spec["offset"] + (expert * spec["shape"][1] + part * rows) * row_bytes
            self._write_at(start, _bytes(tensor))


def _entries(model, config: GLMConfig) -> Iterator[tuple[str, Any, Any, int | None]]:
    """(HF-or-stacked name, reader, tensor info, part) in file order; part is None for whole tensors, else
    the expert stack's row part (gate 0 / up 1 of gate_up, down 0)."""
    for name, reader, info, projection in gguf_file.decoder_tensors(model, config):
        if projection is None:
            yield name, reader, info, None
        elif projection == "down_proj":
            yield name + "mlp.experts.down_proj", reader, info, 0
        else:
            yield name + "mlp.experts.gate_up_proj", reader, info, {"gate_proj": 0, "up_proj": 1}[projection]


def write_cache(model, config: GLMConfig, path: Path) -> None:
    """Repack every tensor of the decoding model into `path` (atomically). Errors of the cache's own folder or
    disk are `CacheUnavailable`; errors reading the GGUF propagate as they are."""
    from workbench.engine.int_quant import loading_threads

    with loading_threads():
        _write_cache(model, config, path)


def _write_cache(model, config: GLMConfig, path: Path) -> None:
    from workbench.engine.gguf_file import _decode, _release

    need = estimated_bytes(model)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
    except OSError as exc:
        raise CacheUnavailable(f"cannot create the GGUF cache folder {path.parent} ({exc.strerror or exc})") from exc
    if free < need + (256 << 20):
        raise CacheUnavailable(f"the GGUF cache needs {need / 2**30:.1f} GiB but {path.parent} has "
                               f"{free / 2**30:.1f} GiB free")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    done = False
    try:
        with open(tmp, "wb") as f:
            writer = _Writer(f)
            stacks: dict[str, set[int]] = {}
            for name, reader, info, part in _entries(model, config):
                if part is None:
                    writer.put(name, _decode(info))
                else:
                    experts = int(info.shape[-1])
                    parts = 2 if name.endswith("gate_up_proj") else 1
                    stacks.setdefault(name, set()).add(part)
                    for expert in range(experts):
                        writer.put_slot(name, experts, part, parts, expert, _decode(info, expert))
                        _release(reader, info, expert)
                _release(reader, info)
            for name, parts_seen in stacks.items():  # a stack's rows never written would read as zeros
                if name.endswith("gate_up_proj") and parts_seen != {0, 1}:
                    from workbench.engine.weights import CheckpointError

                    layer = name.split(".")[2]
                    missing = "ffn_up_exps" if 0 in parts_seen else "ffn_gate_exps"
                    raise CheckpointError(f"missing tensor 'blk.{layer}.{missing}.weight' in {model.name}: the "
                                          "GGUF is incomplete")
            index = json.dumps({"key": cache_key(model.files), "tensors": writer.index}).encode()
            end = -(-writer.offset // ALIGN) * ALIGN
            os.pwrite(f.fileno(), index + len(index).to_bytes(8, "little") + MAGIC, end)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        done = True
    except OSError as exc:  # the cache's own disk or folder; errors reading the GGUF propagate as they are
        if isinstance(exc, CacheUnavailable) or exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS,
                                                                  errno.EACCES, errno.EPERM, errno.EFBIG):
            raise
        raise CacheUnavailable(f"writing the GGUF cache {path} failed: {exc.strerror or exc}") from exc
    finally:
        if not done:
            tmp.unlink(missing_ok=True)
    prune(path.parent, keep=path)


def _read_index(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 16:
            raise ValueError("shorter than its footer")
        f.seek(size - 16)
        footer = f.read(16)
        if footer[8:] != MAGIC:
            raise ValueError("no footer (an incomplete write?)")
        length = int.from_bytes(footer[:8], "little")
        if length > size - 16:
            raise ValueError("its index length runs past the start of the file")
        f.seek(size - 16 - length)
        meta = json.loads(f.read(length))
    meta["data_bytes"] = size - 16 - length
    return meta


def _stale(key: dict[str, Any]) -> bool:
    try:
        return cache_key([Path(entry["path"]) for entry in key["files"]]) != key
    except (OSError, KeyError, TypeError):
        return True


def prune(folder: Path, keep: Path | None = None) -> None:
    """Remove the caches in `folder` whose GGUF is gone or changed (their key says which), and temporary files
    of repacks whose process has ended."""
    for old in folder.glob(f"*{SUFFIX}"):
        if old == keep:
            continue
        try:
            stale = _stale(_read_index(old)["key"])
        except (OSError, ValueError, KeyError, TypeError):
            stale = True
        if stale:
            old.unlink(missing_ok=True)
    for tmp in folder.glob(f".*{SUFFIX}.*.tmp"):
        try:
            os.kill(int(tmp.name.rsplit(".", 2)[-2]), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            pass


# --- reading ----------------------------------------------------------------------------------------------------
@dataclass
class CachedWeights:
    path: Path
    index: dict[str, dict[str, Any]]
    data: np.ndarray  # the whole file, mapped copy-on-write (never written)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def tensor(self, spec: dict[str, Any]) -> torch.Tensor:
        dtype = _TORCH_DTYPES[spec["dtype"]]
        count = int(np.prod(spec["shape"])) * torch.empty((), dtype=dtype).element_size()
        raw = torch.from_numpy(self.data[spec["offset"]:spec["offset"] + count])
        return raw.view(dtype).reshape(spec["shape"])

    def weights(self) -> Iterator[tuple[str, torch.Tensor | Int8Weight | Int4Weight]]:
        """(HF name, value) of every tensor, each a view of the mapping; experts stacked."""
        for name, record in self.index.items():
            fields = {k: self.tensor(spec) for k, spec in record["fields"].items()}
            if record["kind"] == "int8":
                yield name, Int8Weight(fields["q"], fields["scales"], record["group"])
            elif record["kind"] == "int4":
                yield name, Int4Weight(**fields)
            else:
                yield name, fields["values"]


def open_cache(path: Path, files: list[Path]) -> CachedWeights | None:
    """The cache at `path` if it is complete and made from `files` as they are now; else None (a damaged one is
    removed, with a log line)."""
    if not path.is_file():
        return None
    try:
        meta = _read_index(path)
        if meta.get("key") != cache_key(files):
            log.info("GGUF cache %s was made from another version of the file: rebuilding it", path)
            return None
        ends = [spec["offset"] + int(np.prod(spec["shape"])) * _TORCH_DTYPES[spec["dtype"]].itemsize
                for record in meta["tensors"].values() for spec in record["fields"].values()]
        if ends and max(ends) > meta["data_bytes"]:
            raise ValueError("a tensor runs past its data")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("GGUF cache %s is damaged (%s): removing it and repacking", path, exc)
        path.unlink(missing_ok=True)
        return None
    data = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, the file is never written
    huge_pages.advise(data)  # before any page is read: the weights stream through it every token
    return CachedWeights(path, meta["tensors"], data.view(np.ndarray))


def _available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def cached_weights(model, config: GLMConfig, dtype: torch.dtype,
                   setting: str | Path | None = None) -> CachedWeights | None:
    """The GGUF's weights as views of its repack cache, repacking first if there is none; None where the cache is
    off or cannot be written and the weights fit in memory (the caller then loads them into memory); a clear
    GGUFError where they would not fit either."""
    from workbench.engine.gguf_file import GGUFError

    folder = cache_dir(setting)
    if folder is None:
        return None
    path = cache_path(folder, model.files, model.name)
    started = time.perf_counter()
    cached = open_cache(path, model.files)
    if cached is None:
        size = sum(p.stat().st_size for p in model.files)
        log.info("GGUF cache: repacking %s (%.2f GiB) into the engine's formats at %s (once; later loads map it)",
                 model.name, size / 2**30, path)
        try:
            write_cache(model, config, path)
        except CacheUnavailable as exc:
            fix = (f"set {CACHE_ENV} to a writable folder with {estimated_bytes(model) / 2**30:.1f} GiB free "
                   f"(or {CACHE_ENV}=off to load into memory)")
            in_memory = estimated_bytes(model)
            if in_memory > 0.9 * _available_memory():
                raise GGUFError(f"{model.name} cannot be memory-mapped: {exc}; and its weights "
                                f"({in_memory / 2**30:.1f} GiB) do not fit in the available memory "
                                f"({_available_memory() / 2**30:.1f} GiB): {fix}") from exc
            log.warning("GGUF cache unavailable (%s): loading %s into memory instead; to map it, %s", exc,
                        model.name, fix)
            return None
        cached = open_cache(path, model.files)
        if cached is None:  # pragma: no cover - just written and checked
            raise GGUFError(f"the GGUF cache {path} just written does not read back")
        elapsed = time.perf_counter() - started
        log.info("GGUF cache: repacked %s in %.1f s (%.0f MB/s of GGUF)", model.name, elapsed,
                 size / 1e6 / max(elapsed, 1e-9))
    else:
        log.info("GGUF cache: mapping %s (%.2f GiB) for %s", path, cached.nbytes / 2**30, model.name)
    copied = [name for name, record in cached.index.items()
              if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")) and record["kind"] == "float"
              and record["fields"]["values"]["dtype"] != str(dtype).removeprefix("torch.")]
    if copied:
        log.warning("%d routed-expert stacks of %s are float tensors of another dtype than the engine's (%s) or "
                    "of block types we have no packed format for: they are copied into memory, not memory-mapped "
                    "(e.g. %s)", len(copied), model.name, str(dtype).removeprefix("torch."), copied[0])
    return cached


def load_gguf(path: str | Path, dtype: torch.dtype, device: torch.device, cache: str | Path | None = None):
    """(model, tokenizer, name) of a GGUF model. Everything is checked before the weights are read, and a
    failure while reading them leaves nothing behind.

    On the CPU the weights come memory-mapped from the GGUF's repack cache (this module: made on first load;
    `cache` is its folder, or "off" to copy the weights into memory; default $WORKBENCH_GGUF_CACHE or
    ~/.cache/glm-workbench/gguf), so a file larger than RAM loads and its experts page in as they are used."""
    gguf_model = gguf_file.open_gguf(path)
    config = gguf_file.config_from_gguf(gguf_model)
    tokenizer = gguf_file.tokenizer_from_gguf(gguf_model)
    log.info("loading %s: %s", gguf_model.name, gguf_file.describe_types(gguf_model))
    note = gguf_file._dequantize_note(gguf_model, dtype)
    if note:
        log.warning(note)
    model = None
    started = time.perf_counter()
    try:
        cached = cached_weights(gguf_model, config, dtype, cache) if device.type == "cpu" else None
        tensors = cached.weights() if cached is not None else gguf_file.hf_tensors(gguf_model, config)
        model = gguf_file.build_model(config, tensors, dtype, device, gguf_model.files[0])
    except BaseException:
        model = None
        gc.collect()  # nothing partially loaded stays in memory
        raise
    log.info("loaded %s in %.1f s (%s)", gguf_model.name, time.perf_counter() - started,
             f"weights memory-mapped from {cached.path}" if cached is not None else f"weights in {device} memory")
    return model, tokenizer, gguf_model.name

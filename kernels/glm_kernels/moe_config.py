"""Tile configurations of the fused MoE kernels: JSON data keyed by experts, width, device and dtype.

A tuned file is named `E={experts},N={width},device_name={device},dtype={dtype}.json` (the device name as
`torch.cuda.get_device_name()` gives it, spaces as underscores) and maps token counts to a config:
`{"1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "num_warps": 4, "num_stages": 4}, ...}`;
the entry of the nearest token count is used. `bench/tune_moe.py` writes such files on a GPU. When no file
matches, `defaults.json` gives a config per dtype family. Files are looked up in $GLM_KERNELS_CONFIG_DIR first,
then in this package's `configs/` folder.

dtype names: bf16, fp16, fp32, fp8_w8a16 (FP8 weights, 16-bit activations), fp8_w8a8 (FP8 activations too),
with `_block{bn}x{bk}` appended for block-wise weight scales.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps", "num_stages")


@functools.lru_cache(maxsize=16)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index).replace(" ", "_")


def device_name(device: torch.device | str | None = None) -> str:
    """The file-name form of a device's name: 'NVIDIA_H200', or 'cpu' off CUDA."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return "cpu"
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


def config_file_name(experts: int, width: int, device: str, dtype: str) -> str:
    return f"E={experts},N={width},device_name={device},dtype={dtype}.json"


def _search_dirs() -> list[Path]:
    extra = os.environ.get("GLM_KERNELS_CONFIG_DIR")
    return ([Path(extra)] if extra else []) + [CONFIG_DIR]


@functools.lru_cache(maxsize=64)
def _load(path: Path) -> dict[int, dict]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"MoE tile config {path} is unreadable or not JSON ({exc}); fix or delete it") from exc
    table: dict[int, dict] = {}
    for tokens, config in raw.items():
        missing = [k for k in CONFIG_KEYS if k not in config]
        if not str(tokens).isdigit() or missing:
            raise ValueError(
                f"MoE tile config {path}: entry {tokens!r} must map a token count to a config with "
                f"{', '.join(CONFIG_KEYS)} (missing {', '.join(missing) or 'nothing'})"
            )
        table[int(tokens)] = {k: int(config[k]) for k in CONFIG_KEYS}
    return table


def _nearest(table: dict[int, dict], num_tokens: int) -> dict:
    return dict(table[min(table, key=lambda m: (abs(m - num_tokens), m))])


def dtype_family(dtype: str) -> str:
    return "fp8" if dtype.startswith("fp8") else ("fp32" if dtype == "fp32" else "16bit")


def tuned_config_path(experts: int, width: int, dtype: str, device: str) -> Path | None:
    """The tuned file for these keys, if one exists."""
    for folder in _search_dirs():
        path = folder / config_file_name(experts, width, device, dtype)
        if path.is_file():
            return path
    return None


def moe_tile_config(
    experts: int,
    width: int,
    num_tokens: int,
    dtype: str,
    *,
    hidden: int | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """The tile config of a fused MoE call: a tuned file's entry nearest to `num_tokens`, else a default.

    Looked up once per key and remembered, as every MoE layer of every step asks (`clear_cache()` forgets).
    """
    return dict(_cached_config(experts, width, num_tokens, dtype, device_name(device)))


@functools.lru_cache(maxsize=4096)
def _cached_config(experts: int, width: int, num_tokens: int, dtype: str, device: str) -> dict:
    path = tuned_config_path(experts, width, dtype, device)
    if path is not None:
        return _nearest(_load(path), num_tokens)
    defaults = json.loads((CONFIG_DIR / "defaults.json").read_text())
    table = {int(k): v for k, v in defaults[dtype_family(dtype)].items()}
    return _nearest(table, num_tokens)


def clear_cache() -> None:
    """Forget looked-up configs (after writing new files, or changing $GLM_KERNELS_CONFIG_DIR)."""
    _cached_config.cache_clear()
    _load.cache_clear()

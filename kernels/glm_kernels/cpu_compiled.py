"""The compiled CPU kernels (csrc/: decode_model.cpp, prefill_kernels.cpp, quant_kernels.cpp and their shared
simd.h, one Python module by module.cpp): building them once per machine, and finding them built. Only that: each
op's Python entry lives with its op (`attention.prefill_attention_compiled`, `fused_moe.fused_moe_compiled`,
`rotary.rotary_compiled`, `quant_linear.quantized_linear` and `quantized_fused_moe`), and the decode step
(`DecodeModel`) is driven by the engine's compiled CPU runner.

The extension holds the compiled twins of torch paths that stay the reference:
- `DecodeModel`: one decode step of a whole GLM-4.5 MoE model in one call, for one or many sequences (the
  engine's torch decode path; the engine hands over its weights and cache pools);
- `prefill_attention(q, k, v, scale)`: causal attention of one sequence, fp32, grouped-query heads taken
  together (`prefill_attention_reference`'s contract);
- `fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights)`: the routed experts of many fp32 tokens
  (`fused_moe_reference`'s contract);
- `rotary(q, k, cos, sin)`: the rotary embedding of many fp32 tokens (`rotary_reference`'s contract).

The source is compiled on first use with torch's extension builder (g++ and ninja; the `ninja` package from PyPI
brings the latter), about a minute, once per machine: the build lives under torch's extensions folder
(TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions) in a folder named by a hash of everything it depends on (the
sources, the flags, torch's version, the interpreter, the compiler and the CPU), so two venvs or checkouts on one
machine never rebuild each other's. It is built in a temporary folder and renamed into place: two processes that
build at once, or a build that is killed, never leave a half-written one. `load()` builds if needed and answers
None where it cannot (see `build_error()`); while it compiles, `building()` says so (the server's status shows it).
`module_for()` never builds: the op entries use the kernels once someone (the engine, at start) has loaded them.
A machine without a compiler logs one line and keeps the torch paths.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

NAME = "glm_cpu_compiled"
CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "module.cpp"]  # one translation unit: it includes the three below (torch's headers parsed once)
# in the build key too
HEADERS = [CSRC / "decode_model.cpp", CSRC / "prefill_kernels.cpp", CSRC / "quant_kernels.cpp", CSRC / "simd.h"]
# -march=native: compiled on the machine that runs it. -ffp-contract=off: no fused multiply-adds where the torch
# path has none, so results stay within an ulp or so of it.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off"]
# What the server's status says while the model waits for the build, and the log and the CLI before it.
BUILD_MESSAGE = "compiling CPU kernels, about a minute, once per machine"
# A temporary build folder older than this was left by a killed build (a build takes a minute or two).
STALE_BUILD_SECONDS = 24 * 3600

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None
_building = False


def load() -> ModuleType | None:
    """The compiled extension, building it first if this machine has not; None if it cannot be built here."""
    global _module, _error, _building
    with _lock:
        if _module is None and _error is None:
            try:
                _module = load_extension(NAME, SOURCES, CFLAGS, on_build=_announce_build, headers=HEADERS)
            except Exception as exc:  # no compiler, no headers, a failed compile: the torch paths serve instead
                lines = str(exc).strip().splitlines()
                # A failed compile's message is the whole compiler output: its first error says the most.
                errors = [line for line in lines if "error" in line.lower()]
                _error = f"{type(exc).__name__}: {(errors or lines or [''])[0]}"
                log.warning("compiled CPU kernels unavailable (%s); the torch paths serve instead", _error)
            finally:
                _building = False
        return _module


def build_error() -> str | None:
    """Why the extension could not be built, or None."""
    return _error


def building() -> str | None:
    """BUILD_MESSAGE while this process compiles the kernels, else None."""
    return BUILD_MESSAGE if _building else None


def _announce_build(folder: Path) -> None:
    global _building
    _building = True
    # A warning, so that a plain script, the CLI and the server's log show why the first start pauses.
    log.warning("%s (into %s)", BUILD_MESSAGE, folder)


def extensions_root() -> Path:
    """torch's extensions folder: TORCH_EXTENSIONS_DIR, else torch's default (under the user's cache)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def build_key(sources: Sequence[Path], cflags: Sequence[str], headers: Sequence[Path] = ()) -> str:
    """A hash of everything a build depends on: the sources' bytes, the flags, torch's version, the interpreter
    (each venv its own build), the compiler and, as -march=native compiles for this CPU, the CPU."""
    import torch

    digest = hashlib.sha256()
    for part in [torch.__version__, sys.executable, sys.version, os.environ.get("CXX", "c++"), _cpu_id(),
                 *cflags]:
        digest.update(part.encode() + b"\0")
    for source in [*sources, *headers]:
        digest.update(Path(source).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_dir(name: str, sources: Sequence[Path], cflags: Sequence[str], headers: Sequence[Path] = ()) -> Path:
    """The folder that holds (or will hold) the build of `name` from these sources, headers and flags."""
    return extensions_root() / f"{name}-{build_key(sources, cflags, headers)}"


def load_extension(name: str, sources: Sequence[Path], cflags: Sequence[str],
                   on_build: Callable[[Path], None] | None = None, headers: Sequence[Path] = ()) -> ModuleType:
    """The extension `name` (its sources' module named TORCH_EXTENSION_NAME), imported from its build folder
    (`build_dir`); if the folder does not exist yet, `on_build(folder)` is called and the extension is compiled
    into a temporary folder beside it, which is renamed into place once complete."""
    folder = build_dir(name, sources, cflags, headers)
    library = folder / f"{name}{_library_suffix()}"
    if library.exists():
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if on_build is not None:
        on_build(folder)
    return _build(name, sources, cflags, folder)


def _build(name: str, sources: Sequence[Path], cflags: Sequence[str], folder: Path) -> ModuleType:
    try:  # torch's builder runs `ninja` from PATH; the PyPI package keeps its binary beside the module
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    from torch.utils.cpp_extension import load as torch_load

    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(folder)
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-", dir=folder.parent))
    try:
        scratch.chmod(0o755)  # mkdtemp's folder is private; the finished build is as readable as torch's own
        # The module is imported from the scratch folder; on Linux it stays loaded when the folder moves or goes.
        module = torch_load(name=name, sources=[str(s) for s in sources], extra_cflags=list(cflags),
                            build_directory=str(scratch), verbose=False)
        if folder.exists() and not (folder / f"{name}{_library_suffix()}").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a folder without the library was not made here: redo it
        try:
            scratch.rename(folder)  # atomic: the folder appears complete, or not at all
        except OSError:  # another process finished the same build first: its folder stays, ours goes
            shutil.rmtree(scratch, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    log.info("compiled %s in %.0f s into %s", name, time.monotonic() - started, folder)
    return module


def _remove_stale_builds(folder: Path) -> None:
    """Temporary folders of builds that were killed long ago (a build in progress is minutes old)."""
    for scratch in folder.parent.glob(f".{folder.name}.building-*"):
        try:
            if time.time() - scratch.stat().st_mtime > STALE_BUILD_SECONDS:
                shutil.rmtree(scratch, ignore_errors=True)
        except OSError:
            pass


def _library_suffix() -> str:
    return ".pyd" if sys.platform == "win32" else ".so"


def _cpu_id() -> str:
    """The CPU's instruction-set flags (what -march=native compiles for), or the best name the platform gives."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() + " " + platform.processor()


def module_for(*tensors) -> ModuleType | None:
    """The loaded extension if it can compute on these tensors, else None (and it is never built here: the
    engine loads it at start). It computes fp32 CPU tensors without autograd: a model that trains (inputs that
    require grad, with grad on) takes the torch path, which autograd sees through. The op modules' `*_compiled`
    entries ask this before each call."""
    import torch

    module = _module
    if module is None or not all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    return module

"""The compiled one-token CPU decode step (csrc/cpu_decode.cpp): building it, and a check that it can be used.

The C++ source is compiled on first use with torch's extension builder (g++ and ninja; the `ninja` package from
PyPI brings the latter) and cached under torch's extensions folder, so a machine compiles it once (about a
minute). `load(wait=False)` starts that build in a background thread and answers None until it is done, so a
caller can serve with its torch path meanwhile; `load()` waits. A machine without a compiler gets None and one
log line saying why: the torch path is the slow twin that always works.

What the step computes is the engine's torch decode path for one sequence and one token (its contract is stated in
the C++ file); this module knows tensors and a config dict, not models: the engine hands over the weights.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_decode.cpp"
# -ffp-contract=off: no fused multiply-adds the torch path does not do, so results stay within an ulp of it.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off"]

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None
_builder: threading.Thread | None = None


def load(wait: bool = True) -> ModuleType | None:
    """The compiled extension, building it if needed; None if it cannot be built here (see `build_error()`),
    or, with wait=False, while a background build is still running."""
    global _builder
    with _lock:
        if _module is not None or _error is not None:
            return _module
        if not wait:
            if _builder is None:
                _builder = threading.Thread(target=_build, name="glm-cpu-decode-build", daemon=True)
                _builder.start()
            return None
    if _builder is not None:
        _builder.join()
    else:
        _build()
    return _module


def build_error() -> str | None:
    """Why the extension could not be built, or None."""
    return _error


def _build() -> None:
    global _module, _error
    with _lock:
        if _module is not None or _error is not None:
            return
        try:
            _module = _compile()
        except Exception as exc:  # no compiler, no headers, a failed compile: the torch path serves instead
            _error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            log.warning("CPU decode extension unavailable (%s); decoding with the torch path", _error)


def _compile() -> ModuleType:
    try:  # torch's builder runs `ninja` from PATH; the PyPI package keeps its binary beside the module
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    from torch.utils.cpp_extension import load as load_extension

    log.info("compiling the CPU decode extension (once per machine, about a minute)")
    return load_extension(name="glm_cpu_decode", sources=[str(SOURCE)], extra_cflags=CFLAGS, verbose=False)

"""`%%glm` and `%glm`: the notebook's way to the model (`%load_ext workbench` registers them).

The rooms: `connection` (finding this kernel's Jupyter server, its HTTP/SSE client, or the chat layer in this
process), `session` (settings, target, conversation memory), `cells` (interpolation, earlier cells and their
output, code blocks, the empty-cell transformer) and `glm_magics` (the magics: option parsing and one handler per
subcommand). See `glm_magics` for the usage.
"""

from workbench.magics.cells import CELL_OUTPUT_CHARS, empty_glm_cell, extract_code, interpolate
from workbench.magics.connection import GLMError
from workbench.magics.glm_magics import (
    SYSTEM_PROMPTS,
    USAGE,
    GLMMagics,
    load_ipython_extension,
    unload_ipython_extension,
)
from workbench.magics.session import Session
from workbench.models import bundled_model

__all__ = [
    "CELL_OUTPUT_CHARS", "SYSTEM_PROMPTS", "USAGE", "GLMError", "GLMMagics", "Session", "bundled_model",
    "empty_glm_cell", "extract_code", "interpolate", "load_ipython_extension", "unload_ipython_extension",
]

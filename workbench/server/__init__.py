"""The jupyter-server extension: GLM Workbench's OpenAI-compatible API under `{base_url}glm/`.

Knows HTTP, authentication and configuration; calls the chat layer (`workbench.chat`) for everything else.
"""

from workbench.server.app import GLMWorkbench

__all__ = ["GLMWorkbench"]

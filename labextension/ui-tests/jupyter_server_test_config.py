"""Configuration of the `jupyter lab` that the browser tests start (see playwright.config.js).

Galata's test settings (no token, app exposed to the page, temporary root and workspaces), plus the workbench
server extension on the backend named by $GLM_UI_BACKEND:

- ``local``: the engine on a tiny random-weight GLM-4.5-architecture checkpoint written here at start-up
  (real routing traces, no download);
- ``remote``: the remote backend pointed at $GLM_UI_UPSTREAM_URL, the scripted endpoint of
  tests/ui/scripted_upstream.py (known thinking, code and tool calls);
- ``providers``: providers side by side: ``local`` (the engine on that tiny checkpoint), ``hosted`` (the scripted
  endpoint as a priced OpenAI-kind provider, and again as a free model without thinking) and ``zai`` (a
  preset-like provider whose key variable is not set, so its model is listed but cannot be chosen).

Never use this configuration outside tests: it turns off Jupyter's security.
"""

import os
import tempfile
from pathlib import Path

from jupyterlab.galata import configure_jupyter_server

c = get_config()  # noqa: F821 (provided by the config loader)
configure_jupyter_server(c)
c.ServerApp.allow_root = True  # CI and the dev machines run as root

c.ServerApp.jpserver_extensions.update({"workbench": True})
work = Path(tempfile.mkdtemp(prefix="glm-ui-"))
c.GLMWorkbench.conversations_dir = str(work / "conversations")

backend = os.environ.get("GLM_UI_BACKEND", "local")
# The prices of the `hosted` provider (per million tokens): the provider test checks the cost they make.
PROVIDERS_PRICES = {"input": 2.0, "output": 8.0, "currency": "USD"}
UNSET_KEY = "GLM_UI_UNSET_KEY"

if backend == "providers":
    from workbench.engine.testing import write_tiny_checkpoint

    os.environ.pop(UNSET_KEY, None)
    write_tiny_checkpoint(work / "glm-tiny", preset="tiny", seed=0)
    c.GLMWorkbench.presets = False  # no key of the test runner's environment turns on a hosted preset
    c.GLMWorkbench.providers = [
        {"name": "local", "kind": "local", "model_path": str(work / "glm-tiny"), "dtype": "float32",
         "kernels": "torch"},
        {"name": "hosted", "kind": "openai", "dialect": "vllm", "base_url": os.environ["GLM_UI_UPSTREAM_URL"],
         "models": [{"name": "scripted-glm", "context_length": 32768, "prices": PROVIDERS_PRICES},
                    # the same endpoint as a free model without thinking (the endpoint answers any name)
                    {"name": "scripted-chat", "capabilities": ["tools"],
                     "prices": {"input": 0, "output": 0, "currency": "USD"}}]},
        # never contacted (its key is not set); loopback all the same
        {"name": "zai", "kind": "openai", "dialect": "zai", "base_url": "http://127.0.0.1:9/v1",
         "api_key_env": UNSET_KEY, "models": ["glm-4.5-air"]},
    ]
elif backend == "remote":
    c.GLMWorkbench.backend = backend
    c.GLMWorkbench.remote_base_url = os.environ["GLM_UI_UPSTREAM_URL"]
    c.GLMWorkbench.remote_model = "scripted-glm"
    c.GLMWorkbench.remote_api_key_env = ""  # the scripted endpoint takes no key
else:
    from workbench.engine.testing import write_tiny_checkpoint

    c.GLMWorkbench.backend = backend
    write_tiny_checkpoint(work / "glm-tiny", preset="tiny", seed=0)
    c.GLMWorkbench.model_path = str(work / "glm-tiny")
    c.GLMWorkbench.dtype = "float32"
    c.GLMWorkbench.kernels = "torch"

# The web_fetch browser test reads a page from a server on 127.0.0.1 (started by the test itself), which the tool
# refuses by default.
c.GLMWorkbench.web_fetch_allow_private = True

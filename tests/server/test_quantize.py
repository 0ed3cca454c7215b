"""`--GLMWorkbench.quantize`: the local engine quantizes its weights as they load, and api/status says in what
format, at how many bits per weight and how many bytes of weights a token reads."""

from __future__ import annotations

import json

import pytest
import traitlets

from workbench.server.app import GLMWorkbench

pytest_plugins = ["pytest_jupyter.jupyter_server"]


@pytest.fixture
def jp_server_config(tiny_checkpoint, tmp_path):
    return {"ServerApp": {"jpserver_extensions": {"workbench": True}},
            "GLMWorkbench": {"model_path": str(tiny_checkpoint), "kernels": "torch", "quantize": "int4",
                             "conversations_dir": str(tmp_path / "conversations")}}


async def test_status_shows_the_quantized_weights(jp_fetch, jp_serverapp, jp_asyncio_loop):
    app = jp_serverapp.web_app.settings["glm_workbench"]
    try:
        await app.ready_backend()
        status = json.loads((await jp_fetch("glm", "api", "status")).body)
        assert status["state"] == "ready", status
        assert status["quantize"] == "int4" and status["cpu_kernels"] in ("torch", "compiled")
        weights = status["weights"]
        assert weights["format"] == "int4" and 4.75 <= weights["bits_per_weight"] < 9
        engine = app.glm_backend.engine
        assert weights["bytes_per_token"] == engine.weights["bytes_per_token"]
        assert 0 < weights["bytes_per_token"] < status["memory"]["model_bytes"]
        body = {"model": "ckpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        response = await jp_fetch("glm", "v1", "chat", "completions", method="POST", body=json.dumps(body))
        assert json.loads(response.body)["usage"]["completion_tokens"] >= 1
    finally:
        await app.glm_backend.close()


def test_the_traitlet_lists_what_it_takes():
    with pytest.raises(traitlets.TraitError, match="int8"):
        GLMWorkbench(quantize="int3")
    assert GLMWorkbench().quantize is None

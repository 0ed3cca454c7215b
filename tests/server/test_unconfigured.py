"""A server without a model says so, clearly, in api/status and in every chat answer (503), and stays up."""

from __future__ import annotations

import json

import pytest

from workbench.chat.backends import LocalBackend

pytest_plugins = ["pytest_jupyter.jupyter_server"]


@pytest.fixture
def jp_server_config(tmp_path):
    return {"ServerApp": {"jpserver_extensions": {"workbench": True}},
            "GLMWorkbench": {"model_path": None, "conversations_dir": str(tmp_path / "conversations")}}


async def test_no_model_is_a_clear_503(jp_fetch):
    body = json.dumps({"model": "glm-workbench", "messages": [{"role": "user", "content": "hi"}]})
    response = await jp_fetch("glm", "v1", "chat", "completions", method="POST", body=body, raise_error=False)
    assert response.code == 503
    error = json.loads(response.body)["error"]
    assert error["code"] == "model_not_loaded" and "GLMWorkbench.model_path" in error["message"]
    status = json.loads((await jp_fetch("glm", "api", "status")).body)
    assert status["state"] == "unconfigured" and "GLMWorkbench.model_path" in status["message"]
    models = json.loads((await jp_fetch("glm", "v1", "models")).body)
    assert models["data"][0]["id"] == "local/glm-workbench"
    assert models["data"][0]["workbench"]["state"] == "error"


async def test_missing_checkpoint_folder_is_reported(jp_fetch, jp_serverapp, tmp_path):
    app = jp_serverapp.web_app.settings["glm_workbench"]
    app.glm_backend = LocalBackend(model_path=tmp_path / "nowhere")  # as if configured with a wrong path
    app._backend_started = None
    body = json.dumps({"model": "nowhere", "messages": [{"role": "user", "content": "hi"}]})
    response = await jp_fetch("glm", "v1", "chat", "completions", method="POST", body=body, raise_error=False)
    assert response.code == 503 and "does not exist" in json.loads(response.body)["error"]["message"]
    status = json.loads((await jp_fetch("glm", "api", "status")).body)
    assert status["state"] == "error" and "nowhere" in status["message"]

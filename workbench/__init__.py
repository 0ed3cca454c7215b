"""GLM Workbench: a JupyterLab workbench for GLM-4.5-Air-style Mixture-of-Experts models."""


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where JupyterLab finds the prebuilt extension (labextension/ builds into workbench/labextension/)."""
    return [{"src": "labextension", "dest": "glm-workbench"}]

"""GLM Workbench: a JupyterLab workbench for GLM-4.5-Air-style Mixture-of-Experts models."""


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where JupyterLab finds the prebuilt extension (labextension/ builds into workbench/labextension/)."""
    return [{"src": "labextension", "dest": "glm-workbench"}]


def _jupyter_server_extension_points() -> list[dict]:
    """The jupyter-server extension: the GLM API under `{base_url}glm/` (see workbench.server)."""
    from workbench.server import GLMWorkbench  # imported only when a Jupyter server loads the extension

    return [{"module": "workbench", "app": GLMWorkbench}]


def load_ipython_extension(ipython) -> None:
    """`%load_ext workbench`: registers the `%%glm` and `%glm` magics (see workbench.magics)."""
    from workbench.magics import load_ipython_extension as load

    load(ipython)

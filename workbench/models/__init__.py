"""The small bundled checkpoint: a GLM-4.5-Air-architecture MoE trained by this project on the standard library.

Owns where the default model lives. The engine, the server and the magics load `default_model_path()` when no
other model is configured. The recipe that made it is `python -m workbench.models.recipe.build` (see
`recipe/build.py`); the model card is the README.md in the model's folder.

Importing this package is cheap: it touches no tensors and no files.
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "glm45-air-mini"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json")

__all__ = ["MODEL_NAME", "REQUIRED_FILES", "bundled_model", "default_model_path"]


def default_model_path(check: bool = True) -> Path:
    """The folder of the bundled model (Hugging Face layout: config.json, model.safetensors, tokenizer files).

    With `check`, a folder missing any of its files raises FileNotFoundError naming the file and the fix."""
    folder = Path(__file__).resolve().parent / MODEL_NAME
    if check:
        missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"the bundled model at {folder} lacks {', '.join(missing)}: reinstall glm-workbench, or rebuild it "
                "with `python -m workbench.models.recipe.build` (about an hour on two CPU cores)")
    return folder


def bundled_model() -> tuple[str | None, str]:
    """(folder, "") of the bundled model, or (None, why not) when its files are missing: for the places that fall
    back to it (the server, the magics) and must say why they cannot."""
    try:
        return str(default_model_path()), ""
    except FileNotFoundError as exc:
        return None, str(exc)

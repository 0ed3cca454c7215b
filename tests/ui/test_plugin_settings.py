"""The sidebar's settings schema (labextension/schema/plugin.json) as JupyterLab reads it: a keyboard shortcut
no installed JupyterLab plugin already binds (a collision is a console warning per key, issue 12), defaults that
fit any model, and titles for the settings editor."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "labextension" / "schema" / "plugin.json").read_text())
LAB_SCHEMAS = Path(sys.prefix) / "share" / "jupyter" / "lab" / "schemas"


def lab_shortcuts() -> dict[str, list[str]]:
    """{keys: [commands]} of every default shortcut of the installed JupyterLab's own plugins."""
    found: dict[str, list[str]] = {}
    for path in LAB_SCHEMAS.rglob("*.json"):
        try:
            schema = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        for shortcut in schema.get("jupyter.lab.shortcuts", []) if isinstance(schema, dict) else []:
            found.setdefault(" ".join(shortcut.get("keys", [])), []).append(shortcut.get("command", "?"))
    return found


def test_the_open_chat_shortcut_collides_with_no_jupyterlab_shortcut():
    ours = [" ".join(s["keys"]) for s in SCHEMA["jupyter.lab.shortcuts"]]
    assert ours == ["Alt Shift G"]
    taken = lab_shortcuts()
    if not taken:
        pytest.skip(f"no JupyterLab schemas under {LAB_SCHEMAS}")
    assert "Accel Shift U" in taken  # the old one: the Property Inspector's (the check sees real bindings)
    assert {keys: taken[keys] for keys in ours if keys in taken} == {}


def test_defaults_fit_any_model_and_every_setting_has_a_title():
    properties = SCHEMA["properties"]
    assert properties["maxTokens"]["default"] == 0 and properties["maxTokens"]["minimum"] == 0  # 0: what fits
    for name, prop in properties.items():
        assert prop.get("title"), f"{name} has no title in the settings editor"
    assert properties["autoApproveTools"]["items"]["title"]

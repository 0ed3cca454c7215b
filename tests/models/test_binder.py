"""binder/ agrees with pyproject.toml: same package, a torch its dependencies accept, the extensions it ships.

That the package imports after a fresh install is what CI's own `pip install -e ".[test]"` proves; here we check
that Binder's recipe installs that same package and looks for the names that install really produces."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
BINDER = REPO / "binder"


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def environment() -> dict:
    return yaml.safe_load((BINDER / "environment.yml").read_text())


def pip_lines(environment: dict) -> list[str]:
    [pip] = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict)]
    return pip


def conda_spec(environment: dict, name: str) -> str | None:
    for dep in environment["dependencies"]:
        if isinstance(dep, str) and re.match(rf"{name}\b", dep):
            return dep[len(name):].lstrip("=") or ""
    return None


def test_python_version_is_one_the_package_accepts(environment, pyproject):
    python = conda_spec(environment, "python")
    assert python, "environment.yml must pin python"
    assert Version(python) in SpecifierSet(pyproject["project"]["requires-python"])


def test_torch_is_the_cpu_build_of_a_version_the_package_accepts(environment, pyproject):
    lines = pip_lines(environment)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    [torch_line] = [line for line in lines if line.startswith("torch")]
    pinned = Requirement(torch_line)
    version = Version(next(iter(pinned.specifier)).version)
    assert version.local == "cpu"
    wanted = next(Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "torch")
    assert version in wanted.specifier


def test_node_is_there_for_the_labextension_build(environment, pyproject):
    # pyproject builds the labextension with hatch-jupyter-builder's npm builder (jlpm) when the package installs.
    assert pyproject["tool"]["hatch"]["build"]["hooks"]["jupyter-builder"]["build-function"].endswith("npm_builder")
    assert conda_spec(environment, "nodejs") is not None


def test_post_build_installs_this_package_and_checks_what_it_ships(pyproject):
    script = BINDER / "postBuild"
    assert script.stat().st_mode & 0o111, "postBuild must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True)  # syntax
    text = script.read_text()
    assert re.search(r"pip install [^\n]*\s\.\s*$", text, re.M), "postBuild must install the package from the checkout"
    # The server extension module it checks is the one the package's jupyter-config enables...
    wheel = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]
    [config_dir] = [src for src in wheel["shared-data"] if "jupyter_server_config.d" in src]
    enabled = {name for f in (REPO / config_dir).glob("*.json")
               for name, on in json.loads(f.read_text())["ServerApp"]["jpserver_extensions"].items() if on}
    assert enabled == {"workbench"} and "grep -E \"workbench .*enabled\"" in text
    # ...and the labextension it checks is the one the wheel installs (name from labextension/package.json).
    package_name = json.loads((REPO / "labextension" / "package.json").read_text())["name"]
    assert wheel["shared-data"]["workbench/labextension"].endswith(f"labextensions/{package_name}")
    assert f'grep -E "{package_name} .*enabled"' in text
    assert "cpu_compiled.load()" in text  # the CPU kernels are compiled at build time, not at the first answer


def test_the_package_exposes_both_extensions_and_the_bundled_model():
    import workbench
    from workbench.models import MODEL_NAME, default_model_path

    [server_point] = workbench._jupyter_server_extension_points()
    assert server_point["module"] == "workbench"
    [lab_point] = workbench._jupyter_labextension_paths()
    assert lab_point["dest"] == json.loads((REPO / "labextension" / "package.json").read_text())["name"]
    assert default_model_path().name == MODEL_NAME


def test_landing_page_and_launch_link_name_an_existing_notebook():
    pages = set(re.findall(r"lab/tree/(notebooks/[\w.-]+\.ipynb)", (BINDER / "postBuild").read_text()
                           + (BINDER / "README.md").read_text()))
    assert pages and all((REPO / page).is_file() for page in pages)

"""A normal install works: the wheel carries the recipes and the pocket model, and an installed
plvmctl answers with `--recipe pocket` from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def test_every_package_is_listed_and_recipes_ship_from_the_top_level_folder():
    config = _setuptools_config()
    folders = sorted(".".join(path.parent.relative_to(ROOT).parts)
                     for path in (ROOT / "plvmctl").rglob("__init__.py") if "__pycache__" not in path.parts)
    assert sorted(p for p in config["packages"] if p != "plvmctl.recipes") == folders
    assert config["package-dir"] == {"plvmctl.recipes": "recipes"}
    assert config["package-data"]["plvmctl.recipes"] == ["*.yaml"]


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_built_wheel_installs_and_runs_the_pocket_recipe_from_anywhere(tmp_path, photos):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("plvmctl", "recipes"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, source / name)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1"}
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                  "-w", str(tmp_path / "dist"), str(source)], tmp_path, env)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("plvmctl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in (ROOT / "recipes").glob("*.yaml"):
        assert f"plvmctl/recipes/{recipe.name}" in names
    assert "plvmctl/assets/pocket/backbone/model.safetensors" in names

    site = tmp_path / "site"
    installed = _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                      str(wheel)], tmp_path, env)
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env["PYTHONPATH"] = str(site)  # ahead of the editable checkout
    plvmctl = [sys.executable, "-c", "from plvmctl.cli import main; main()"]

    listed = _run(plvmctl + ["recipes"], elsewhere, env)
    assert listed.returncode == 0, listed.stderr
    assert f"{site / 'plvmctl' / 'recipes' / 'pocket.yaml'}" in listed.stdout
    common = ["--recipe", "pocket", "--device", "cpu", "--store", str(elsewhere / "concepts")]
    encoded = _run(plvmctl + common + ["encode", str(photos["plain0.png"]), "--name", "avril"], elsewhere, env)
    assert encoded.returncode == 0, encoded.stderr
    asked = _run(plvmctl + common + ["ask", str(photos["plain1.png"]), "is <avril> in this photo?"], elsewhere, env)
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.strip() and "Loading weights" not in asked.stderr

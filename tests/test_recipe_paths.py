"""Recipes ship with the package: named by path or by name, found from any folder, and
carried by a built package (as `pip install` users get it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssamba.continual import read_recipe
from ssamba.label_efficiency import CPU_RECIPE
from ssamba.recipe_paths import RECIPES, recipe_path
from ssamba.tasks.finetune_cli import main as finetune_main

REPO = Path(__file__).resolve().parents[1]


def test_a_recipe_is_found_by_path_or_name_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    fsdd = RECIPES / "finetune" / "fsdd.yaml"

    assert recipe_path("recipes/finetune/fsdd.yaml") == fsdd
    assert recipe_path("finetune/fsdd") == recipe_path("finetune/fsdd.yaml") == fsdd
    own = tmp_path / "recipes" / "finetune" / "fsdd.yaml"  # a file of the user's own wins
    own.parent.mkdir(parents=True)
    own.write_text("seed_everything: 1\n")
    assert recipe_path("recipes/finetune/fsdd.yaml") == Path("recipes/finetune/fsdd.yaml")
    with pytest.raises(FileNotFoundError, match=r"finetune/nothing: recipe not found"):
        recipe_path("finetune/nothing")
    assert CPU_RECIPE.is_file()  # label-efficiency's default pretraining recipe

    own.unlink()
    assert finetune_main(["--config", "recipes/finetune/fsdd_loso.yaml", "--print_config"]) == 0
    assert "name: fsdd_loso" in capsys.readouterr().out
    # a name without the suffix, and a recipe piece given to another option
    encoder = ["--model.encoder", "recipes/model/ssamba_tiny.yaml", "--print_config"]
    assert finetune_main(["--config", "finetune/fsdd", *encoder]) == 0
    printed = capsys.readouterr().out
    assert "name: fsdd" in printed and "embed_dim: 192" in printed
    recipe = read_recipe("recipes/continual/fsdd_cpu.yaml")  # its task recipes too
    assert {Path(t["recipe"]) for t in recipe["tasks"]} == {fsdd.resolve()}


def test_a_built_package_carries_the_recipes(tmp_path: Path) -> None:
    build = tmp_path / "build"
    setup = [sys.executable, "-c", "import setuptools; setuptools.setup()"]
    subprocess.run(  # what a wheel holds, without writing into the checkout
        [*setup, "egg_info", "-e", tmp_path, "build_py", "-d", build],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(build)}
    command = [sys.executable, "-m", "ssamba", "pretrain", "--config"]
    run = subprocess.run(
        [*command, "recipes/pretrain/fsdd_tiny_cpu.yaml", "--print_config"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )

    assert run.returncode == 0, run.stderr[-2000:]
    assert "name: fsdd_tiny_cpu" in run.stdout
    packaged = {p.relative_to(build / "ssamba" / "recipes") for p in build.rglob("*.yaml")}
    assert packaged == {p.relative_to(REPO / "recipes") for p in (REPO / "recipes").rglob("*.yaml")}

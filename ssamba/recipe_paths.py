"""Where the recipes are, in a checkout and in an installed package alike.

The YAML recipes live in the repository's top-level `recipes/` folder; `ssamba/recipes`
links to it, so a wheel carries them as package data (pyproject.toml) and `RECIPES`
is the same folder either way. A recipe is named by a path that exists, or by its place
in that folder, with or without the `recipes/` prefix and the `.yaml` suffix:

    recipe_path("recipes/finetune/fsdd.yaml")  # ./recipes/... if it exists, else packaged
    recipe_path("finetune/fsdd")               # the packaged one
"""

from __future__ import annotations

from pathlib import Path

RECIPES = Path(__file__).resolve().parent / "recipes"


def recipe_path(name_or_path: str | Path) -> Path:
    """The recipe file `name_or_path` names; FileNotFoundError in one line when none."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("recipes",) else path.parts
    if parts and not path.is_absolute():
        packaged = RECIPES.joinpath(*parts)
        for candidate in (packaged, packaged.with_name(packaged.name + ".yaml")):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"{name_or_path}: recipe not found, neither as a file nor among the recipes in "
        f"{RECIPES} (name one as e.g. finetune/fsdd)"
    )

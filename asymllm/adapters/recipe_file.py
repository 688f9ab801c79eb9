"""`lorasym.json`: the recipe and seed, written next to a peft adapter.

Plain peft never reads it (so the adapter stays a standard one); asymllm reads it to
reload the adapter exactly as it was: which factors train, and the seed that rebuilds a
frozen random factor.
"""

from __future__ import annotations

import json
import os
import types

from .recipe import Recipe

RECIPE_FILE = "lorasym.json"


def write_recipe_file(directory: str, recipe: Recipe, seed: int) -> str:
    from .. import __version__

    path = os.path.join(directory, RECIPE_FILE)
    record = {"recipe": recipe.name, "update_rule": recipe.to_update_rule(), "seed": seed, "asymllm_version": __version__}
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return path


def read_recipe_file(directory: str) -> tuple[Recipe, int] | None:
    path = os.path.join(directory, RECIPE_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        return Recipe.parse(record["recipe"]), int(record["seed"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: unreadable asymllm recipe record ({error}); expected keys 'recipe' and 'seed'") from error


def _save_pretrained_with_recipe(self, save_directory, *args, **kwargs):
    type(self).save_pretrained(self, save_directory, *args, **kwargs)
    from ..zero import rank_and_world

    if rank_and_world()[0] == 0:
        write_recipe_file(save_directory, self.lorasym_recipe, self.lorasym_seed)


def record_recipe_on_save(model) -> None:
    """Make `model.save_pretrained(dir)` also write lorasym.json. A bound method (not a
    closure), so `copy.deepcopy(model)` rebinds it to the copy."""
    model.save_pretrained = types.MethodType(_save_pretrained_with_recipe, model)

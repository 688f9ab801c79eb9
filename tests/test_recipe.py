"""Recipe grammar and semantics (docs/recipes.md, "Exact semantics"), including the original code's parser bug."""

import pytest

from asymllm import Recipe, RecipeError
from asymllm.adapters.recipe import ALIASES, Factor


def test_headline_recipe_means_A_random_frozen_B_zero_trained():
    # The paper's code read this name backwards; here A is frozen and B trains.
    recipe = Recipe.parse("A_rand_hB_zero")
    assert recipe.A == Factor("rand", trainable=False)
    assert recipe.B == Factor("zero", trainable=True)


def test_token_order_does_not_matter():
    assert Recipe.parse("hB_zero_A_rand") == Recipe.parse("A_rand_hB_zero")
    assert Recipe.parse("hB_zero_A_rand").name == "A_rand_hB_zero"


@pytest.mark.parametrize("alias, name", [("lora", "hA_he_hB_zero"), ("asym", "A_rand_hB_zero"), ("a_only", "hA_zero_B_rand")])
def test_aliases(alias, name):
    assert Recipe.parse(alias) == Recipe.parse(name)
    assert ALIASES[alias] == name


def test_every_valid_combination_parses_and_round_trips():
    valid = set()
    for ha in ("", "h"):
        for hb in ("", "h"):
            for a in ("V", "rand", "he", "zero"):
                for b in ("U", "rand", "he", "zero"):
                    name = f"{ha}A_{a}_{hb}B_{b}"
                    try:
                        recipe = Recipe.parse(name)
                    except RecipeError:
                        continue
                    valid.add(name)
                    assert recipe.name == name
                    assert Recipe.from_update_rule(recipe.to_update_rule()) == recipe
    # Counted by hand from docs/recipes.md ("Exact semantics"), not by re-running the rules:
    #   both trained:  4 x 4 inits, less hA_zero_hB_zero (both zero)         = 15
    #   only A trained: B frozen, so B may not be zero: 4 x 3                 = 12
    #   only B trained: A frozen, so A may not be zero: 3 x 4                 = 12
    #   nothing trained                                                       =  0
    assert len(valid) == 39
    assert {"A_rand_hB_zero", "hA_he_hB_zero", "hA_zero_B_rand", "hA_V_hB_U", "hA_zero_hB_he"} <= valid
    assert not {"A_rand_B_zero", "A_zero_hB_rand", "hA_rand_B_zero", "hA_zero_hB_zero", "A_V_B_U"} & valid


@pytest.mark.parametrize("name, reason", [
    ("A_rand_B_zero", "nothing trains"),
    ("A_zero_hB_rand", "frozen at zero"),
    ("hA_rand_B_zero", "frozen at zero"),
    ("hA_zero_hB_zero", "both start at zero"),
])
def test_recipes_that_can_never_change_the_model_are_refused(name, reason):
    with pytest.raises(RecipeError, match=reason):
        Recipe.parse(name)


def test_unknown_init_is_an_error_with_choices_and_suggestion():
    # The original code silently kept the default init for an unknown name.
    with pytest.raises(RecipeError) as err:
        Recipe.parse("A_rnd_hB_zero")
    assert "unknown init 'rnd'" in str(err.value)
    assert "V, rand, he, zero" in str(err.value)
    assert "did you mean 'rand'" in str(err.value)


def test_U_on_A_is_explained():
    with pytest.raises(RecipeError, match="'U' initialises B, not A"):
        Recipe.parse("A_U_hB_zero")


@pytest.mark.parametrize("name", ["", "A_rand", "A_rand_hB_zero_x", "C_rand_hB_zero", "A_rand_A_zero", "hhA_rand_hB_zero"])
def test_malformed_names_name_the_grammar(name):
    with pytest.raises(RecipeError, match="recipe"):
        Recipe.parse(name)


def test_misspelt_alias_gets_did_you_mean():
    with pytest.raises(RecipeError, match="did you mean 'asym'"):
        Recipe.parse("asymm")


def test_update_rule_of_original_readme():
    rule = {"update_A": False, "update_B": True, "A_init": "rand", "B_init": "zero"}
    assert Recipe.from_update_rule(rule).name == "A_rand_hB_zero"
    with pytest.raises(RecipeError, match="missing"):
        Recipe.from_update_rule({"update_A": False, "A_init": "rand", "B_init": "zero"})
    with pytest.raises(RecipeError, match="True or False"):
        Recipe.from_update_rule({**rule, "update_B": "yes"})


def test_changes_model_at_init_flag():
    assert not Recipe.parse("A_rand_hB_zero").changes_model_at_init
    assert Recipe.parse("hA_V_hB_U").changes_model_at_init
    assert Recipe.parse("a_only").changes_model_at_init is False


def test_recipe_objects_are_validated_too():
    with pytest.raises(RecipeError, match="nothing trains"):
        Recipe.parse(Recipe(Factor("rand", False), Factor("zero", False)))
    with pytest.raises(RecipeError, match="got list"):
        Recipe.parse(["A_rand", "hB_zero"])

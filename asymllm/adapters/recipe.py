"""LoRASYM recipes: how each low-rank factor starts and whether it trains.

A recipe name is two order-independent tokens joined by `_`:
`A_<init>` or `hA_<init>`, and `B_<init>` or `hB_<init>`; a leading `h` means the
factor is trained. `A_rand_hB_zero` (the paper's headline) is A random orthonormal and
frozen, B from zero and trained. Pure Python: no torch import here.

    >>> Recipe.parse("hB_zero_A_rand") == Recipe.parse("asym")
    True
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

A_INITS = ("V", "rand", "he", "zero")
B_INITS = ("U", "rand", "he", "zero")
INITS = {"A": A_INITS, "B": B_INITS}

ALIASES = {
    "lora": "hA_he_hB_zero",
    "asym": "A_rand_hB_zero",
    "a_only": "hA_zero_B_rand",
    "b_only": "A_rand_hB_zero",
}

GRAMMAR = (
    "a recipe is two tokens joined by '_', in any order: "
    "'A_<init>' or 'hA_<init>' with <init> in {V, rand, he, zero}, and "
    "'B_<init>' or 'hB_<init>' with <init> in {U, rand, he, zero}; "
    "a leading 'h' means the factor is trained (e.g. A_rand_hB_zero)"
)


class RecipeError(ValueError):
    """A recipe name or update rule that cannot be used; the message says why."""


@dataclass(frozen=True)
class Factor:
    init: str
    trainable: bool

    def token(self, letter: str) -> str:
        return f"{'h' if self.trainable else ''}{letter}_{self.init}"


@dataclass(frozen=True)
class Recipe:
    A: Factor
    B: Factor

    @property
    def name(self) -> str:
        """Canonical name, A first: `A_rand_hB_zero`."""
        return f"{self.A.token('A')}_{self.B.token('B')}"

    @property
    def changes_model_at_init(self) -> bool:
        """True when B@A != 0 at step 0, so the adapted model differs from the base."""
        return self.A.init != "zero" and self.B.init != "zero"

    @property
    def needs_pretrained_weight(self) -> bool:
        return self.A.init == "V" or self.B.init == "U"

    @classmethod
    def parse(cls, name: str) -> "Recipe":
        if isinstance(name, Recipe):
            name.validate(source=name.name)
            return name
        if not isinstance(name, str):
            raise RecipeError(f"recipe must be a name such as 'A_rand_hB_zero', got {type(name).__name__} {name!r}")
        text = ALIASES.get(name, name)
        factors = _parse_tokens(name, text)
        recipe = cls(A=factors["A"], B=factors["B"])
        recipe.validate(source=name)
        return recipe

    @classmethod
    def from_update_rule(cls, rule: dict) -> "Recipe":
        """The original LoRASYM README's form:
        `{"update_A": False, "update_B": True, "A_init": "rand", "B_init": "zero"}`."""
        expected = {"update_A", "update_B", "A_init", "B_init"}
        unknown = set(rule) - expected
        missing = expected - set(rule)
        if unknown or missing:
            raise RecipeError(
                f"update_rule must have exactly the keys {sorted(expected)}; "
                f"unknown: {sorted(unknown)}, missing: {sorted(missing)}"
            )
        for key in ("update_A", "update_B"):
            if not isinstance(rule[key], bool):
                raise RecipeError(f"update_rule[{key!r}] must be True or False, got {rule[key]!r}")
        a_init = _check_init("A", rule["A_init"], where="update_rule['A_init']")
        b_init = _check_init("B", rule["B_init"], where="update_rule['B_init']")
        recipe = cls(A=Factor(a_init, rule["update_A"]), B=Factor(b_init, rule["update_B"]))
        recipe.validate(source=f"update_rule {rule}")
        return recipe

    def validate(self, source: str) -> None:
        """Refuse recipes whose update B@A can never leave zero, or where nothing trains."""
        if not (self.A.trainable or self.B.trainable):
            raise RecipeError(f"recipe {source!r}: nothing trains; mark a factor trained with 'h' (e.g. A_rand_hB_zero)")
        for letter, factor in (("A", self.A), ("B", self.B)):
            if factor.init == "zero" and not factor.trainable:
                raise RecipeError(
                    f"recipe {source!r}: {letter} is frozen at zero, so B@A stays zero forever; "
                    f"train it (h{letter}_zero) or start it elsewhere"
                )
        if self.A.init == "zero" and self.B.init == "zero":
            # dL/dB = g @ A^T and dL/dA = B^T @ g are both zero: a fixed point.
            raise RecipeError(f"recipe {source!r}: A and B both start at zero, so neither ever gets a gradient")

    def to_update_rule(self) -> dict:
        return {"update_A": self.A.trainable, "update_B": self.B.trainable, "A_init": self.A.init, "B_init": self.B.init}


def _parse_tokens(name: str, text: str) -> dict[str, Factor]:
    if not isinstance(text, str) or not text:
        raise RecipeError(f"recipe must be a non-empty string, got {name!r}; {GRAMMAR}")
    parts = text.split("_")
    if len(parts) != 4:
        raise RecipeError(f"cannot read recipe {name!r}: {GRAMMAR}; aliases: {_alias_list()}{_did_you_mean(name)}")
    factors: dict[str, Factor] = {}
    for head, init in (parts[0:2], parts[2:4]):
        letter = head.removeprefix("h")
        if letter not in INITS or head not in (letter, "h" + letter):
            raise RecipeError(
                f"cannot read recipe {name!r}: {head!r} is not one of A, hA, B, hB; {GRAMMAR}{_did_you_mean(name)}"
            )
        if letter in factors:
            raise RecipeError(f"recipe {name!r} names {letter} twice; {GRAMMAR}")
        factors[letter] = Factor(_check_init(letter, init, where=f"recipe {name!r}"), head.startswith("h"))
    return factors


def _check_init(letter: str, init: str, where: str) -> str:
    choices = INITS[letter]
    if init in choices:
        return init
    close = difflib.get_close_matches(str(init), choices, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    other = "U" if letter == "A" else "V"
    if init == other:
        hint = f"; {other!r} initialises {'B' if letter == 'A' else 'A'}, not {letter}"
    raise RecipeError(f"{where}: unknown init {init!r} for {letter}; choices: {', '.join(choices)}{hint}")


def _alias_list() -> str:
    return ", ".join(f"{k}={v}" for k, v in ALIASES.items())


def _did_you_mean(name: str) -> str:
    candidates = list(ALIASES) + [f"{h}A_{a}_{g}B_{b}" for h in ("", "h") for g in ("", "h") for a in A_INITS for b in B_INITS]
    close = difflib.get_close_matches(str(name), candidates, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def describe(recipe: Recipe) -> str:
    """One line a human reads: what starts where and what trains."""
    def part(letter: str, f: Factor) -> str:
        return f"{letter} init={f.init} {'trained' if f.trainable else 'frozen'}"

    note = " (B@A != 0 at step 0: the model changes before training)" if recipe.changes_model_at_init else ""
    return f"{recipe.name}: {part('A', recipe.A)}, {part('B', recipe.B)}{note}"

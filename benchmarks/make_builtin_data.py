"""Write the built-in instruction dataset that ships with asymllm (deterministic).

Run from the repository root (rewrites both files; the output is byte-identical on
every run, so `git diff` after a run shows exactly what a change to this script did):

    python benchmarks/make_builtin_data.py            # or --check: fail if the files differ

Output, alpaca-format JSON Lines (one object a line: instruction, input, output, task;
`task` names the family and the loader ignores it):

    asymllm/data/builtin_instructions.jsonl           480 train examples (80 per family)
    asymllm/data/builtin_instructions_heldout.jsonl   120 held-out examples (20 per family)

The tasks are chosen for a 135M-parameter model tuned for ~150 steps on a CPU: each
has one short, canonical answer (scored by exact match), the base model mostly fails
them as asked (it answers in sentences, or gets the transformation wrong), and the
answer format is learnable from a few dozen examples. Families:

    reverse    reverse the order of 3-5 words            "fox red big" -> "big red fox"
    uppercase  write 2-4 words in capital letters         "green tea"   -> "GREEN TEA"
    sort       sort 3-4 words alphabetically              "pear fig"    -> "fig pear"
    last       the last word of 3-6 words                 "a b c"       -> "c"
    add        add two numbers below 50                   "12 + 7"      -> "19"
    plural     the plural of a noun (a fixed lexicon)     "mouse"       -> "mice"

Held-out examples never repeat a train example's (instruction, input); the plural
family holds out whole nouns, so that part measures the format on words not trained.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20241129
N_TRAIN, N_HELDOUT = 80, 20  # per family
OUT_DIR = Path(__file__).resolve().parent.parent / "asymllm" / "data"
TRAIN_FILE = OUT_DIR / "builtin_instructions.jsonl"
HELDOUT_FILE = OUT_DIR / "builtin_instructions_heldout.jsonl"

# Short common words, most one token each, so prompts stay short.
WORDS = sorted({
    "apple", "bird", "blue", "boat", "bread", "cake", "cat", "chair", "cloud", "cold",
    "cup", "dark", "desk", "dog", "door", "egg", "fast", "fish", "flower", "fox",
    "game", "gold", "green", "hat", "hill", "horse", "house", "ice", "jam", "key",
    "king", "lake", "lamp", "leaf", "lion", "milk", "moon", "music", "night", "ocean",
    "pen", "pink", "queen", "rain", "red", "river", "road", "rock", "rose", "salt",
    "ship", "silver", "snow", "song", "star", "stone", "sun", "table", "tea", "tiger",
    "tree", "warm", "water", "wind", "window", "wolf", "yellow", "zebra",
})

# (singular, plural): one accepted plural each; ambiguous nouns (fish, cactus, person) left out.
PLURALS = [
    ("apple", "apples"), ("baby", "babies"), ("bag", "bags"), ("ball", "balls"),
    ("bench", "benches"), ("berry", "berries"), ("book", "books"), ("box", "boxes"),
    ("boy", "boys"), ("brush", "brushes"), ("bus", "buses"), ("calf", "calves"),
    ("car", "cars"), ("child", "children"), ("church", "churches"), ("city", "cities"),
    ("class", "classes"), ("cloud", "clouds"), ("country", "countries"), ("cup", "cups"),
    ("day", "days"), ("dish", "dishes"), ("dog", "dogs"), ("dress", "dresses"),
    ("fly", "flies"), ("foot", "feet"), ("fox", "foxes"), ("friend", "friends"),
    ("game", "games"), ("girl", "girls"), ("glass", "glasses"), ("goose", "geese"),
    ("half", "halves"), ("hand", "hands"), ("hero", "heroes"), ("horse", "horses"),
    ("house", "houses"), ("key", "keys"), ("kiss", "kisses"), ("knife", "knives"),
    ("lady", "ladies"), ("leaf", "leaves"), ("life", "lives"), ("loaf", "loaves"),
    ("louse", "lice"), ("man", "men"), ("match", "matches"), ("mouse", "mice"),
    ("nose", "noses"), ("ox", "oxen"), ("party", "parties"), ("penny", "pennies"),
    ("pen", "pens"), ("potato", "potatoes"), ("puppy", "puppies"), ("river", "rivers"),
    ("road", "roads"), ("shelf", "shelves"), ("ship", "ships"), ("song", "songs"),
    ("spy", "spies"), ("star", "stars"), ("story", "stories"), ("table", "tables"),
    ("thief", "thieves"), ("tomato", "tomatoes"), ("tooth", "teeth"), ("toy", "toys"),
    ("tree", "trees"), ("watch", "watches"), ("wife", "wives"), ("wish", "wishes"),
    ("wolf", "wolves"), ("woman", "women"), ("word", "words"), ("year", "years"),
    ("ant", "ants"), ("bell", "bells"), ("coin", "coins"), ("desk", "desks"),
    ("egg", "eggs"), ("farm", "farms"), ("hill", "hills"), ("lamp", "lamps"),
    ("moon", "moons"), ("nest", "nests"), ("page", "pages"), ("ring", "rings"),
    ("rock", "rocks"), ("shoe", "shoes"), ("sock", "socks"), ("tent", "tents"),
    ("town", "towns"), ("wall", "walls"), ("beach", "beaches"), ("cow", "cows"),
    ("army", "armies"), ("bush", "bushes"), ("lunch", "lunches"), ("family", "families"),
]


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))  # distinct words: the answer is unique


def reverse(rng):
    words = _words(rng, 3, 5)
    return "Reverse the order of the words.", " ".join(words), " ".join(reversed(words))


def uppercase(rng):
    words = _words(rng, 2, 4)
    return "Write the words in capital letters.", " ".join(words), " ".join(words).upper()


def sort(rng):
    words = _words(rng, 3, 4)
    return "Sort the words alphabetically.", " ".join(words), " ".join(sorted(words))


def last(rng):
    words = _words(rng, 3, 6)
    return "What is the last word?", " ".join(words), words[-1]


def add(rng):
    a, b = rng.randint(1, 49), rng.randint(1, 49)
    return f"What is {a} + {b}?", "", str(a + b)


FAMILIES = {"reverse": reverse, "uppercase": uppercase, "sort": sort, "last": last, "add": add}


def sample_family(name: str, rng: random.Random) -> list[dict]:
    """N_TRAIN + N_HELDOUT distinct examples of one family, train first."""
    seen, records = set(), []
    while len(records) < N_TRAIN + N_HELDOUT:
        instruction, input_, output = FAMILIES[name](rng)
        if (instruction, input_) not in seen:
            seen.add((instruction, input_))
            records.append(_record(name, instruction, input_, output))
    return records


def plural_records(rng: random.Random) -> list[dict]:
    assert len(PLURALS) >= N_TRAIN + N_HELDOUT, len(PLURALS)
    pairs = rng.sample(PLURALS, N_TRAIN + N_HELDOUT)
    return [_record("plural", f"What is the plural of {noun}?", "", plural) for noun, plural in pairs]


def _record(task: str, instruction: str, input_: str, output: str) -> dict:
    return {"instruction": instruction, "input": input_, "output": output, "task": task}


def build() -> tuple[list[dict], list[dict]]:
    train, heldout = [], []
    for name in [*FAMILIES, "plural"]:
        rng = random.Random(f"{SEED}:{name}")  # one stream per family: adding a family changes no other
        records = plural_records(rng) if name == "plural" else sample_family(name, rng)
        train += records[:N_TRAIN]
        heldout += records[N_TRAIN:]
    # Interleave the families, so any prefix of the file (a short run) sees all of them.
    random.Random(SEED).shuffle(train)
    random.Random(SEED + 1).shuffle(heldout)
    return train, heldout


def render(records: list[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the shipped files differ from what this writes")
    args = parser.parse_args(argv)
    train, heldout = build()
    outputs = {TRAIN_FILE: render(train), HELDOUT_FILE: render(heldout)}
    if args.check:
        stale = [str(path) for path, text in outputs.items() if not path.is_file() or path.read_text() != text]
        print("stale: " + ", ".join(stale) if stale else "built-in data is up to date")
        return 1 if stale else 0
    for path, text in outputs.items():
        path.write_text(text)
        print(f"wrote {path} ({text.count(chr(10))} examples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

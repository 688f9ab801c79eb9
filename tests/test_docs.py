"""Every documentation reference points at something in the repository.

Scanned: README.md, ARCHITECTURE.md, docs/*.md, benchmarks/**/*.md, asymllm/**/*.py, tests/*.py,
launch/* and eval/*.py. Checked:
- markdown links `[text](path#anchor)` with a relative path: the file (resolved from the citing
  file's folder) exists inside the repository, and an anchor into a markdown file names one of
  its headings (GitHub's heading ids);
- file names in the text: any `*.md` name exists (a path like `docs/design.md` from the
  repository root or the citing file's folder, a bare name like `RESULTS.md` somewhere in the
  repository), unless it is a file asymllm *writes* (ALLOWED_MD); in the pages people read
  (README.md, ARCHITECTURE.md, docs/*.md) every path into a top-level folder of the repository
  (`tests/test_resume.py`, `launch/run.example.yaml`) exists too. (Elsewhere such paths are often
  relative to a run folder, `eval/mmlu.json`, or recorded output of an old commit, so they are
  not checked there.)
- "trap N" (and "traps N and M") names a `### Trap N: ...` heading of docs/design.md, whose
  traps are numbered 1, 2, ... without gaps;
- `tests/test_x.py::test_name` names a test function that exists.

Fast (no imports of the package, one pass over the text files).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "design.md"

# Folders never searched for files (environments, caches, run outputs).
SKIP_DIRS = {".git", ".venv", ".venv-floors", "__pycache__", ".pytest_cache", "outputs", "asymllm.egg-info"}

# Markdown files that asymllm writes into a run, an evaluation or an export folder: mentioned by
# the code that writes them and by the docs that describe them, never part of the repository.
ALLOWED_MD = {
    "README.md",           # the model card of a run, an export and a GGUF folder
    "sweep.md",            # `asymllm sweep`'s tables
    "mmlu.md",             # `asymllm eval mmlu`'s report
    "alpaca_summary.md",   # `asymllm eval alpaca`'s summary
    "report.md",           # `asymllm eval report`'s table
}

TOP_DIRS = ("docs", "benchmarks", "launch", "tests", "asymllm", "eval", "ds_configs", ".ci")

LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
MD_NAME = re.compile(r"(?<![\w/.~-])((?:\.\.?/)*(?:[\w.-]+/)*[\w.-]+\.md)\b")
REPO_PATH = re.compile(r"(?<![\w/.~$-])((?:" + "|".join(re.escape(d) for d in TOP_DIRS) + r")/[\w./-]*\w)(?![\w*{])")
TRAP = re.compile(r"\btraps?\s+(\d+)((?:\s*(?:,|and|or)\s*\d+)*)", re.IGNORECASE)
TRAP_HEADING = re.compile(r"^### Trap (\d+): \S", re.MULTILINE)
TEST_ID = re.compile(r"\b(tests/[\w/]+\.py)::(\w+)")


def pages() -> list[Path]:
    """The pages people read: every path they name must exist."""
    return [REPO / "README.md", REPO / "ARCHITECTURE.md", *sorted((REPO / "docs").glob("*.md"))]


def scanned_files() -> list[Path]:
    files = [REPO / "README.md", REPO / "ARCHITECTURE.md"]
    files += sorted((REPO / "docs").glob("*.md"))
    files += sorted(p for p in (REPO / "benchmarks").rglob("*.md") if not SKIP_DIRS & set(p.parts))
    files += sorted(p for p in (REPO / "asymllm").rglob("*.py") if "__pycache__" not in p.parts)
    files += sorted(p for p in (REPO / "tests").glob("*.py") if p.name != Path(__file__).name)  # not its own examples
    files += sorted(p for p in (REPO / "launch").iterdir() if p.is_file())
    files += sorted((REPO / "eval").glob("*.py"))
    return [p for p in files if p.is_file()]


@lru_cache(maxsize=1)
def file_names_in_repo() -> frozenset[str]:
    names = set()
    for _root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        names.update(files)
    return frozenset(names)


def lines_of(path: Path):
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        yield number, line


def where(path: Path, number: int) -> str:
    return f"{path.relative_to(REPO) if REPO in path.parents else path}:{number}"


def inside_repo(path: Path) -> bool:
    return path.resolve() == REPO or REPO in path.resolve().parents


def resolves(name: str, citing: Path) -> bool:
    """A path mentioned in `citing`: from the repository root or from the citing file's folder."""
    for base in (REPO, citing.parent):
        candidate = base / name
        if inside_repo(candidate) and candidate.exists():
            return True
    return False


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors_of(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    anchors = set()
    in_code = False
    for _number, line in lines_of(path):
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6} ", line):
            anchor = github_anchor(line.lstrip("#"))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            anchors.add(anchor if count == 0 else f"{anchor}-{count}")
    return frozenset(anchors)


def broken_links(path: Path) -> list[str]:
    problems = []
    for number, line in lines_of(path):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
                continue
            name, _, anchor = target.partition("#")
            linked = (path.parent / name) if name else path  # "#anchor" alone: this page
            if name and not inside_repo(linked):
                problems.append(f"{where(path, number)}: link {target!r} leaves the repository")
            elif not linked.exists():
                problems.append(f"{where(path, number)}: link {target!r}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in anchors_of(linked.resolve()):
                problems.append(f"{where(path, number)}: link {target!r}: no heading #{anchor} in {linked.name}")
    return problems


def missing_files(path: Path) -> list[str]:
    problems = []
    for number, line in lines_of(path):
        for name in MD_NAME.findall(line):
            if "/" in name:
                ok = resolves(name, path)
            else:
                ok = name in file_names_in_repo() or name in ALLOWED_MD
            if not ok:
                problems.append(f"{where(path, number)}: names {name}, which is not in the repository")
        for name in REPO_PATH.findall(line) if path in pages() else ():
            if not name.endswith(".md") and not resolves(name, path):
                problems.append(f"{where(path, number)}: names {name}, which is not in the repository")
    return problems


@lru_cache(maxsize=1)
def design_traps() -> tuple[int, ...]:
    return tuple(int(n) for n in TRAP_HEADING.findall(DESIGN.read_text()))


def test_markdown_links_resolve():
    problems = [p for path in scanned_files() if path.suffix == ".md" for p in broken_links(path)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_file_a_document_or_comment_names_exists():
    problems = [p for path in scanned_files() for p in missing_files(path)]
    assert not problems, "references to files that do not exist:\n" + "\n".join(problems)


def test_the_traps_of_docs_design_are_numbered_in_order():
    traps = design_traps()
    assert traps and list(traps) == list(range(1, len(traps) + 1)), f"docs/design.md's traps: {traps}"


def test_every_trap_citation_names_a_trap_of_docs_design():
    known = set(design_traps())
    problems = []
    for path in scanned_files():
        for number, line in lines_of(path):
            for first, rest in TRAP.findall(line):
                for n in [first, *re.findall(r"\d+", rest)]:
                    if int(n) not in known:
                        problems.append(f"{where(path, number)}: trap {n} is not a trap of docs/design.md")
    assert not problems, "\n".join(problems)


def test_every_test_a_document_names_exists():
    problems = []
    for path in scanned_files():
        for number, line in lines_of(path):
            for test_file, test_name in TEST_ID.findall(line):
                source = REPO / test_file
                if not source.is_file() or not re.search(rf"^def {test_name}\(", source.read_text(), re.MULTILINE):
                    problems.append(f"{where(path, number)}: {test_file}::{test_name} does not exist")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("text, found", [
    ("see DESIGN.md trap 7", ["DESIGN.md"]),
    ("(measured, NOTES-CPU-OFFLINE.md);", ["NOTES-CPU-OFFLINE.md"]),
    ("the notes in ../elsewhere/DESIGN.md", ["../elsewhere/DESIGN.md"]),
    ("python benchmarks/export_memory.py --output /tmp/export_memory.md", []),
    ("https://github.com/org/repo/blob/main/docs/x.md", []),
])
def test_the_scanner_sees_file_names_and_skips_urls_and_absolute_paths(text, found):
    assert MD_NAME.findall(text) == found


def test_the_scanner_fails_on_a_missing_file(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("See [the notes](NOWHERE.md), docs/nowhere.md and DESIGN-OLD.md.\n")
    assert len(broken_links(page)) == 1
    assert len(missing_files(page)) == 3  # NOWHERE.md (the link's name), docs/nowhere.md, DESIGN-OLD.md

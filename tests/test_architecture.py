"""The tree is the architecture (ARCHITECTURE.md): four parts, data flowing one way, and the
never-import rules kept true by walking every `import` statement of the package with `ast`."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "asymllm"
PARTS = ("adapters", "training", "evaluation", "export")
ENTRY_POINTS = ("asymllm.cli", "asymllm.sweep", "asymllm.demo", "asymllm.chat")  # top-level commands (sweep/ a package): may use every part
# part -> the parts it may import besides itself and the shared top-level helpers
UPSTREAM = {"adapters": set(), "training": {"adapters"}, "evaluation": {"adapters"}, "export": {"adapters"}}
MAX_LINES = 400
MAX_MODULES = 13  # the "about 12"; evaluation has 13 (its command among them)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(name: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in `source`, function-level ones included;
    `from X import y` counts as X.y too, since y may be a module."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def part_of(module: str) -> str | None:
    """'training' for asymllm.training.*; None for the top-level package and its helpers."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 and pieces[0] == "asymllm" and pieces[1] in PARTS else None


def is_entry_point(module: str) -> bool:
    return any(module == entry or module.startswith(entry + ".") for entry in ENTRY_POINTS)


def rule_breaks(name: str, source: str, is_package: bool = False) -> list[str]:
    """What module `name` imports that the rules forbid, one line each."""
    own = part_of(name)
    if is_entry_point(name):
        return []
    allowed = UPSTREAM[own] | {own} if own else {"adapters"}  # shared helpers: only adapters, the base of all
    breaks, flagged = [], set()
    for line, target in imported_modules(name, source, is_package):
        if not target.startswith("asymllm") or line in flagged:
            continue
        if is_entry_point(target):
            breaks.append(f"{name}:{line} imports the command module {target}")
            flagged.add(line)
        elif part_of(target) and part_of(target) not in allowed:
            breaks.append(f"{name}:{line} imports {target}: {own or 'a shared helper'} never imports {part_of(target)}")
            flagged.add(line)
    return breaks


def package_modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_breaks_a_never_import_rule():
    breaks = [b for p in package_modules() for b in rule_breaks(module_name(p), p.read_text(), p.name == "__init__.py")]
    assert breaks == []


@pytest.mark.parametrize("module, line", [
    ("asymllm.export.verify", "from ..training.config import ConfigError"),
    ("asymllm.export.command", "    import asymllm.training.train"),  # inside a function counts too
    ("asymllm.evaluation.alpaca", "from ..training import tokenize"),
    ("asymllm.evaluation.mmlu", "from asymllm.export.common import ExportError"),
    ("asymllm.adapters.model", "from ..training.trainer import LorasymSFTTrainer"),
    ("asymllm.adapters.files", "from ..evaluation.loading import load_for_eval"),
    ("asymllm.adapters.merge", "from ..export import merge_plan"),
    ("asymllm.training.trainer", "from ..export.model_card import model_card"),
    ("asymllm.fingerprint", "from .training.config import ConfigError"),
    ("asymllm.training.train", "from ..sweep import main"),
    ("asymllm.evaluation.report", "from ..sweep.compare import paired"),
])
def test_the_rules_catch_a_forbidden_import(module, line):
    source = "def f():\n" + line if line.startswith(" ") else line + "\n"
    assert len(rule_breaks(module, source)) == 1


@pytest.mark.parametrize("module, line", [
    ("asymllm.training.trainer", "from ..adapters.files import save_adapter"),
    ("asymllm.export.source", "from ..zero import gathered"),
    ("asymllm.evaluation.loading", "from ..adapters.files import load_lorasym_model"),
    ("asymllm.adapters.model", "from ..zero import gathered"),
    ("asymllm.sweep", "from .training.config import ConfigError"),
    ("asymllm.sweep.command", "from .cells import run_cells"),
])
def test_the_rules_allow_what_flows_downstream(module, line):
    assert rule_breaks(module, line + "\n") == []


def test_every_part_is_a_package_of_small_documented_modules():
    for part in PARTS:
        modules = [p for p in (PACKAGE / part).glob("*.py") if p.name != "__init__.py"]
        assert 0 < len(modules) <= MAX_MODULES, f"asymllm/{part}: {len(modules)} modules"
        assert all(not p.stem.startswith(part.rstrip("s") + "_") for p in modules), f"asymllm/{part}: a module keeps its prefix"
    for path in package_modules():
        lines = path.read_text().count("\n")
        assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)}: {lines} lines"
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring and docstring.strip(), f"{path.relative_to(PACKAGE.parent)}: no docstring saying what it is for"


def test_architecture_page_names_every_module_that_exists():
    page = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    for path in package_modules():
        if path.name != "__init__.py":
            relative = path.relative_to(PACKAGE).as_posix()
            assert relative in page or path.name in page, f"ARCHITECTURE.md does not mention {relative}"

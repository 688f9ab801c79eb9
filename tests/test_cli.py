"""`asymllm` and `asymllm eval` dispatch: help lists every entry, a typo gets a suggestion."""

import subprocess
import sys

import pytest

from asymllm import cli
from asymllm.evaluation import command as eval_cli


def test_help_lists_every_command(capsys):
    cli.main([])
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in cli.COMMANDS)


@pytest.mark.parametrize("main, argv, message", [
    (cli.main, ["evl"], "asymllm: unknown command 'evl' (did you mean 'eval'?); commands: recipes, train,"),
    (eval_cli.main, ["mmul"], "asymllm eval: unknown task 'mmul' (did you mean 'mmlu'?); tasks: mmlu, alpaca, report"),
    (eval_cli.main, ["zzz"], "asymllm eval: unknown task 'zzz'; tasks: mmlu, alpaca, report"),
])
def test_unknown_name_is_one_line_with_a_suggestion(main, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert str(exit_info.value).startswith(message)


def test_command_runs_its_function(capsys):
    cli.main(["recipes"])
    out = capsys.readouterr().out
    assert out.startswith("LoRASYM recipes") and "\n  asym " in out


@pytest.mark.parametrize("argv", [["--help"], ["recipes"], ["eval", "--help"]])
def test_light_commands_import_no_torch(argv):
    # `asymllm --help` and `asymllm recipes` must answer at once: importing torch + peft takes
    # seconds, so they must not be imported at all (checked in a fresh interpreter).
    code = ("import sys; from asymllm import cli; cli.main(sys.argv[1:]); "
            "heavy = sorted(m for m in ('torch', 'peft', 'transformers', 'trl', 'deepspeed') if m in sys.modules); "
            "print('HEAVY', heavy)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_public_api_is_still_importable_from_the_package():
    import asymllm

    for name in asymllm.__all__:
        assert getattr(asymllm, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        asymllm.not_a_name


# ---- a mistyped flag: one line naming it and the closest known flag (every argparse command)


@pytest.mark.parametrize("argv, flag, suggestion", [
    (["export", "--adapter", "RUN/adapter", "--ouput", "merged"], "--ouput", "--output"),
    (["sweep", "--recipes", "asym", "--ouput", "sweeps/a"], "--ouput", "--output"),
    (["eval", "report", "outputs/eval/base", "--ouput_dir", "r"], "--ouput_dir", "--output_dir"),
    (["eval", "mmlu", "--adaptr", "RUN/adapter"], "--adaptr", "--adapter"),
    (["eval", "alpaca", "--max_new_tokns", "8"], "--max_new_tokns", "--max_new_tokens"),
    (["demo", "--lora_rank", "4"], "--lora_rank", "--lora_r"),
])
def test_mistyped_flag_is_one_line_naming_the_closest(argv, flag, suggestion, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    prog = " ".join(["asymllm", *argv[:2 if argv[0] == "eval" else 1]])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"{prog}: error: unknown flag {flag} (did you mean {suggestion}?)\n"


def test_unknown_flag_without_a_close_one_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", "--zzz", "1", "--adapter", "a", "--output", "b"])
    err = capsys.readouterr().err
    assert err.startswith("asymllm export: error: unknown flag --zzz; flags: --help, --adapter, --output, --base,")
    assert err.count("\n") == 1


def test_flags_after_a_bare_double_dash_and_abbreviations_are_left_to_argparse(capsys):
    from asymllm import sweep

    args = sweep.parse_args(["--recipes", "asym", "--out", "s", "--eval_flags", "--limit 60", "--", "--lora_dropout", "0.1"])
    assert args.output == "s" and args.eval_flags == "--limit 60" and args.train_flags == ["--lora_dropout", "0.1"]
    # the training flags are not the sweep's own, but they are checked as `asymllm train` reads them, before any cell runs
    with pytest.raises(SystemExit) as refused:
        sweep.parse_args(["--recipes", "asym", "--out", "s", "--", "--lora_rr", "8"])
    assert str(refused.value) == "asymllm sweep: unknown training flag after --: --lora_rr (did you mean: --lora_rr -> --lora_r?)"
    with pytest.raises(SystemExit):  # a flag-like value: argparse's own message says what to do
        sweep.parse_args(["--recipes", "asym", "--output", "s", "--eval_flags", "--no_progress"])
    assert "--eval_flags: expected one argument" in capsys.readouterr().err


# ---- what a user reads about recipes and packaging


def test_readme_names_every_recipe_alias():
    from pathlib import Path

    from asymllm.adapters.recipe import ALIASES

    readme = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    recipes_section = " ".join(readme.split("\n## Recipe names\n", 1)[1].split("\n## ", 1)[0].split())  # unwrapped
    missing = [alias for alias, name in ALIASES.items() if f"`{alias}` = `{name}`" not in recipes_section]
    assert not missing, f"docs/recipes.md's 'Recipe names' section does not name the aliases {missing}"


def test_pyproject_license_raises_no_setuptools_warning():
    # setuptools >= 77 deprecates `license = { text = ... }` (warned twice per install) for an
    # SPDX expression string, which older setuptools refuses: the floor must move with it.
    import tomllib
    import warnings
    from pathlib import Path

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), pyproject)
    assert not [str(w.message) for w in caught if "license" in str(w.message).lower()]
    assert getattr(dist.metadata, "license_expression", None) == "Apache-2.0"
    requires = tomllib.loads(pyproject.read_text())["build-system"]["requires"]
    assert "setuptools>=77" in requires

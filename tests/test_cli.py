"""`asymllm` and `asymllm eval` dispatch: help lists every entry, a typo gets a suggestion."""

import subprocess
import sys

import pytest

from asymllm import cli
from asymllm.evaluation import cli as eval_cli


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

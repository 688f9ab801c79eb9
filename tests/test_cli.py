"""`asymllm` and `asymllm eval` dispatch: help lists every entry, a typo gets a suggestion."""

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

"""`ssamba <command> --help` as a user reads it: the command's own description with its
example command lines one per line, only the options that apply, readable types."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from ssamba.cli import main as ssamba_main

REPO = Path(__file__).resolve().parents[1]


def help_text(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    try:
        code = ssamba_main([command, "--help"])
    except SystemExit as exit_:  # plain argparse commands exit from --help
        code = exit_.code
    assert code == 0
    return capsys.readouterr().out


def description(text: str) -> str:
    """The text between the usage lines and the first option group."""
    return text.split("\n\n", 1)[1].split("\noptions:", 1)[0]


@pytest.mark.parametrize("command", ["pretrain", "finetune", "evaluate"])
def test_training_commands_describe_themselves_with_one_example_per_line(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_text(command, capsys)
    about = description(text)

    assert text.startswith(f"usage: ssamba {command} ")
    assert about.lstrip().startswith(f"`ssamba {command}`: ")
    examples = [line for line in about.splitlines() if line.startswith(f"    ssamba {command} ")]
    assert len(examples) >= 2
    assert all(line.count(f"ssamba {command} ") == 1 for line in examples)
    assert "<function" not in text and "<lambda>" not in text


def test_finetune_help_is_for_users_not_the_cli_class(capsys: pytest.CaptureFixture[str]) -> None:
    about = description(help_text("finetune", capsys))

    assert "parse_only" not in about and "ClassifyTask + LabelledDataModule" not in about
    assert "--folds all" in about


def test_evaluate_help_lists_what_applies_and_hides_training_only_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = help_text("evaluate", capsys)

    assert "Which options apply" in description(text)
    assert re.search(r"--split \{test,val\}\s+Which data", text)
    options = text.split("\noptions:", 1)[1]
    for hidden in ("--ckpt_path", "--folds", "--cross_validation", "--defaults"):
        assert not re.search(rf"^\s+{hidden}\b", options, flags=re.M), hidden


def test_bench_help_calls_it_ssamba_bench(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text("bench", capsys)

    assert text.startswith("usage: ssamba bench ")
    assert "python -m" not in text


def test_the_make_targets_and_commands_the_readme_names_exist(
    capsys: pytest.CaptureFixture[str],
) -> None:
    readme = (REPO / "README.md").read_text()
    listed = subprocess.run(
        ["make", "--no-print-directory", "help"], cwd=REPO, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    targets = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    named = set(re.findall(r"`?make\s+([a-z][a-z-]*)", readme)) | set(
        re.findall(r"^make ([a-z][a-z-]*)", readme, re.MULTILINE)
    )

    assert named and named <= targets, sorted(named - targets)
    assert ssamba_main(["--help"]) == 0
    blocks = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", readme, re.DOTALL))
    commands = set(re.findall(r"^ssamba ([a-z-]+)", blocks, re.MULTILINE))
    overview = capsys.readouterr().out
    assert commands and all(f"  {command} " in overview for command in commands)

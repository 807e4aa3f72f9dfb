"""The --help pages of train, evaluate and dataprep's commands: an example on each, and one
style for defaults ("[default: ...]" after the sentence, as click writes it)."""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from dataprep.cli import main as dataprep
from training.cli import evaluate, train

COMMANDS = {"train": (train, []), "evaluate": (evaluate, []),
            **{f"dataprep {name}": (dataprep, [name]) for name in ("build", "stats", "verify", "synth")}}
CHOICES = re.compile(r"^[\w.-]+(\|[\w.-]+)+$")      # a metavar such as [bf16|fp16|none]


def help_page(command: str) -> str:
    cli, args = COMMANDS[command]
    result = CliRunner().invoke(cli, [*args, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_each_page_shows_an_example_of_its_command(command):
    text = help_page(command)
    example = text.split("Example", 1)[1].split("Options:")[0]
    assert re.search(rf"(^|:)\s+{command}( --|\s*$|\s+\()", example, re.M), example


@pytest.mark.parametrize("command", COMMANDS)
def test_defaults_are_shown_in_one_style(command):
    options = " ".join(help_page(command).split("Options:", 1)[1].split())   # unwrap lines
    assert "(default" not in options
    for note in re.findall(r"\[([^\[\]]*)\]", options):
        assert note.startswith("default: ") or note == "required" or note.startswith(":") \
            or CHOICES.match(note), f"{command}: [{note}] is not [default: ...]"


def test_class_weights_help_says_what_happens_by_default():
    options = " ".join(help_page("train").split("Options:", 1)[1].split())
    text = options.split("--class-weights", 1)[1].split(" --", 1)[0]
    assert "none" in text and "stats.json" in text and "By default" in text

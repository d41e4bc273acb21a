"""README.md and the scripts' docstrings against the scripts: every command they show parses,
and every flag they name exists. Parsing only: nothing is trained or evaluated here."""

import re
import shlex
from pathlib import Path

import pytest

import data
import eval as ev
import train

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PARSERS = {"train.py": train.parse_args, "eval.py": ev.parser().parse_args,
           "data.py": data.parser().parse_args}


def flags_of(parser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


FLAGS = flags_of(train.parser()) | flags_of(ev.parser()) | flags_of(data.parser())


def commands():
    """(where, script, its arguments) for every command line of README's ```bash blocks and of
    the usage lines in the three scripts' docstrings."""
    lines = [("README.md", line) for block in re.findall(r"```bash\n(.*?)```", README, re.S)
             for line in block.replace("\\\n", " ").splitlines()]  # joined continuations
    for name in PARSERS:
        doc = {"train.py": train, "eval.py": ev, "data.py": data}[name].__doc__
        lines += [(name, line) for line in doc.splitlines()
                  if re.match(r"\s+(python|torchrun) ", line)]
    for where, line in lines:
        words = shlex.split(line, comments=True)
        while words:  # "pip install ... && python train.py": each command apart
            cmd, words = (words[:words.index("&&")], words[words.index("&&") + 1:]) \
                if "&&" in words else (words, [])
            script = next((w for w in cmd if w in PARSERS), None)
            if script:
                yield where, script, cmd[cmd.index(script) + 1:]


def test_readme_shows_commands_of_every_script():
    assert {s for where, s, _ in commands() if where == "README.md"} == set(PARSERS)


@pytest.mark.parametrize("where, script, args", list(commands()))
def test_every_documented_command_parses(where, script, args, monkeypatch):
    monkeypatch.chdir(ROOT)  # the paths they name (a --plugin file) are the repository's
    PARSERS[script](args)  # argparse exits with 2 on a flag or value it does not take


def test_every_flag_readme_names_exists():
    prose = re.sub(r"```.*?```", "", README, flags=re.S)  # the blocks are parsed above
    named = {f for code in re.findall(r"`([^`]+)`", prose) for f in re.findall(r"--[\w-]+", code)}
    assert named and not named - FLAGS, sorted(named - FLAGS)
    assert {"--dec-criterion", "--resume", "--force", "--sweep"} <= named

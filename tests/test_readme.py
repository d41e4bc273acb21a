"""README.md, docs/*.md and the scripts' docstrings against the scripts and the repository: every
command they show parses, every flag they name exists, every relative link leads to a file, and
every pointer of the code to a section of a docs/ file names a heading there. Parsing only:
nothing is trained or evaluated here."""

import re
import shlex
from pathlib import Path

import pytest

import data
import eval as ev
import train

ROOT = Path(__file__).resolve().parents[1]
DOCS = {p.relative_to(ROOT).as_posix(): p.read_text()
        for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
README = DOCS["README.md"]
PARSERS = {"train.py": train.parse_args, "eval.py": ev.parser().parse_args,
           "data.py": data.parser().parse_args}


def flags_of(parser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


FLAGS = flags_of(train.parser()) | flags_of(ev.parser()) | flags_of(data.parser())


def commands():
    """(where, script, its arguments) for every command line of the ```bash blocks of README and
    docs/*.md, and of the usage lines in the three scripts' docstrings."""
    lines = [(where, line) for where, text in DOCS.items()
             for block in re.findall(r"```bash\n(.*?)```", text, re.S)
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


def named_flags(text: str) -> set[str]:
    """The --flags named in backticks in the prose of a markdown text (the blocks are parsed)."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return {f for code in re.findall(r"`([^`]+)`", prose) for f in re.findall(r"--[\w-]+", code)}


def test_readme_shows_commands_of_every_script():
    assert {s for where, s, _ in commands() if where == "README.md"} == set(PARSERS)


def test_docs_show_commands():
    """The commands that moved to docs/ are parsed too: the blocks are found there."""
    shown = {where for where, _, _ in commands()}
    assert {"docs/exercises.md", "docs/reference.md", "docs/results.md"} <= shown


@pytest.mark.parametrize("where, script, args", list(commands()))
def test_every_documented_command_parses(where, script, args, monkeypatch):
    monkeypatch.chdir(ROOT)  # the paths they name (a --plugin file) are the repository's
    PARSERS[script](args)  # argparse exits with 2 on a flag or value it does not take


def test_every_flag_readme_names_exists():
    named = named_flags(README)
    assert named and not named - FLAGS, sorted(named - FLAGS)
    assert {"--dec-criterion", "--resume", "--force", "--sweep"} <= named


@pytest.mark.parametrize("where", sorted(w for w in DOCS if w != "README.md"))
def test_every_flag_the_docs_name_exists(where):
    named = named_flags(DOCS[where])
    assert named and not named - FLAGS, sorted(named - FLAGS)


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target "title")


@pytest.mark.parametrize("where", sorted(DOCS))
def test_every_relative_link_leads_to_a_file(where):
    """Markdown links and images, outside code blocks; web addresses and in-page anchors aside."""
    prose = re.sub(r"```.*?```", "", DOCS[where], flags=re.S)
    targets = [t.split("#")[0] for t in LINK.findall(prose)
               if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]
    base = (ROOT / where).parent
    missing = [t for t in targets if not (base / t).is_file()]
    assert not missing, f"{where} links to missing files: {missing}"


def test_links_are_found():
    """The link pattern sees README's figure and its pointers to docs/."""
    found = set(LINK.findall(README))
    assert {"docs/sweep.png", "docs/results.md", "docs/exercises.md",
            "docs/reference.md"} <= found


def headings(text: str) -> set[str]:
    return {h.strip() for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_code_points_at_sections_that_exist():
    """A code comment that says 'docs/results.md, "Calibration"' names a heading of that file."""
    pointers = [(path.relative_to(ROOT).as_posix(), doc, section)
                for path in sorted(ROOT.glob("*.py")) + sorted((ROOT / "tests").rglob("*.py"))
                for doc, section in re.findall(r"(docs/[\w-]+\.md), \"([^\"]+)\"",
                                               path.read_text())]
    assert pointers
    wrong = [(where, doc, section) for where, doc, section in pointers
             if doc not in DOCS or section not in headings(DOCS[doc])]
    assert not wrong, wrong

"""pytest's --plugin option, as a plugin that pip installs (requirements.txt installs this
repository; pyproject.toml names this file as a pytest11 entry point).

Installed, the option is known before pytest reads its command line, so `pytest --plugin FILE.py`
works with FILE.py anywhere. Declared in tests/conftest.py alone, it was not: pytest took FILE.py
for a test path, settled its root beside it, and never read tests/conftest.py.
"""


def pytest_addoption(parser):
    parser.addoption("--plugin", action="append", default=[], metavar="FILE.py",
                     help="a file that registers exit signals, schedules or loss weights in "
                          "mue's dicts (solutions.py at the repository root is loaded anyway)")

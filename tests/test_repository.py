"""The repository speaks of the project, not of how it was made: no development-history wording in tracked text
files (history lives in git and CHANGELOG.md)."""
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HISTORY = re.compile(r"session [0-9]|issue [0-9]|sessions? [0-9]+ to|issue #[0-9]|before the chang[e]", re.I)


def _tracked_text_files():
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for name in names.splitlines():
        if name == "CHANGELOG.md" or name.startswith("tests/fixtures/"):
            continue
        try:
            with open(os.path.join(ROOT, name), encoding="utf-8") as f:
                yield name, f.read()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue   # binary files (images) and paths deleted in the work tree


def test_no_development_history_in_code_docs_or_file_names():
    found = [f"{name}: {m.group(0)!r}" for name, text in _tracked_text_files()
             for m in [HISTORY.search(text) or HISTORY.search(name)] if m]
    assert not found, found
    assert not [n for n, _ in _tracked_text_files() if re.search(r"_session\d", n)]

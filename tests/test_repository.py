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


def test_the_wheel_installs_the_library_and_the_command_and_no_scripts(tmp_path):
    """`pip install .` installs rlhf_jax with its `rlhf-jax` console command; the lecture-experiment scripts stay in
    the repository (nothing named `experiments` lands in site-packages)."""
    import importlib.util
    import sys
    import zipfile
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", *isolation, "-q", "-w",
                        str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("rlhf_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.startswith("rlhf_jax-")} == {"rlhf_jax"}
    assert "rlhf_jax/cli/pipeline.py" in names and "rlhf_jax/recipes/pipeline.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "rlhf-jax = rlhf_jax.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()

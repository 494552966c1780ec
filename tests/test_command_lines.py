"""Issue 18: the command lines share conventions: `main(argv) -> int`, exit code 2 for bad input, the same flags
with the same defaults, no sys.path edits, and `[project.scripts]` entry points for every tool."""

from __future__ import annotations

import importlib
import tomllib

import pytest
from conftest import REPO

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
WRAPPERS = [*REPO.glob("evaluate/*.py"), *REPO.glob("scripts/*.py"), REPO / "launchers" / "submit.py"]


def entry(name: str):
    module, function = SCRIPTS[name].split(":")
    return getattr(importlib.import_module(module), function)


def test_every_tool_is_an_installed_command_and_no_file_edits_sys_path():
    for path in WRAPPERS:
        text = path.read_text()
        assert "sys.path" not in text, path
        stem = path.stem if path.parent.name != "evaluate" or path.stem != "run" else "evaluate"
        command = "recpre-submit" if stem == "submit" else f"recpre-{stem.replace('_', '-')}"
        assert command in SCRIPTS, f"{path} has no [project.scripts] entry {command}"
        assert SCRIPTS[command].split(":")[0] in text, f"{path} does not call {SCRIPTS[command]}"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_main_returns_exit_codes(name, capsys):
    main = entry(name)
    if name != "recpre-lm-eval":  # lm-eval's own parser prints help and exits 0 on --help as well
        assert main(["--help"]) == 0
        assert main(["--no-such-flag"]) == 2
    capsys.readouterr()


@pytest.mark.parametrize("name", ["recpre-evaluate", "recpre-generate"])
def test_shared_flags_mean_the_same_everywhere(name, capsys, tmp_path):
    main = entry(name)
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--checkpoint" in text and "--num-steps" in text and "auto (as training picks" in text
    code = main(["--checkpoint", str(tmp_path), "--num-steps", "0,4"])
    assert code == 2 and capsys.readouterr().err.startswith("error: --num-steps '0,4'")

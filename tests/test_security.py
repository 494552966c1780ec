"""Checkpoints never execute code when loaded; secrets in the environment never reach a file or a log.

The pickle payload is live (loading it with weights_only=False runs it, which the test shows first); recpre must
refuse it even when an attacker also rewrote the manifest so that every checksum matches.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_run_args

from recpre.checkpoint import load_model, load_state, verify_checkpoint
from recpre.errors import UserError, run_cli

SECRETS = {
    "WANDB_API_KEY": "wandb-4c1d-secret-value-0001",
    "HF_TOKEN": "hf_secret_value_0002",
    "AWS_SECRET_ACCESS_KEY": "aws/secret+value/0003",
    "DB_PASSWORD": "db-secret-value-0004",
}


@pytest.fixture(scope="module")
def finished(train_module, tiny_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    args = tiny_run_args(run, tiny_corpus, "train.max_steps=4", "checkpoint.interval=2", "eval.interval=0")
    assert train_module.main(args) == 0
    return run


class Payload:
    """Unpickling this runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def reseal(folder: Path) -> None:
    """Rewrite the manifest so that every file's size and sha256 match again (a careful attacker)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {
        p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "manifest.json"
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    verify_checkpoint(folder)


def plant(path: Path, marker: Path, keep: dict | None = None) -> None:
    probe = marker.with_name("payload.pt")  # torch.load would treat a *.safetensors name as safetensors
    torch.save({**(keep or {}), "payload": Payload(marker)}, probe)
    torch.load(probe, weights_only=False)  # the payload is live: unsafe loading runs it
    assert marker.exists()
    marker.unlink()
    shutil.copyfile(probe, path)


def test_a_pickle_payload_in_state_is_refused_on_resume(train_module, tiny_corpus, finished, tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(finished, run)
    folder = run / "checkpoints" / "step-00000004"
    state = torch.load(folder / "state.pt", weights_only=True)
    plant(folder / "state.pt", marker, state)
    reseal(folder)

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: train_module.main(tiny_run_args(run, tiny_corpus, "train.max_steps=6", "eval.interval=0")))
    err = capsys.readouterr().err
    assert not marker.exists(), "the payload ran"
    assert exited.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "state.pt" in lines[0], err
    assert "weights_only" in lines[0] or "not tensors" in lines[0], err

    with pytest.raises(UserError, match="state.pt"):
        load_state(folder)
    assert not marker.exists()


def test_a_pickle_payload_in_a_rank_file_is_refused(finished, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(finished, run)
    folder = run / "checkpoints" / "step-00000004"
    plant(folder / "rank-00001.pt", marker, {"loader": {}, "rng": {}})
    reseal(folder)
    with pytest.raises(UserError, match="rank-00001.pt"):
        load_state(folder, rank=1)
    assert not marker.exists()


def test_a_pickle_in_place_of_the_weights_is_refused(finished, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(finished, run)
    folder = run / "checkpoints" / "step-00000004"
    plant(folder / "model.safetensors", marker)
    reseal(folder)
    with pytest.raises(UserError, match="model.safetensors"):
        load_model(folder)
    assert not marker.exists()


def _load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = f"{owner.id}.{node.func.attr}" if isinstance(owner, ast.Name) else node.func.attr
            yield name, node


def test_no_code_path_unpickles_without_weights_only():
    """Static guard: every torch.load passes weights_only=True; no pickle.load, no numpy allow_pickle."""
    folders = ["recpre", "evaluate", "scripts", "launchers", "benchmarks"]
    files = [REPO / "train.py"] + [p for f in folders if (REPO / f).is_dir() for p in sorted((REPO / f).rglob("*.py"))]
    offenders = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, call in _load_calls(tree):
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            kwargs = {k.arg: k.value for k in call.keywords}
            if name == "torch.load":
                value = kwargs.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    offenders.append(f"{where} torch.load without weights_only=True")
            elif name in ("pickle.load", "pickle.loads", "dill.load", "cloudpickle.load"):
                offenders.append(f"{where} {name}")
            elif name in ("np.load", "numpy.load"):
                value = kwargs.get("allow_pickle")
                if isinstance(value, ast.Constant) and value.value is True:
                    offenders.append(f"{where} np.load(allow_pickle=True)")
    assert not offenders, offenders
    assert len(files) > 20


def test_secrets_in_the_environment_never_reach_files_or_logs(train_module, tiny_corpus, tmp_path, monkeypatch, capsys):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # conftest disables wandb; this run logs offline
    run = tmp_path / "run"
    args = tiny_run_args(
        run,
        tiny_corpus,
        "train.max_steps=4",
        "checkpoint.interval=2",
        "log.progress=lines",
        "log.plot=true",
        "log.wandb.mode=offline",
        "run.name=${oc.env:USER,someone}-run",  # environment interpolation works for ordinary variables
    )
    capsys.readouterr()
    assert train_module.main(args) == 0
    out, err = capsys.readouterr()
    assert "step 4/4" in out
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {"settings.yaml", "metrics.jsonl", "model.safetensors", "state.pt", "loss.png"} <= {p.name for p in files}
    assert any(p.suffix == ".wandb" for p in files), "the offline wandb log is part of what is scanned"
    for value in SECRETS.values():
        assert value not in out and value not in err
        for path in files:
            assert value.encode() not in path.read_bytes(), f"{value} leaked into {path}"


def test_secrets_never_reach_launcher_scripts(tiny_corpus, tmp_path):
    env = {**os.environ, **SECRETS}
    run = tmp_path / "run"
    cmd = [sys.executable, "launchers/submit.py", "--cluster", "local", "--dry-run", *tiny_run_args(run, tiny_corpus)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "train.py" in proc.stdout  # the script itself
    for value in SECRETS.values():
        assert value not in proc.stdout and value not in proc.stderr
    assert not run.exists()

    # a secret given as an override or in a profile's env section is refused before any script exists
    bad = [sys.executable, "launchers/submit.py", "--cluster", "local", "--dry-run", "log.wandb.api_key=abc"]
    proc = subprocess.run(bad, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "looks like a secret" in proc.stderr and proc.stdout == "", proc.stderr
    from recpre.launch.profile import load_profile

    profile = Path(REPO / "launchers" / "clusters" / "local.yaml").read_text()
    leaky = tmp_path / "leaky.yaml"
    leaky.write_text(profile.replace("env:\n", "env:\n  WANDB_API_KEY: abc\n"))
    with pytest.raises(UserError, match="WANDB_API_KEY"):
        load_profile(str(leaky))

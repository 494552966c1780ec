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
import socket
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


def test_a_pickle_in_place_of_the_weights_is_refused_on_resume(train_module, tiny_corpus, finished, tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(finished, run)
    folder = run / "checkpoints" / "step-00000004"
    plant(folder / "model.safetensors", marker)
    reseal(folder)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: train_module.main(tiny_run_args(run, tiny_corpus, "train.max_steps=6", "eval.interval=0")))
    err = capsys.readouterr().err
    assert not marker.exists(), "the payload ran"
    assert exited.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.safetensors" in lines[0], err
    assert "not a valid safetensors file" in lines[0], err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*")) == before


@pytest.mark.slow
def test_a_pickle_payload_in_a_rank_file_is_refused_on_resume(tiny_corpus, tmp_path):
    """A real 2-rank run (torchrun, gloo) whose rank-00001.pt is replaced by a live payload and resealed: rank 1
    refuses it with one sentence and exit code 2 on resume, and the payload never runs."""
    run, marker = tmp_path / "run", tmp_path / "pwned"
    args = tiny_run_args(run, tiny_corpus, "train.max_steps=4", "checkpoint.interval=2", "eval.interval=0")

    def torchrun(*extra: str) -> subprocess.CompletedProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
        return subprocess.run([*cmd, "train.py", *args, *extra], cwd=REPO, capture_output=True, text=True, timeout=300)

    first = torchrun()
    assert first.returncode == 0, first.stderr[-3000:]
    folder = run / "checkpoints" / "step-00000004"
    rank_state = torch.load(folder / "rank-00001.pt", weights_only=True)
    plant(folder / "rank-00001.pt", marker, rank_state)
    reseal(folder)
    resumed = torchrun("train.max_steps=6")
    assert not marker.exists(), "the payload ran"
    assert resumed.returncode != 0
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "rank-00001.pt" in errors[0] and "weights_only" in errors[0], resumed.stderr[-3000:]
    assert "exitcode  : 2 " in resumed.stderr, resumed.stderr[-3000:]


# Callables that unpickle whatever they are given, spelled with their full module path.
UNPICKLERS = {
    f"{module}.{name}"
    for module in ("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib")
    for name in ("load", "loads", "Unpickler")
} | {"pandas.read_pickle", "torch.serialization._load", "numpy.lib.format.read_array"}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
NUMPY_LOADS = {"numpy.load"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> full dotted name, from every `import a.b as c` and `from a.b import c as d` in the file."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def unpickling_offenders(source: str, where: str) -> list[str]:
    """Every use of an unpickler in `source`, however it is imported or spelled: a torch.load call without
    weights_only=True, a reference to torch.load that is not such a call, any pickle/dill/joblib loader or
    Unpickler (called, subclassed or passed around), np.load(allow_pickle=True)."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    checked = set()  # the torch.load callees judged above by their weights_only argument
    offenders = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        kwargs = {k.arg: k.value for k in node.keywords}
        if name in TORCH_LOADS:
            checked.add(id(node.func))
            value = kwargs.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                offenders.append(f"{where}:{node.lineno} {name} without weights_only=True")
        elif name in NUMPY_LOADS:
            value = kwargs.get("allow_pickle")
            if isinstance(value, ast.Constant) and value.value is True:
                offenders.append(f"{where}:{node.lineno} numpy.load(allow_pickle=True)")
    for node in ast.walk(tree):  # any other mention: called, subclassed, assigned or passed around
        if id(node) in checked or not isinstance(node, ast.Attribute | ast.Name):
            continue
        if isinstance(node.ctx, ast.Load) and _dotted(node, aliases) in UNPICKLERS | TORCH_LOADS:
            offenders.append(f"{where}:{node.lineno} {_dotted(node, aliases)}")
    return sorted(set(offenders))


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load(path)",
        "import torch\ntorch.load(path, weights_only=False)",
        "import torch as t\nt.load(path)",
        "from torch import load\nload(path)",
        "from torch import load as read\nread(path)",
        "import torch\ntorch.serialization.load(path)",
        "from torch.serialization import load\nload(path)",
        "from torch import serialization\nserialization.load(path)",
        "import torch\nreader = torch.load\nreader(path, weights_only=True)",
        "import pickle\npickle.load(f)",
        "import pickle\npickle.Unpickler(f).load()",
        "from pickle import Unpickler\nclass Reader(Unpickler):\n    pass",
        "from pickle import loads as l\nl(data)",
        "import _pickle\n_pickle.loads(data)",
        "import numpy as np\nnp.load(path, allow_pickle=True)",
        "import pandas as pd\npd.read_pickle(path)",
    ],
)
def test_the_static_guard_catches_every_spelling_of_an_unpickler(snippet):
    assert unpickling_offenders(snippet, "snippet"), snippet


def test_the_static_guard_accepts_safe_loading():
    safe = (
        "import torch\nfrom torch import load\nimport pickle\nimport numpy as np\n"
        "torch.load(p, map_location='cpu', weights_only=True)\nload(p, weights_only=True)\n"
        "except_type = pickle.UnpicklingError\nnp.load(p)\n"
    )
    assert unpickling_offenders(safe, "safe") == []


# The one Unpickler subclass allowed: DCP's .metadata reader, whose find_class admits only DCP's metadata classes
# (proved by the payload tests of sharded checkpoints below). Only its base-class reference is exempt.
RESTRICTED_UNPICKLERS = {"recpre/sharded_checkpoint.py": "_MetadataUnpickler"}


def _restricted_base_lines(source: str, class_name: str) -> set[int]:
    return {
        base.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ClassDef)
        and node.name == class_name
        and any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body)
        for base in node.bases
    }


def test_no_code_path_unpickles_without_weights_only():
    """Static guard over the product's code: every spelling of torch.load passes weights_only=True; no pickle
    loader or Unpickler in any form, no numpy allow_pickle (but the restricted DCP metadata reader)."""
    folders = ["recpre", "evaluate", "scripts", "launchers", "benchmarks"]
    files = [REPO / "train.py"] + [p for f in folders if (REPO / f).is_dir() for p in sorted((REPO / f).rglob("*.py"))]
    offenders = []
    for path in files:
        source, where = path.read_text(encoding="utf-8"), str(path.relative_to(REPO))
        found = unpickling_offenders(source, where)
        if where in RESTRICTED_UNPICKLERS:
            exempt = {
                f"{where}:{line} pickle.Unpickler"
                for line in _restricted_base_lines(source, RESTRICTED_UNPICKLERS[where])
            }
            assert exempt & set(found), "the restricted unpickler moved: update RESTRICTED_UNPICKLERS"
            found = [o for o in found if o not in exempt]
        offenders += found
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


# -- sharded (DCP) checkpoints: .metadata goes through a restricted unpickler, byte entries weights_only=True ---


@pytest.fixture(scope="module")
def sharded(tiny_corpus, tmp_path_factory):
    """A finished fsdp run (one process: DCP folders all the same) whose checkpoints are sharded."""
    run = tmp_path_factory.mktemp("sharded") / "run"
    args = tiny_run_args(run, tiny_corpus, "train.max_steps=4", "checkpoint.interval=2", "eval.interval=0")
    proc = subprocess.run(
        [sys.executable, "train.py", *args, "fabric.strategy=fsdp", "fabric.device=cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "checkpoints" / "step-00000004" / ".metadata").is_file()
    return run


def test_a_pickle_payload_as_dcp_metadata_is_refused(sharded, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(sharded, run)
    folder = run / "checkpoints" / "step-00000004"
    import pickle

    from torch.distributed.checkpoint import FileSystemReader

    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    reseal(folder)
    with pytest.raises(AttributeError):  # the payload is live: stock DCP loading runs it (then trips on the result)
        FileSystemReader(str(folder)).read_metadata()
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UserError, match=r"\.metadata.*posix.system is not one of DCP's metadata classes"):
        load_model(folder)
    assert not marker.exists(), "the payload ran"


def test_a_pickle_payload_as_a_dcp_byte_entry_is_refused(sharded, tmp_path):
    """A DCP checkpoint (genuine metadata classes) holding a pickled object as a byte entry, which stock DCP loads
    with weights_only=False: recpre loads byte entries with weights_only=True and refuses it."""
    import torch.distributed.checkpoint as dcp

    run, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(sharded, run)
    folder = run / "checkpoints" / "step-00000004"
    from recpre.sharded_checkpoint import read_tensors

    tensors = read_tensors(folder)
    for shard in folder.glob("*.distcp"):
        shard.unlink()
    (folder / ".metadata").unlink()
    dcp.save(
        {**tensors, "model/payload": Payload(marker)},
        storage_writer=dcp.FileSystemWriter(str(folder), single_file_per_rank=True),
        no_dist=True,
    )
    assert not marker.exists()
    reseal(folder)
    with pytest.raises(UserError, match="weights_only"):
        load_model(folder)
    assert not marker.exists(), "the payload ran"
    # Stock DCP would have run it: the entry is live.
    state = {"model/payload": None}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    assert marker.exists()

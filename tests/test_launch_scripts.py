"""Batch scripts: golden dry-runs for every profile, shell quoting that round-trips, no secrets written.

Regenerate the golden files after an intended change with `RECPRE_UPDATE_GOLDEN=1 pytest tests/test_launch_scripts.py`
and review the diff.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from recpre.errors import UserError
from recpre.launch.eval_array import EvalJob, render_eval_script
from recpre.launch.profile import available_profiles, load_profile
from recpre.launch.script import TrainJob, render_precompile_script, render_train_script, sbatch_quote
from recpre.launch.secrets import check_overrides

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("RECPRE_UPDATE_GOLDEN") == "1"
WEIRD = 'run.name=it\'s a "test" $HOME `x` ; rm -rf /'


def golden_job(profile_name: str) -> TrainJob:
    profile = load_profile(profile_name)
    return TrainJob(
        name="nebel",
        workdir=Path("/opt/recpre"),
        config="/opt/recpre/launch_configs/nebel-raven-3.5b-frontier.yaml",
        overrides=["optim.lr=4e-4", "run.name=nebel raven", "run.out_dir=/scratch/runs/nebel raven"],
        out_dir=Path("/scratch/runs/nebel raven"),
        nodes=profile.nodes,
        time=profile.time,
    )


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with RECPRE_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from its golden file; RECPRE_UPDATE_GOLDEN=1 to accept"


@pytest.mark.parametrize("name", available_profiles())
def test_train_script_golden(name: str) -> None:
    """Local jobs run the submitting interpreter (issue 19.9): its path is machine-specific, so the golden file
    holds <sys.executable> in its place."""
    profile = load_profile(name)
    text = render_train_script(profile, golden_job(name)).replace(shlex.quote(sys.executable), "<sys.executable>")
    check_golden(f"{name}.sh", text)


def test_trn1_precompile_golden() -> None:
    profile = load_profile("parallelcluster-trn1")
    text = render_precompile_script(profile, golden_job(profile.name))
    check_golden("parallelcluster-trn1-precompile.sh", text)
    assert "exec neuron_parallel_compile python -m torch.distributed.run --nproc_per_node=32" in text
    assert "train.py --compile-sweep --config" in text and "run.resume=never" in text
    assert "'run.out_dir=/scratch/runs/nebel raven-precompile'" in text


@pytest.mark.parametrize("name", ["slurm-gpu", "local"])
def test_eval_array_golden(name: str) -> None:
    profile = load_profile(name)
    job = EvalJob(
        name="eval",
        workdir=Path("/opt/recpre"),
        checkpoints=["/scratch/runs/a/checkpoints/step-00001000", "/scratch/runs/b c/checkpoints/latest"],
        log_dir=Path("/scratch/eval-jobs"),
        time="02:00:00",
        extra_args=["--tasks", "hellaswag,arc_easy"],
    )
    text = render_eval_script(profile, job).replace(shlex.quote(sys.executable), "<sys.executable>")
    check_golden(f"{name}-eval.sh", text)
    if profile.executor == "slurm":
        assert "#SBATCH --array=0-1" in text
        assert "#SBATCH --gpus-per-node=1" in text and "--gpus-per-node=8" not in text
    assert 'evaluate/run.py --checkpoint "$CHECKPOINT" --tasks hellaswag,arc_easy' in text


def test_golden_scripts_parse_as_bash() -> None:
    for path in sorted(GOLDEN.glob("*.sh")):
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path.name}: {proc.stderr}"


def test_sbatch_lines_per_profile() -> None:
    frontier = render_train_script(load_profile("frontier"), golden_job("frontier"))
    for line in [
        "#SBATCH --nodes=16",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --cpus-per-task=7",
        "#SBATCH --time=12:00:00",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@300",
        "#SBATCH --open-mode=append",
        "#SBATCH --exclusive",
        '#SBATCH --output="/scratch/runs/nebel raven/slurm/%x-%j.out"',
        "export NCCL_SOCKET_IFNAME=hsn",
        "export HSA_FORCE_FINE_GRAIN_PCIE=1",
        "export OMP_NUM_THREADS=7",
    ]:
        assert line in frontier.splitlines(), line
    assert "srun --ntasks-per-node=8 --cpus-per-task=7 python -u train.py --config" in frontier
    trn1 = render_train_script(load_profile("parallelcluster-trn1"), golden_job("parallelcluster-trn1"))
    assert "#SBATCH --ntasks-per-node=1" in trn1 and "#SBATCH --cpus-per-task=128" in trn1
    assert '--nproc_per_node=32 --nnodes="$SLURM_NNODES" --node_rank="$SLURM_NODEID"' in trn1
    assert "export MASTER_PORT=44000" in trn1 and "export FI_EFA_USE_DEVICE_RDMA=1" in trn1
    trn2 = render_train_script(load_profile("parallelcluster-trn2"), golden_job("parallelcluster-trn2"))
    assert '--nproc_per_node=64 --nnodes="$SLURM_NNODES"' in trn2 and "#SBATCH --cpus-per-task=192" in trn2
    assert "export NEURON_LOGICAL_NC_CONFIG=2" in trn2 and "export FI_PROVIDER=efa" in trn2
    assert "PJRT_DEVICE" not in trn2 and "neuron_parallel_compile" not in trn2  # native device, no XLA
    local = render_train_script(load_profile("local"), golden_job("local"))
    assert "#SBATCH" not in local and f"\n{shlex.quote(sys.executable)} -u train.py --config" in local


def test_sbatch_quote() -> None:
    assert sbatch_quote("/a/b-%j.out") == "/a/b-%j.out"
    assert sbatch_quote('a "b" c') == '"a \\"b\\" c"'
    with pytest.raises(UserError, match="line break"):
        sbatch_quote("a\nb")


def _fake_tools(tmp_path: Path) -> dict[str, str]:
    """srun/python/scontrol stand-ins that print their argv as JSON, to see what the shell really passes."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    echo = (
        f"#!{sys.executable}\nimport json, os, signal, sys\n"
        "ignored = signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN\n"
        "print(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:] + (['<USR2 ignored>'] if ignored else [])))\n"
    )
    for tool in ("python", "neuron_parallel_compile"):
        (bindir / tool).write_text(echo)
        (bindir / tool).chmod(0o755)
    # srun: note its options, then run the task command like SLURM would.
    srun = '#!/bin/bash\nwhile [[ "$1" == --* ]]; do echo "$1" >> "$SRUN_LOG"; shift; done\nexec "$@"\n'
    (bindir / "srun").write_text(srun)
    (bindir / "srun").chmod(0o755)
    env_log = tmp_path / "srun.log"
    (bindir / "scontrol").write_text("#!/bin/sh\necho node1\n")
    (bindir / "scontrol").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", SLURM_NNODES="2", SLURM_NODEID="1")
    env["SLURM_JOB_NODELIST"] = "node[1-2]"
    env["SRUN_LOG"] = str(env_log)
    return env


@pytest.mark.parametrize("name", available_profiles())
def test_values_round_trip_through_the_shell(tmp_path: Path, name: str) -> None:
    """Execute the rendered launch (setup lines dropped, tools faked): train.py sees exactly our arguments."""
    import json

    profile = load_profile(name)
    from dataclasses import replace

    profile = replace(profile, setup=[], precompile=profile.precompile, python="python")  # the stand-in
    job = golden_job(name)
    job = replace(job, workdir=tmp_path, overrides=[*job.overrides, WEIRD, "data.train=[a b,c]"])
    script = tmp_path / "job.sh"
    script.write_text(render_train_script(profile, job))
    proc = subprocess.run(["bash", str(script)], env=_fake_tools(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout.strip().splitlines()[-1])
    ignored = argv[-1] == "<USR2 ignored>"
    train_args = argv[argv.index("train.py") + 1 : len(argv) - ignored]
    assert train_args == job.train_args()
    # torchrun (here its stand-in) must survive SLURM's USR2 so that its workers can save.
    assert ignored == (profile.launch == "torchrun-per-node" and profile.executor == "slurm")
    if profile.executor == "slurm":
        srun_opts = (tmp_path / "srun.log").read_text().split()
        tasks = 1 if profile.launch == "torchrun-per-node" else profile.devices_per_node
        assert srun_opts[0] == f"--ntasks-per-node={tasks}"
    if profile.launch == "torchrun-per-node" and profile.executor == "slurm":
        assert argv[:3] == ["python", "-m", "torch.distributed.run"]
        assert "--node_rank=1" in argv and "--nnodes=2" in argv and "--master_addr=node1" in argv
        assert "--master_port=44000" in argv and f"--nproc_per_node={profile.devices_per_node}" in argv


def test_secret_overrides_refused() -> None:
    with pytest.raises(UserError, match="log.wandb.api_key looks like a secret"):
        check_overrides(["log.wandb.api_key=abc"])
    with pytest.raises(UserError, match="HF_TOKEN"):
        check_overrides(["HF_TOKEN=abc"])
    check_overrides(["data.tokenizer=/x", "checkpoint.keep=3", "optim.lr=1e-3"])


def test_environment_secrets_not_written(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "sekrit-value-123")
    for name in available_profiles():
        text = render_train_script(load_profile(name), golden_job(name))
        assert "sekrit-value-123" not in text and "WANDB_API_KEY=" not in text


def test_cli_dry_run_matches_renderer(tmp_path: Path) -> None:
    """The CLI validates the config, pins an absolute run folder, adds nothing else, and submits nothing."""
    out = tmp_path / "run dir"
    argv = ["--cluster", "slurm-gpu", "--config", "launch_configs/debug.yaml", "--nodes", "3", "--time", "02:00:00"]
    argv += ["--dry-run", "train.max_steps=100", f"run.out_dir={out}"]
    proc = subprocess.run([sys.executable, "launchers/submit.py", *argv], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    job = TrainJob(
        name="debug",
        workdir=REPO,
        config=str(REPO / "launch_configs/debug.yaml"),
        overrides=["train.max_steps=100", f"run.out_dir={out}"],
        out_dir=out,
        nodes=3,
        time="02:00:00",
    )
    assert proc.stdout == render_train_script(load_profile("slurm-gpu"), job)
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cluster", "nope"], "unknown cluster profile 'nope'"),
        (["--cluster", "local", "--config", "missing.yaml"], "config file missing.yaml does not exist"),
        (["--cluster", "local", "train.max_stepz=3"], "train.max_stepz"),
        (["--cluster", "local", "oops"], "must look like key=value"),
        (["--cluster", "slurm-gpu", "--time", "12h"], "--time must be a SLURM time"),
        (["--cluster", "local", "--nodes", "2"], "--nodes 1"),
        (["--cluster", "local", "log.wandb.api_key=x"], "looks like a secret"),
        (["--cluster", "local", "--eval", "no/such/ckpt"], "checkpoint no/such/ckpt does not exist"),
    ],
)
def test_cli_errors(argv: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "launchers/submit.py", "--dry-run", *argv], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_torchrun_args_quoting_is_single_level() -> None:
    text = render_train_script(load_profile("parallelcluster-trn1"), golden_job("parallelcluster-trn1"))
    launch = text.strip().splitlines()[-1]
    tokens = shlex.split(launch)
    assert tokens[tokens.index("torchrun-per-node") + 1 :][:1] == ["train.py"]


def test_cli_trn1_dry_run_chains_precompile(tmp_path: Path) -> None:
    env = dict(os.environ, DATA_DIR="/fsx/data", RUNS_DIR=str(tmp_path))
    argv = [sys.executable, "launchers/submit.py", "--cluster", "parallelcluster-trn1", "--nodes", "2"]
    argv += ["--config", "launch_configs/trn1-parallelcluster.yaml", "--dry-run"]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    pre, run = proc.stdout.split("# ===== training job =====")
    assert "pre-compile job" in pre and "exec neuron_parallel_compile python -m torch.distributed.run" in pre
    assert f"run.out_dir={tmp_path}/trn1-magpie-150m-precompile" in pre and "#SBATCH --nodes=2" in pre
    assert "neuron_parallel_compile" not in run and f"run.out_dir={tmp_path}/trn1-magpie-150m" in run
    proc = subprocess.run([*argv, "--no-precompile"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "neuron_parallel_compile" not in proc.stdout
    local = [sys.executable, "launchers/submit.py", "--cluster", "local", "--precompile", "--dry-run"]
    proc = subprocess.run(local, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--precompile needs a SLURM profile" in proc.stderr

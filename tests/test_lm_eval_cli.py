"""Issue 19.1: the documented lm-eval commands, run as a user runs them (real subprocesses, real lm-eval 0.4 code)
on local task YAMLs of the three request types: multiple_choice, loglikelihood_rolling, generate_until."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO, tiny_run_args

pytest.importorskip("lm_eval")

TASKS = "local_choice,local_rolling,local_until"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: "{data}"
  cache_dir: "{cache}"
test_split: test
should_decontaminate: false
metadata:
  version: 1.0
"""


def write_tasks(folder: Path) -> Path:
    folder.mkdir()
    rows = [{"context": f"def f{i}(", "choices": ["x):", "))", "1 +", "]]"], "gold": 0, "text": f"import os{i}\n"}
            for i in range(6)]  # fmt: skip
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = COMMON.format(data=data, cache=folder / "hf-cache")
    (folder / "choice.yaml").write_text(
        "task: local_choice\n" + common + "output_type: multiple_choice\ndoc_to_text: context\n"
        "doc_to_choice: choices\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "rolling.yaml").write_text(
        "task: local_rolling\n" + common + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
        "doc_to_target: text\nmetric_list:\n  - metric: bits_per_byte\n"
    )
    (folder / "until.yaml").write_text(
        "task: local_until\n" + common + "output_type: generate_until\ndoc_to_text: context\n"
        'doc_to_target: "{{choices[0]}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return folder


@pytest.fixture(scope="module")
def setup(train_module, tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval-cli")
    run = root / "run"
    args = tiny_run_args(run, tiny_corpus, "train.max_steps=4", "eval.interval=0")
    assert train_module.main(args) == 0
    return run, write_tasks(root / "tasks"), root


def command(entry: str) -> list[str]:
    """The console script pyproject.toml installs as `entry`, run exactly as the installed wrapper runs it."""
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][entry]
    module, function = target.split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", **OFFLINE, **env}
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, env=full)


def test_recpre_lm_eval_passes_every_lm_eval_flag_through(setup):
    """`recpre-lm-eval --model recpre ...` with lm-eval's flags; no --device on a machine without a GPU."""
    run_dir, tasks, root = setup
    out = root / "lm-eval-out"
    proc = run([*command("recpre-lm-eval"), "--model", "recpre", "--model_args",
                f"checkpoint={run_dir},num_steps=2", "--tasks", TASKS, "--include_path", str(tasks),
                "--num_fewshot", "0", "--batch_size", "4", "--limit", "3", "--output_path", str(out),
                "--log_samples", "--apply_chat_template"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [p for p in out.rglob("results_*.json")]
    assert len(results) == 1
    scores = json.loads(results[0].read_text())["results"]
    assert set(scores) == set(TASKS.split(","))
    assert 0 <= scores["local_choice"]["acc,none"] <= 1 and scores["local_rolling"]["bits_per_byte,none"] > 0
    assert {p.name.split("_")[1] for p in out.rglob("samples_*.jsonl")} == {"local"}  # --log_samples
    assert len(list(out.rglob("samples_*.jsonl"))) == 3


def test_plain_lm_eval_cannot_find_recpre_and_the_docs_say_why(setup):
    """lm-eval has no plugin hook: its own CLI does not know "recpre" (so the docs point at recpre-lm-eval)."""
    run_dir, tasks, _ = setup
    proc = run([sys.executable, "-m", "lm_eval", "--model", "recpre", "--model_args", f"checkpoint={run_dir}",
                "--tasks", TASKS, "--include_path", str(tasks), "--device", "cpu", "--limit", "1"])  # fmt: skip
    assert proc.returncode != 0 and "recpre" in proc.stderr
    readme = (REPO / "README.md").read_text()
    assert "recpre-lm-eval --model recpre" in readme and "no plugin hook" in readme


def test_evaluate_run_takes_local_task_yamls(setup):
    run_dir, tasks, root = setup
    out = root / "run-out.json"
    proc = run([sys.executable, "evaluate/run.py", "--checkpoint", str(run_dir), "--tasks", TASKS,
                "--include-path", str(tasks), "--num-steps", "1,2", "--limit", "3", "--output", str(out)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["tasks"] == TASKS.split(",") and set(results["results"]) == {"1", "2"}
    assert set(results["results"]["2"]) == set(TASKS.split(","))


def test_lm_eval_hf_model_on_an_export(setup):
    """The documented `lm_eval --model hf --model_args pretrained=<export>,trust_remote_code=True` route."""
    run_dir, tasks, root = setup
    export = root / "hf-export"
    assert run([*command("recpre-export-hf"), "--checkpoint", str(run_dir), "--output", str(export)]).returncode == 0
    out = root / "hf-out"
    proc = run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                f"pretrained={export},trust_remote_code=True", "--tasks", TASKS, "--include_path", str(tasks),
                "--device", "cpu", "--batch_size", "2", "--limit", "3", "--output_path", str(out)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert set(scores) == set(TASKS.split(","))


def test_apply_chat_template_asks_a_fine_tuned_run_in_its_own_template(sft_run, tmp_path):
    """A run fine-tuned on conversations (data.format: chat) is asked through the template it learnt: the
    prompts lm-eval logs are the `plain` template's rendering (role markers, the assistant's turn opened)."""
    tasks = write_tasks(tmp_path / "tasks")
    out = tmp_path / "out"
    proc = run([*command("recpre-lm-eval"), "--model", "recpre", "--model_args", f"checkpoint={sft_run},num_steps=2",
                "--tasks", "local_until", "--include_path", str(tasks), "--limit", "2", "--output_path", str(out),
                "--log_samples", "--apply_chat_template"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = [json.loads(line) for p in out.rglob("samples_local_until*.jsonl") for line in p.read_text().splitlines()]
    prompts = [s["arguments"]["gen_args_0"]["arg_0"] for s in samples]
    assert len(prompts) == 2
    for prompt in prompts:
        # the `plain` template's trim_blocks eats the newline after a user turn (as transformers renders it)
        assert prompt.startswith("<|user|>\ndef f") and prompt.endswith("(<|assistant|>\n"), prompt
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert "<|assistant|>" in results["chat_template"]

"""lm-eval harness and bundled tasks: exact log-likelihoods, offline runs, depth sweeps, trained beats fresh."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, tiny_run_args

pytest.importorskip("lm_eval")

from recpre.checkpoint import load_model, save_checkpoint  # noqa: E402
from recpre.data.loader import PackedLoader  # noqa: E402
from recpre.data.tokenizer import load_tokenizer  # noqa: E402
from recpre.eval.harness import RecpreLM  # noqa: E402
from recpre.eval.tasks import BUNDLED_TASKS, PLACEHOLDER, TEMPLATE_DIR, build_bundled_tasks, run_data  # noqa: E402
from recpre.model import build_model  # noqa: E402
from recpre.settings import load_settings, model_config, settings_to_yaml  # noqa: E402

TRAIN_STEPS = 200


def train_tiny(run_dir: Path, corpus, steps: int) -> Path:
    """A tiny recurrent model trained `steps` AdamW steps at random depths 1-4, saved as a checkpoint (0 = fresh)."""
    settings = load_settings(None, tiny_run_args(run_dir, corpus))
    config = model_config(settings)
    torch.manual_seed(0)
    model = build_model(config)
    loader = PackedLoader(list(settings.data.train), block_size=config.block_size, micro_batch_size=16, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    rng = random.Random(0)
    for _, (x, y) in zip(range(steps), loader):
        r = rng.randint(1, 4)
        loss = model(x, y, num_steps=(max(r - 2, 0), min(r, 2))).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return save_checkpoint(
        run_dir / "checkpoints",
        steps,
        model=model,
        model_config=config.to_dict(),
        settings_yaml=settings_to_yaml(settings),
        state={},
        rank_state={},
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_corpus):
    root = tmp_path_factory.mktemp("eval-runs")
    return {
        "trained": train_tiny(root / "trained", tiny_corpus, TRAIN_STEPS),
        "fresh": train_tiny(root / "fresh", tiny_corpus, 0),
    }


@pytest.fixture(scope="module")
def lm(checkpoints):
    model, settings = load_model(checkpoints["trained"])
    tokenizer_dir, _ = run_data(settings, model.config)
    return RecpreLM(model=model, tokenizer=load_tokenizer(tokenizer_dir), num_steps=3, batch_size=3)


def request(*args):
    return SimpleNamespace(args=args)


@torch.no_grad()
def hand_loglikelihood(lm: RecpreLM, context: str, continuation: str) -> tuple[float, bool]:
    """One sequence, no batching: split at the context's token boundary, sum log-probs of the continuation."""
    tok = lm.tokenizer
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[: -n_spaces or None], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context) if context else [tok.eos_id]
    cont = whole[len(tok.encode(context)) :] if context else tok.encode(continuation)
    seq = (ctx + cont)[-(lm.block_size + 1) :]
    ids = torch.tensor([seq[:-1]])
    logp = F.log_softmax(lm.model(ids, num_steps=3).logits[0], dim=-1)
    n = min(len(cont), len(seq) - 1)
    rows = logp[len(seq) - 1 - n :]
    targets = torch.tensor(seq[-n:])
    return float(rows.gather(-1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())


def test_loglikelihood_equals_hand_computed_sum(lm):
    cases = [
        ("def add(a, b):\n    return", " a + b\n"),
        ("import os\nimport ", "sys\n"),  # split mid-line; "import sys" may merge across the boundary
        ("for i in range(10): ", "print(i)"),  # trailing space moves into the continuation
        ("", "class Foo:\n    pass\n"),  # empty context: EOS stands in for it
        ("x = 1\n" * 20, "y = 2\n"),  # longer than the block: the left is cut off
        ("self.assertEqual(a,", " b)"),
    ]
    ours = lm.loglikelihood([request(c, x) for c, x in cases], disable_tqdm=True)
    for (c, x), (lp, greedy) in zip(cases, ours):
        ref_lp, ref_greedy = hand_loglikelihood(lm, c, x)
        assert lp == pytest.approx(ref_lp, rel=1e-5, abs=1e-4), (c, x)
        assert greedy == ref_greedy
        assert lp < 0
    # batch composition does not change a score
    lm1 = RecpreLM(model=lm.model, tokenizer=lm.tokenizer, num_steps=3, batch_size=1)
    alone = lm1.loglikelihood([request(c, x) for c, x in cases], disable_tqdm=True)
    for a, b in zip(ours, alone):
        assert a[0] == pytest.approx(b[0], rel=1e-5, abs=1e-4)


def test_loglikelihood_rolling_sums_every_token_once(lm):
    text = "def f(x):\n    return x * 2\n"
    tokens = lm.tokenizer.encode(text)
    assert len(tokens) < lm.block_size
    (rolled,) = lm.loglikelihood_rolling([request(text)])
    ids = torch.tensor([[lm.tokenizer.eos_id, *tokens[:-1]]])
    with torch.no_grad():
        logp = F.log_softmax(lm.model(ids, num_steps=3).logits[0], dim=-1)
    assert rolled == pytest.approx(float(logp.gather(-1, torch.tensor(tokens)[:, None]).sum()), rel=1e-5)
    # a text of several windows: every token is scored once, each with the block_size tokens before it (EOS
    # before the first) as context; the total is the sum over tokens, computed here window by window by hand
    long_text = "x = [i * i for i in range(100)]\n" * 12
    tokens = lm.tokenizer.encode(long_text)
    n, block = len(tokens), lm.block_size
    assert n > 3 * block and n % block != 0  # a short last window too
    (total,) = lm.loglikelihood_rolling([request(long_text)])
    by_hand, scored = 0.0, 0
    for end in [*range(block, n, block), n]:
        start = scored  # tokens[start:end] are predicted by this window
        inputs = [lm.tokenizer.eos_id, *tokens[: end - 1]][-block:]
        targets = tokens[end - len(inputs) : end]
        with torch.no_grad():
            logp = F.log_softmax(lm.model(torch.tensor([inputs]), num_steps=3).logits[0], dim=-1)
        picked = logp.gather(-1, torch.tensor(targets)[:, None])[:, 0]
        by_hand += float(picked[len(targets) - (end - start) :].sum())
        scored = end
    assert scored == n
    assert total == pytest.approx(by_hand, rel=1e-5)


def test_generate_until_stops_at_the_stop_string(lm):
    reqs = [
        request("def main():\n", {"until": ["\n"], "max_gen_toks": 20}),
        request("import", {"until": ["\n\n"], "max_gen_toks": 5}),
    ]
    out = lm.generate_until(reqs)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert "\n" not in out[0]
    assert len(lm.tokenizer.encode(out[1])) <= 5


def test_bundled_tasks_are_deterministic_and_portable(tmp_path, checkpoints):
    model, settings = load_model(checkpoints["trained"])
    tok_dir, val = run_data(settings, model.config)
    a = build_bundled_tasks(val, tok_dir, cache_dir=tmp_path / "a")
    b = build_bundled_tasks(val, tok_dir, cache_dir=tmp_path / "b")
    for name in ("heldout.jsonl", "next_line.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    questions = [json.loads(line) for line in (a / "next_line.jsonl").read_text().splitlines()]
    assert len(questions) == 200 and all(len(q["choices"]) == 4 for q in questions)
    golds = [q["gold"] for q in questions]
    assert all(golds.count(g) > 30 for g in range(4))  # the answer position is not a cue
    for q in questions:
        assert len({c.strip() for c in q["choices"]}) == 4
    for template in TEMPLATE_DIR.glob("*.yaml"):  # committed templates: no absolute path, only the placeholder
        text = template.read_text()
        assert PLACEHOLDER in text and "/tmp" not in text and str(Path.home()) not in text
    assert {p.stem for p in TEMPLATE_DIR.glob("*.yaml")} == set(BUNDLED_TASKS)


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(REPO / "evaluate" / "run.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_run_cli_bundled_depth_sweep_offline(tmp_path, checkpoints):
    out = tmp_path / "res" / "sweep.json"
    # no network: any Hub access would fail (offline flags plus an unroutable proxy)
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    proc = run_cli(
        "--checkpoint", str(checkpoints["trained"].parent.parent), "--num-steps", "1,3", "--limit", "20",
        "--output", str(out), env_extra=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["depths"] == [1, 3] and results["tasks"] == list(BUNDLED_TASKS)
    for depth in ("1", "3"):
        assert 0 < results["results"][depth]["recpre_heldout"]["bits_per_byte"] < 20
        assert 0 <= results["results"][depth]["recpre_next_line"]["acc"] <= 1
    assert "bits_per_byte" in proc.stdout and "depth 3" in proc.stdout
    pngs = sorted(p.name for p in out.parent.glob("*.png"))
    assert "sweep_recpre_heldout_bits_per_byte.png" in pngs and "sweep_recpre_next_line_acc.png" in pngs


def test_run_cli_bad_input_is_one_sentence(tmp_path, checkpoints):
    proc = run_cli("--checkpoint", str(checkpoints["trained"]), "--num-steps", "0,2")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --num-steps")
    proc = run_cli("--checkpoint", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and proc.stderr.startswith("error:")


def test_hub_task_without_network_fails_clearly(checkpoints):
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-hf-home"}
    proc = run_cli("--checkpoint", str(checkpoints["trained"]), "--tasks", "arc_easy", "--limit", "2", env_extra=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Hugging Face Hub" in proc.stderr and "--tasks bundled" in proc.stderr


def test_trained_checkpoint_beats_fresh_on_both_bundled_tasks(checkpoints):
    from recpre.eval.sweep import evaluate_checkpoint

    scores = {name: evaluate_checkpoint(path, depths=[3])["results"]["3"] for name, path in checkpoints.items()}
    trained, fresh = scores["trained"], scores["fresh"]
    print(json.dumps(scores, indent=1))
    assert trained["recpre_heldout"]["bits_per_byte"] < fresh["recpre_heldout"]["bits_per_byte"] - 0.5
    assert trained["recpre_next_line"]["acc_mutual_info"] > fresh["recpre_next_line"]["acc_mutual_info"]
    assert trained["recpre_next_line"]["brier_score"] < fresh["recpre_next_line"]["brier_score"]

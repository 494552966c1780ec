"""The data CLIs as subprocesses on small real files (text, jsonl, parquet): the whole chain, and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recpre.data.loader import PackedLoader

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_script_chain(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    stdlib = Path(json.__file__).parent  # real text nobody here wrote
    (raw / "doc.txt").write_text((stdlib / "decoder.py").read_text(encoding="utf-8"), encoding="utf-8")
    with open(raw / "docs.jsonl", "w", encoding="utf-8") as f:
        for name in ("encoder.py", "scanner.py", "tool.py"):
            f.write(json.dumps({"text": (stdlib / name).read_text(encoding="utf-8")}) + "\n")
    pq.write_table(pa.table({"text": [(stdlib / "__init__.py").read_text(encoding="utf-8")] * 3}), raw / "docs.parquet")

    run("build_tokenizer.py", "--input", raw, "--vocab-size", 512, "--output", tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    out = run(
        "tokenize_corpus.py", "--input", raw / "doc.txt", raw / "docs.jsonl", raw / "docs.parquet",
        "--tokenizer", tmp_path / "tok", "--block-size", 32, "--output", tmp_path / "packed", "--no-progress",
    )  # fmt: skip
    assert "7 documents" in out.stdout
    run("shuffle.py", "--input", tmp_path / "packed", "--output", tmp_path / "split", "--val-fraction", 0.1,
        "--seed", 0)  # fmt: skip
    stats = run("count_tokens.py", tmp_path / "packed", tmp_path / "split" / "train", tmp_path / "split" / "val",
                "--json").stdout.splitlines()  # fmt: skip
    packed, train, val = (json.loads(s) for s in stats)
    assert packed["documents"] == 7 and packed["block_size"] == 32
    assert train["rows"] + val["rows"] == packed["rows"] and val["rows"] > 0
    loader = PackedLoader([tmp_path / "split" / "train"], block_size=32, micro_batch_size=2, num_epochs=1)
    assert len(list(loader)) == train["rows"] // 2


def test_scripts_bad_input_exit_2(tmp_path):
    proc = run("count_tokens.py", tmp_path / "missing", ok=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "missing" in proc.stderr
    (tmp_path / "t.parquet").write_bytes(b"PAR1 not really")
    proc = run("shuffle.py", "--input", tmp_path / "t.parquet", "--output", tmp_path / "o", "--val-fraction", 0.1,
               "--seed", 0, ok=False)  # fmt: skip
    assert proc.returncode == 2 and "t.parquet" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()

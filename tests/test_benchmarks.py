"""The benchmark harness: run_all's machinery on stub benches, the report format, the scaling model's arithmetic.

Nothing here times anything or asserts a speed: CI machines differ. The real benches run from
`python benchmarks/run_all.py --quick` (CPU) and `--full` (GPU), see docs/performance.md.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import report  # noqa: E402
import run_all  # noqa: E402
import scaling_model as sm  # noqa: E402

from recpre.errors import UserError  # noqa: E402

STUB_OK = """
import json, sys
print("| case | value |")
print("|---|---|")
print("| stub | 42 |")
print("BENCH_FIGURES " + json.dumps({"bench": "stub", "figures": [
    {"name": "argv", "value": " ".join(sys.argv[1:]), "unit": ""},
    {"name": "speed", "value": 12.5, "unit": "tok/s", "note": "a note"}]}))
# accepts "--quick" and "--full"
"""
STUB_FAIL = 'import sys\nprint("half a result")\nprint("boom", file=sys.stderr)\nsys.exit(3)\n'
STUB_SLOW = 'import time\nprint("started", flush=True)\ntime.sleep(60)\n'
STUB_PLAIN = 'import sys\nprint("plain output, args:", sys.argv[1:])\n'


@pytest.fixture
def bench_dir(tmp_path: Path) -> Path:
    d = tmp_path / "benches"
    d.mkdir()
    (d / "bench_ok.py").write_text(STUB_OK)
    (d / "bench_fail.py").write_text(STUB_FAIL)
    (d / "bench_slow.py").write_text(STUB_SLOW)
    (d / "bench_plain.py").write_text(STUB_PLAIN)
    return d


def test_run_all_quick_writes_report_with_every_outcome(bench_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    rc = run_all.main(["--quick", "--bench-dir", str(bench_dir), "--out", str(out), "--timeout-s", "6"])
    assert rc == 1  # one bench failed, one timed out: the run says so, and still writes the report
    text = out.read_text()
    summary = text.split("## Summary", 1)[1].split("## Figures", 1)[0]
    assert "| ok | ok |" in summary
    assert "| fail | failed: exit 3: boom |" in summary
    assert "| slow | timeout: killed after 6 s |" in summary
    assert "| plain | ok: no --quick/--full flag: ran with its defaults |" in summary
    # the uniform interface: a script that knows --quick gets it; its figures land in the figures table
    assert "| stub | argv | --quick |  |  |" in text
    assert "| stub | speed | 12.5 | tok/s | a note |" in text
    # its own markdown table is copied; a failed bench shows its output tail
    assert "| stub | 42 |" in text
    assert "boom" in text.split("## fail", 1)[1]
    assert "plain output" in text.split("## plain", 1)[1]
    assert not list(tmp_path.glob("*.tmp"))


def test_run_all_list_and_selection(bench_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_all.main(["--full", "--list", "--bench-dir", str(bench_dir), "--only", "ok,plain"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("python ") and lines[0].endswith("bench_ok.py --full")
    assert "# no --quick/--full flag" in lines[1]
    with pytest.raises(UserError, match="no bench named 'nope'"):
        run_all.main(["--quick", "--list", "--bench-dir", str(bench_dir), "--only", "nope"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_run_all_full_needs_a_gpu(bench_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--full needs a CUDA GPU"):
        run_all.main(["--full", "--bench-dir", str(bench_dir), "--out", str(tmp_path / "r.md")])
    assert not (tmp_path / "r.md").exists()


def test_every_repo_bench_has_a_command_at_both_scales() -> None:
    for path in run_all.discover(run_all.BENCH_DIR):
        for scale in run_all.SCALES:
            command, note = run_all.bench_command(path, scale)
            assert command[1].endswith(path.name)
            assert not note, f"{path.name} has no {scale} arguments: add --quick/--full or an ARGS entry"


def test_report_format_and_file_name() -> None:
    env = {
        "date": "2026-11-23 10:00 UTC",
        "host_cpu": "Test CPU, 2 cores",
        "torch_threads": 2,
        "load": 1.0,
        "gpus": ["NVIDIA H100 80GB HBM3"],
        "versions": {"python": "3.11", "torch": "2.13"},
        "commit": "abc1234",
    }
    results = [
        report.BenchResult(
            "a", ["python", "benchmarks/bench_a.py", "--full"], "ok", 1.5, 0, "| x | y |\n|---|---|\n| 1 | 2 |\n"
        ),
        report.BenchResult("b", ["python", "b.py"], "failed", 2.0, 1, "", "Traceback\nValueError: bad", note="exit 1"),
    ]
    results[0].figures = [{"bench": "a", "name": "tokens/s", "value": 123456.7, "unit": "tok/s"}]
    text = report.render_report(
        env, results, scale="full", command="python benchmarks/run_all.py --full", wall_s=60, notes=["n1"]
    )
    order = [
        "# recpre benchmarks: h100, full (2026-11-23)",
        "- date:",
        "- device: NVIDIA H100 80GB HBM3",
        "- versions:",
        "- commit: abc1234",
        "- command: `python benchmarks/run_all.py --full`",
        "## Summary",
        "## Figures",
        "| a | tokens/s | 123,457 | tok/s |  |",
        "## a",
        "| 1 | 2 |",
        "## b",
        "ValueError: bad",
        "## Notes",
        "- n1",
    ]
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions)
    assert report.report_path(Path("res"), env) == Path("res/2026-11-23_h100.md")
    assert report.device_slug({**env, "gpus": ["NVIDIA H200"]}) == "h200"
    assert report.device_slug({**env, "gpus": []}) == "cpu"
    assert report.device_slug({**env, "gpus": ["Some New GPU 9000"]}) == "some-new-gpu-9000"


def test_figures_line_round_trip(capsys: pytest.CaptureFixture) -> None:
    report.emit_figures("x", [{"name": "a|b", "value": 1.25, "unit": "s"}, {"name": "n", "value": 3, "note": "why"}])
    out = "noise\n" + capsys.readouterr().out + "BENCH_FIGURES {not json\n"
    figs = report.parse_figures(out)
    assert figs == [
        {"bench": "x", "name": "a|b", "value": 1.25, "unit": "s"},
        {"bench": "x", "name": "n", "value": 3, "unit": "", "note": "why"},
    ]
    assert report.extract_tables("a\n| h |\n|---|\n| 1 |\nb\n| lonely |\n") == ["| h |\n|---|\n| 1 |"]


# ---------------------------------------------------------------------------------------------- scaling model


def test_stream_size_matches_the_fabric() -> None:
    """The model's bytes and chunk count are the ones SimpleFabric's gradient stream actually sends."""
    from recpre.config import ModelConfig
    from recpre.fabric import _GradStream
    from recpre.model import build_model

    model = build_model(ModelConfig.from_name("debug-recurrent"))
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    chunk_mb = 0.25
    stream = _GradStream(params, int(chunk_mb * 2**20) // 4, torch.device("cpu"), 2)
    assert sum(stream.chunk_lengths) == sm.stream_elements(n_params, len(params))
    assert len(stream.chunks) == sm.stream_chunks(n_params, len(params), chunk_mb)
    assert sm.stream_bytes(n_params, len(params)) == 4 * sum(stream.chunk_lengths)


def test_allreduce_arithmetic() -> None:
    assert sm.stream_bytes(3_564_976_800, 75) == 4 * 3_564_976_875
    assert sm.stream_chunks(3_564_976_800, 75, 25.0) == math.ceil(3_564_976_875 / (25 * 2**20 // 4)) == 544
    assert sm.ring_allreduce_s(1e9, 1, 1e9, 1.0, 10) == 0.0
    assert sm.ring_allreduce_s(1e9, 2, 1e9, 0.0) == pytest.approx(1.0)  # 2 (p-1)/p x B / bw
    assert sm.ring_allreduce_s(1e9, 4, 1e9, 0.0) == pytest.approx(1.5)
    assert sm.ring_allreduce_s(0, 3, 1e9, 1e-3, chunks=5) == pytest.approx(5 * 4 * 1e-3)  # chunks x 2 (p-1) x alpha
    # one device: nothing to reduce; one node of 8: the intra-node ring only; many nodes: tree latency wins
    assert sm.cluster_allreduce_s(1e9, 1, 1, 1e9, 1e9, 1e-5, 3) == (0.0, "-")
    t, algo = sm.cluster_allreduce_s(8e9, 1, 8, 400e9, 50e9, 0.0, 1)
    assert t == pytest.approx(2 * 7 / 8 * 8e9 / 400e9) and algo in ("ring", "tree")
    t, algo = sm.cluster_allreduce_s(8e9, 4, 8, 400e9, 50e9, 1e-5, 10)
    bw = 2 * 7 / 8 * 8e9 / 400e9 + 2 * 3 / 4 * 8e9 / 50e9
    assert algo == "tree" and t == pytest.approx(bw + 10 * 2 * 5 * 1e-5)  # log2(32) = 5 hops each way


def test_fit_ring_recovers_latency_and_bandwidth() -> None:
    alpha, beta = 2e-4, 1.5e9
    points = [(c, b, sm.ring_allreduce_s(b, 2, beta, alpha, c)) for c, b in ((8, 3.3e7), (8, 5e5), (1, 3.3e7))]
    fit_alpha, fit_beta = sm.fit_ring(points, 2)
    assert fit_alpha == pytest.approx(alpha) and fit_beta == pytest.approx(beta)


def test_scaling_rows_fixed_global_batch() -> None:
    rows = sm.scaling_rows(
        micro_step_s=2.0,
        micro_batch=1,
        block_size=4096,
        global_batch=64,
        nbytes=8e9,
        chunks=10,
        nodes_list=[1, 2, 8],
        gpus_per_node=8,
        intra_bw=400e9,
        inter_bw=50e9,
        latency_s=0.0,
    )
    assert [r.accum for r in rows] == [8, 4, 1]
    assert [r.compute_s for r in rows] == [16.0, 8.0, 2.0]
    for r in rows:
        assert r.step_s == pytest.approx(r.compute_s + r.allreduce_s)
        assert r.efficiency == pytest.approx(r.compute_s / r.step_s)
        assert r.tokens_per_s == pytest.approx(64 * 4096 / r.step_s)
    assert rows[0].efficiency > rows[1].efficiency > rows[2].efficiency
    kw = dict(micro_step_s=1.0, micro_batch=1, block_size=8, global_batch=8, nbytes=8e9, chunks=1, gpus_per_node=1)
    kw.update(intra_bw=1e9, inter_bw=1e9, latency_s=0.0)
    single, pair = sm.scaling_rows(nodes_list=[1, 2], copy_bw=4e9, **kw)
    assert single.allreduce_s == 0.0  # one device: no stream, no copies
    assert pair.allreduce_s == pytest.approx(8.0 + 2 * 8e9 / 4e9)  # 2 (p-1)/p x B / bw + two buffer copies


def test_mean_training_flops_uses_the_sampled_depths() -> None:
    from recpre.config import ModelConfig
    from recpre.recurrence import sample_depth

    config = ModelConfig.from_name("debug-recurrent")
    draws = [sample_depth(config, i, 0, 0) for i in range(50)]
    expected = sum(config.flops_per_token(d, training=True) for d in draws) / 50
    assert sm.mean_training_flops(config, samples=50) == pytest.approx(expected)
    fixed = ModelConfig.from_name("debug-recurrent", sampling_scheme="fixed")
    assert sm.mean_training_flops(fixed, samples=5) == pytest.approx(fixed.flops_per_token(training=True))


def test_bench_mfu_quick_runs_one_step(capsys: pytest.CaptureFixture) -> None:
    import bench_mfu

    assert bench_mfu.main(["--quick", "--steps", "1", "--warmup", "0"]) == 0
    figs = report.parse_figures(capsys.readouterr().out)
    names = [f["name"] for f in figs]
    assert any(n.endswith("tokens/s") for n in names) and any(n.endswith("achieved") for n in names)
    with pytest.raises(UserError, match="--compile takes"):
        bench_mfu.main(["--quick", "--compile", "everything"])

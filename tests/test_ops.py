"""fused_linear_cross_entropy against F.cross_entropy on materialised logits (float64, 1e-10)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from recpre.ops import default_chunk_size, fused_linear_cross_entropy

TOL = dict(atol=1e-10, rtol=1e-10)


def reference(hidden, weight, targets, *, z_loss=0.0, label_smoothing=0.0, reduction="mean", normalizer=None):
    """Materialised logits + F.cross_entropy; z-loss added per non-ignored token."""
    logits = hidden @ weight.t()
    per = F.cross_entropy(logits, targets, ignore_index=-100, label_smoothing=label_smoothing, reduction="none")
    keep = targets != -100
    if z_loss:
        per = per + torch.where(keep, z_loss * torch.logsumexp(logits, -1) ** 2, torch.zeros_like(per))
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    denom = keep.sum().clamp_min(1) if normalizer is None else normalizer
    return per.sum() / denom


def inputs(n, d, v, seed=0, dtype=torch.float64, ignore=0.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore] = -100
    return hidden, weight, targets


def grads(fn, hidden, weight, targets, scale=1.0, **kw):
    hidden.grad = weight.grad = None
    out = fn(hidden, weight, targets, **kw)
    ((scale * out).sum() if out.dim() == 0 else (scale * out * torch.arange(out.numel())).sum()).backward()
    return out.detach(), hidden.grad.clone(), weight.grad.clone()


def check(hidden, weight, targets, chunk_size=None, scale=1.0, **kw):
    got = grads(fused_linear_cross_entropy, hidden, weight, targets, scale=scale, chunk_size=chunk_size, **kw)
    want = grads(reference, hidden, weight, targets, scale=scale, **kw)
    for a, b, what in zip(got, want, ("loss", "dhidden", "dweight")):
        assert torch.isfinite(a).all(), what
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, w=what: f"{w}: {m}")
    return got


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_random_shapes_and_chunks(seed, reduction):
    g = torch.Generator().manual_seed(100 + seed)
    n, d, v = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 97), (1, 33), (2, 130)))
    hidden, weight, targets = inputs(n, d, v, seed, ignore=0.3)
    for chunk in {1, max(1, n // 4), 7, n, n + 5, None}:  # dividing, not dividing, larger than N, default
        check(hidden, weight, targets, chunk_size=chunk, reduction=reduction)


def test_uneven_ignore_first_half():
    n = 64
    hidden, weight, targets = inputs(n, 16, 50, seed=1)
    first = torch.rand(n // 2, generator=torch.Generator().manual_seed(0)) < 0.9
    targets[: n // 2][first] = -100
    assert (targets[: n // 2] == -100).float().mean() > 0.75
    # per-chunk means would weight the sparse first half like the dense second half: the global mean must not
    check(hidden, weight, targets, chunk_size=16)
    check(hidden, weight, targets, chunk_size=32, z_loss=1e-3, label_smoothing=0.1)


def test_fully_ignored_chunk():
    hidden, weight, targets = inputs(40, 8, 30, seed=2)
    targets[:16] = -100
    check(hidden, weight, targets, chunk_size=16)
    check(hidden, weight, targets, chunk_size=16, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_is_zero(reduction):
    hidden, weight, targets = inputs(20, 8, 30, seed=3)
    targets[:] = -100
    loss, dh, dw = check(hidden, weight, targets, chunk_size=6, reduction=reduction)
    assert (loss == 0).all() and (dh == 0).all() and (dw == 0).all()
    if reduction == "mean":  # an explicit zero normalizer (no targets on any rank) is 0 too
        loss, dh, dw = grads(fused_linear_cross_entropy, hidden, weight, targets, normalizer=torch.tensor(0))
        assert loss == 0 and (dh == 0).all() and (dw == 0).all()


@pytest.mark.parametrize(("z_loss", "label_smoothing"), [(1e-2, 0.0), (0.0, 0.1), (1e-3, 0.25), (0.5, 1.0)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_z_loss_and_label_smoothing(z_loss, label_smoothing, reduction):
    hidden, weight, targets = inputs(45, 12, 70, seed=4, ignore=0.2)
    check(hidden, weight, targets, chunk_size=8, z_loss=z_loss, label_smoothing=label_smoothing, reduction=reduction)


def test_scaled_loss_scales_gradients():
    hidden, weight, targets = inputs(33, 10, 40, seed=5, ignore=0.1)
    _, dh, dw = check(hidden, weight, targets, chunk_size=8, scale=0.5)
    _, dh1, dw1 = grads(fused_linear_cross_entropy, hidden, weight, targets, chunk_size=8)
    torch.testing.assert_close(dh, 0.5 * dh1, **TOL)
    torch.testing.assert_close(dw, 0.5 * dw1, **TOL)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_explicit_normalizer(as_tensor):
    hidden, weight, targets = inputs(30, 8, 25, seed=6, ignore=0.3)
    norm = torch.tensor(123.0, dtype=torch.float64) if as_tensor else 123.0
    check(hidden, weight, targets, chunk_size=7, normalizer=norm)
    # micro-batches normalised by the global count sum to the full-batch mean
    total = sum(
        fused_linear_cross_entropy(hidden[s : s + 10], weight, targets[s : s + 10], normalizer=norm, chunk_size=4)
        for s in (0, 10, 20)
    )
    torch.testing.assert_close(total, reference(hidden, weight, targets, reduction="sum") / 123.0, **TOL)


def test_leading_dims_are_flattened():
    hidden, weight, targets = inputs(24, 8, 20, seed=7, ignore=0.2)
    out = fused_linear_cross_entropy(hidden.view(4, 6, 8), weight, targets.view(4, 6), reduction="none", chunk_size=5)
    assert out.shape == (4, 6)
    torch.testing.assert_close(out.reshape(-1), reference(hidden, weight, targets, reduction="none"), **TOL)


def test_bf16_within_tolerance():
    hidden, weight, targets = inputs(256, 64, 512, seed=8, ignore=0.2)
    hb = hidden.detach().bfloat16().requires_grad_()
    wb = weight.detach().bfloat16().requires_grad_()
    loss, dh, dw = grads(fused_linear_cross_entropy, hb, wb, targets, chunk_size=48)
    assert dh.dtype == dw.dtype == torch.bfloat16 and loss.dtype == torch.float32
    # the float64 reference on the bf16-rounded inputs: only the op's own rounding remains
    h64, w64 = hb.detach().double().requires_grad_(), wb.detach().double().requires_grad_()
    ref, rdh, rdw = grads(reference, h64, w64, targets)
    torch.testing.assert_close(loss.double(), ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(dh.double(), rdh, atol=1e-4, rtol=2e-2)
    torch.testing.assert_close(dw.double(), rdw, atol=1e-4, rtol=2e-2)


def test_autocast_bf16_keeps_fp32_gradients():
    hidden, weight, targets = inputs(128, 32, 256, seed=12, ignore=0.2)
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h32, w32, targets, chunk_size=40)
    loss.backward()
    assert loss.dtype == h32.grad.dtype == w32.grad.dtype == torch.float32
    ref, rdh, rdw = grads(reference, hidden, weight, targets)
    torch.testing.assert_close(loss.double(), ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(h32.grad.double(), rdh, atol=1e-4, rtol=3e-2)
    torch.testing.assert_close(w32.grad.double(), rdw, atol=1e-4, rtol=3e-2)


def test_no_grad_and_eval_do_no_gradient_work():
    hidden, weight, targets = inputs(20, 8, 30, seed=9, ignore=0.2)
    with torch.no_grad():
        out = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=6)
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, reference(hidden, weight, targets).detach(), **TOL)
    out = fused_linear_cross_entropy(hidden.detach(), weight.detach(), targets, chunk_size=6, reduction="none")
    assert out.grad_fn is None
    # only the tensor that requires grad gets one
    w = weight.detach().requires_grad_()
    fused_linear_cross_entropy(hidden.detach(), w, targets).backward()
    assert w.grad is not None


def test_bad_arguments():
    hidden, weight, targets = inputs(8, 4, 10)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, targets, reduction="avg")
    with pytest.raises(ValueError, match="normalizer"):
        fused_linear_cross_entropy(hidden, weight, targets, reduction="sum", normalizer=3.0)
    with pytest.raises(ValueError, match="disagree"):
        fused_linear_cross_entropy(hidden, weight[:, :3], targets)


def test_default_chunk_size():
    assert default_chunk_size(8192, 32768, "cpu") <= 8192
    assert default_chunk_size(10, 32768, "cpu") == 10
    assert default_chunk_size(1 << 20, 65536, "cuda") > default_chunk_size(1 << 20, 65536, "cpu")


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from recpre.ops import fused_linear_cross_entropy
    def reset():
        open("/proc/self/clear_refs", "w").write("5")
    def kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    path = sys.argv[1]
    def loss(h, w, t):
        if path == "naive":
            return torch.nn.functional.cross_entropy(h @ w.t(), t, ignore_index=-100)
        return fused_linear_cross_entropy(h, w, t)
    torch.manual_seed(0)
    n, d, v = 8192, 512, 32768
    small = [torch.randn(64, d, requires_grad=True), torch.randn(128, d, requires_grad=True), torch.randint(0, 128, (64,))]
    loss(*small).backward()  # load code paths before measuring
    h = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(v, d) / d**0.5).requires_grad_()
    t = torch.randint(0, v, (n,))
    t[: n // 10] = -100
    reset()
    base = kib("VmRSS")
    loss(h, w, t).backward()
    print(json.dumps({"extra_mib": (kib("VmHWM") - base) / 1024}))
    """
)


def _peak(path: str) -> float:
    r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, path], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])["extra_mib"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS via /proc/self/clear_refs is Linux-only")
def test_peak_memory_fused_vs_naive():
    naive = _peak("naive")
    fused = _peak("fused")
    assert naive > 1024, f"naive path peak {naive:.0f} MiB is implausibly small: the measurement is broken"
    assert fused <= 0.15 * naive, f"fused extra peak {fused:.0f} MiB > 15% of naive {naive:.0f} MiB"

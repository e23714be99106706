"""Attention kernels: every backend equals explicit softmax, with per-key bias (differentiable), masks, empty rows."""
from __future__ import annotations

import math

import pytest
import torch

from decmem.model.kernels import attend, merge_lse, resolve_backend


def reference(q, k, v, bias, mask):
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.unsqueeze(-2)
    if mask is not None:
        logits = logits.masked_fill(~mask.unsqueeze(-2), -math.inf)
    lse = torch.logsumexp(logits, -1)
    p = torch.softmax(logits, -1).nan_to_num(0.0)
    return p @ v, lse


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("with_bias,with_mask", [(False, False), (True, False), (True, True), (False, True)])
def test_backend_matches_softmax(backend, with_bias, with_mask):
    torch.manual_seed(0)
    q = torch.randn(2, 3, 5, 17, 12, requires_grad=True)
    k = torch.randn(2, 3, 5, 40, 12, requires_grad=True)
    v = torch.randn(2, 3, 5, 40, 12, requires_grad=True)
    bias = torch.randn(2, 3, 5, 40, requires_grad=True) if with_bias else None
    mask = torch.rand(2, 3, 5, 40) > 0.4 if with_mask else None
    if mask is not None:
        mask[0, 0, 0] = False  # one group with every key masked: out 0, lse -inf, finite grads
        mask[0, 0, 1] = True
    out, lse = attend(q, k, v, bias, mask, backend=backend)
    ro, rl = reference(q.double(), k.double(), v.double(), None if bias is None else bias.double(), mask)
    torch.testing.assert_close(out.double(), ro, atol=2e-5, rtol=2e-5)
    finite = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse.double()[finite], rl[finite], atol=2e-5, rtol=2e-5)
    wo, wl = torch.randn_like(out), torch.randn_like(lse)
    leaves = [t for t in (q, k, v, bias) if t is not None]
    g = torch.autograd.grad((out * wo).sum() + (torch.where(finite, lse, 0) * wl).sum(), leaves)
    gr = torch.autograd.grad((ro * wo.double()).sum() + (torch.where(finite, rl, 0) * wl.double()).sum(), leaves)
    for a, b in zip(g, gr):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b.double(), atol=5e-5, rtol=5e-5)


def test_merge_of_partials_equals_joint_softmax():
    torch.manual_seed(1)
    q, k, v = torch.randn(4, 9, 8, dtype=torch.float64), torch.randn(4, 30, 8, dtype=torch.float64), torch.randn(4, 30, 8, dtype=torch.float64)
    full = attend(q, k, v)
    parts = [attend(q, k[:, a:b], v[:, a:b]) for a, b in ((0, 7), (7, 7), (7, 30))]  # one empty partial
    out, lse = merge_lse(parts)
    torch.testing.assert_close(out, full[0], atol=1e-13, rtol=0)
    torch.testing.assert_close(lse, full[1], atol=1e-13, rtol=0)
    empty = attend(q, k[:, :0], v[:, :0])
    out, lse = merge_lse([empty, empty])
    assert (out == 0).all() and torch.isinf(lse).all()


def test_auto_backend_and_errors():
    assert resolve_backend("auto", torch.zeros(1, dtype=torch.float64)) == "math"
    assert resolve_backend("auto", torch.zeros(1)) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash", torch.zeros(1))


def test_recompute_backward_matches_autograd():
    """The exact backward used by fused kernels without an lse-aware backward (GPU flash-attn, xformers)."""
    from decmem.model.kernels import _recompute_backward

    torch.manual_seed(2)
    q, k, v = (torch.randn(3, n, 6, dtype=torch.float64, requires_grad=True) for n in (7, 11, 11))
    s = q @ k.transpose(-1, -2) * 0.4
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ v
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    ref = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), [q, k, v])
    got = _recompute_backward(q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), go, gl, 0.4)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)

"""Attention kernels behind one function, ``attend``, returning ``(out, lse)``.

Every DecMem branch (selected blocks, ALM window, the chunk itself) is one call
of ``attend``; branches are combined afterwards with ``merge_lse``. The log-sum-
exp is what makes partial attentions composable: on one process (SGM + chunk,
joint merge) and across context-parallel ranks alike.

Biases and masks are *per key* (the same for every query of the call), which
is all DecMem needs: inside one query block the retrieval bias depends only on
the key's block. Fast kernels that take no differentiable bias get it folded
into one extra key feature (q gets a constant 1, k gets bias / scale), so their
own backward differentiates the bias.

Backends:
  math       explicit softmax in the input dtype (fp64 reference, any device)
  sdpa       PyTorch fused kernel with log-sum-exp (CPU flash / CUDA efficient)
  flash_attn flash-attn 2 (optional extra ``gpu``)
  xformers   xformers memory-efficient attention (optional extra ``gpu``)
  auto       math for fp64, else flash_attn > xformers > sdpa where available
"""
from __future__ import annotations

import importlib.util
import math

import torch

BACKENDS = ("auto", "math", "sdpa", "flash_attn", "xformers")
_MASKED = 1.0e4  # folded mask value: exp(-1e4) underflows to exactly 0 in fp32
_MATH_MAX_ELEMENTS = 1 << 26  # logits elements per math chunk (256 MiB in fp32)


#################################################################################
#                                  Entry Point                                  #
#################################################################################

def attend(q, k, v, key_bias=None, key_mask=None, scale=None, backend="auto"):
    """Softmax attention of q over k/v with optional per-key bias and mask.

    q: [..., Nq, d]; k, v: [..., Nk, d]; key_bias: [..., Nk] (float, may need grad);
    key_mask: [..., Nk] bool, False excludes the key. Leading dims broadcast-free
    (they must match). Returns out [..., Nq, d] in q's dtype and lse [..., Nq]
    (fp32, or fp64 for fp64 input); a row with no key gives out 0 and lse -inf.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    name = resolve_backend(backend, q)
    if k.shape[-2] == 0:
        # nothing to attend: one masked dummy key, so the empty partial takes the same path (and builds the
        # same autograd graph) as any other; context-parallel ranks rely on identical graphs
        k = k.new_zeros(*k.shape[:-2], 1, k.shape[-1])
        v = v.new_zeros(*v.shape[:-2], 1, v.shape[-1])
        key_bias = None if key_bias is None else key_bias.new_zeros(*key_bias.shape[:-1], 1)
        key_mask = torch.zeros(*k.shape[:-1], dtype=torch.bool, device=k.device)
    if name == "math":
        return _attend_math(q, k, v, key_bias, key_mask, scale)
    return _attend_fused(q, k, v, key_bias, key_mask, scale, name)


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The concrete backend ``auto`` stands for on this tensor, or a clear error."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend '{backend}', expected one of {BACKENDS}")
    if backend != "auto":
        if backend in ("flash_attn", "xformers") and not _installed(backend):
            raise ImportError(f"attention backend '{backend}' needs `pip install decmem[gpu]` ({backend} not importable)")
        return backend
    if q.dtype == torch.float64:
        return "math"
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        for name in ("flash_attn", "xformers"):
            if _installed(name):
                return name
    return "sdpa"


def merge_lse(parts):
    """Combine partial attentions [(out_i, lse_i), ...] over disjoint key sets into one.

    out_i: [..., N, d], lse_i: [..., N]. Empty partials (lse = -inf) contribute
    nothing; if all are empty the result is (0, -inf) with finite gradients.
    """
    outs = [p[0] for p in parts]
    lses = torch.stack([p[1] for p in parts], dim=0)        # [P, ..., N]
    lse, finite = _safe_logsumexp(lses)                     # [..., N]
    lse_safe = torch.where(finite, lse, torch.zeros_like(lse))
    w = torch.exp(lses - lse_safe.unsqueeze(0))              # [P, ..., N], exactly 0 for empty parts
    w = torch.where(finite.unsqueeze(0), w, torch.zeros_like(w))
    out = sum(o.to(w.dtype) * w[i].unsqueeze(-1) for i, o in enumerate(outs))
    return out.to(outs[0].dtype), lse


def _safe_logsumexp(x):
    """logsumexp over dim 0 whose gradient stays finite when every entry is -inf."""
    m = x.amax(dim=0).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m.unsqueeze(0)).sum(dim=0)
    finite = s > 0
    lse = m + torch.log(torch.where(finite, s, torch.ones_like(s)))
    return torch.where(finite, lse, torch.full_like(lse, -math.inf)), finite


def softmax_entropy_parts(parts):
    """Entropy of the joint softmax from per-part (lse_i, E_i), E_i = expected logit under part i."""
    lses = torch.stack([p[0] for p in parts])
    exps = torch.stack([p[1] for p in parts])
    lse, _ = _safe_logsumexp(lses)
    w = torch.exp(lses - lse.unsqueeze(0)).nan_to_num(0.0)
    return lse - (w * exps.nan_to_num(0.0)).sum(0)


#################################################################################
#                                   Backends                                    #
#################################################################################

def _attend_math(q, k, v, key_bias, key_mask, scale, need_expected_logit=False):
    """Explicit softmax, chunked over queries so the logits stay bounded under no_grad."""
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qw, kw, vw = q.to(work), k.to(work), v.to(work)
    bias = None
    if key_bias is not None:
        bias = key_bias.to(work).unsqueeze(-2)                                  # [..., 1, Nk]
    if key_mask is not None:
        neg = torch.zeros(key_mask.shape, dtype=work, device=q.device).masked_fill(~key_mask, -math.inf)
        bias = neg.unsqueeze(-2) if bias is None else bias + neg.unsqueeze(-2)
    nq, nk = q.shape[-2], k.shape[-2]
    lead = max(1, math.prod(q.shape[:-2]))
    step = max(1, _MATH_MAX_ELEMENTS // max(1, lead * nk)) if not torch.is_grad_enabled() else nq
    outs, lses, exps = [], [], []
    for s in range(0, nq, step):
        logits = (qw[..., s:s + step, :] * scale) @ kw.transpose(-1, -2)       # [..., nq', Nk]
        if bias is not None:
            logits = logits + bias
        m = logits.amax(dim=-1, keepdim=True).detach()
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(logits - m)                                               # masked keys -> 0
        z = p.sum(dim=-1, keepdim=True)
        empty = z == 0
        z_safe = torch.where(empty, torch.ones_like(z), z)
        probs = p / z_safe
        outs.append(probs @ vw)                                                 # [..., nq', d]
        lses.append(torch.where(empty, torch.full_like(z, -math.inf), m + torch.log(z_safe)).squeeze(-1))
        if need_expected_logit:
            exps.append((probs * torch.where(p > 0, logits, torch.zeros_like(logits))).sum(-1))
    out = torch.cat(outs, dim=-2).to(q.dtype)
    lse = torch.cat(lses, dim=-1).to(_lse_dtype(q))
    if need_expected_logit:
        return out, lse, torch.cat(exps, dim=-1).to(_lse_dtype(q))
    return out, lse


def expected_logit(q, k, key_bias=None, key_mask=None, scale=None):
    """(lse, E[logit]) per query, for attention-entropy diagnostics (no grad)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if k.shape[-2] == 0:
        full = torch.full(q.shape[:-1], -math.inf, dtype=_lse_dtype(q), device=q.device)
        return full, torch.zeros_like(full)
    with torch.no_grad():
        _, lse, e = _attend_math(q, k, k[..., :1], key_bias, key_mask, scale, need_expected_logit=True)
    return lse, e


def mass_split(q, k, lse, key_bias=None, key_mask=None, low=0.02, high=0.05, scale=None):
    """Attention mass on weak and strong keys (the paper's dispersion measure), no grad.

    With weights p = exp(logit - lse) (lse [..., Nq]: the log-normaliser of the *whole* softmax these keys
    are part of), returns per query (sum of p < low, sum of p > high), fp32 / fp64.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    work = _lse_dtype(q)
    if k.shape[-2] == 0:
        z = torch.zeros(q.shape[:-1], dtype=work, device=q.device)
        return z, z.clone()
    nq, nk = q.shape[-2], k.shape[-2]
    step = max(1, _MATH_MAX_ELEMENTS // max(1, max(1, math.prod(q.shape[:-2])) * nk))
    lows, highs = [], []
    with torch.no_grad():
        kw = k.to(work)
        for s in range(0, nq, step):
            logits = (q[..., s:s + step, :].to(work) * scale) @ kw.transpose(-1, -2)            # [..., nq', Nk]
            if key_bias is not None:
                logits = logits + key_bias.to(work).unsqueeze(-2)
            p = torch.exp(logits - lse[..., s:s + step, None].to(work))
            if key_mask is not None:
                p = p * key_mask.unsqueeze(-2)
            lows.append((p * (p < low)).sum(-1))
            highs.append((p * (p > high)).sum(-1))
    return torch.cat(lows, -1), torch.cat(highs, -1)


def _attend_fused(q, k, v, key_bias, key_mask, scale, name):
    """Fused kernels: flatten leading dims, fold bias/mask into one extra key feature."""
    lead, nq, d = q.shape[:-2], q.shape[-2], q.shape[-1]
    nk, dv = k.shape[-2], v.shape[-1]
    n = max(1, math.prod(lead))
    qf, kf, vf = q.reshape(n, nq, d), k.reshape(n, nk, d), v.reshape(n, nk, dv)
    col = torch.zeros(n, nk, dtype=q.dtype, device=q.device)
    empty = None
    if key_bias is not None:
        col = col + key_bias.reshape(n, nk).to(q.dtype)
    if key_mask is not None:
        mask = key_mask.reshape(n, nk)
        col = col.masked_fill(~mask, -_MASKED)
        empty = ~mask.any(dim=-1)                                               # [n]
    e = max(d, dv) + 1                                                          # one free column for bias / lse grad
    qf = torch.cat([qf, qf.new_ones(n, nq, 1), qf.new_zeros(n, nq, e - d - 1)], dim=-1)                 # [n, Nq, e]
    kf = torch.cat([kf, (col / scale).unsqueeze(-1), kf.new_zeros(n, nk, e - d - 1)], dim=-1)           # [n, Nk, e]
    vf = torch.nn.functional.pad(vf, (0, e - dv))                               # [n, Nk, e], last column 0
    out, lse = _FusedAttention.apply(qf, kf, vf, scale, name)
    out, lse = out[..., :dv], lse.to(_lse_dtype(q))
    if empty is not None:   # unconditionally: a data-dependent branch would make ranks' graphs differ
        # rows with every key masked: the kernel averaged -1e4-logit keys; report "no key" instead
        out = torch.where(empty[:, None, None], torch.zeros_like(out), out)
        lse = torch.where(empty[:, None], torch.full_like(lse, -math.inf), lse)
    return out.reshape(*lead, nq, dv), lse.reshape(*lead, nq)


class _FusedAttention(torch.autograd.Function):
    """A fused forward whose backward also differentiates the returned log-sum-exp.

    PyTorch's fused kernels return lse without a gradient, but the LSE merge
    needs one. With dS = P * (dO V^T - D + g_lse), D = rowsum(dO * O), the lse
    gradient enters through V's zero last column: give that column dO = g_lse
    and claim O = -1 there, and the kernel's own backward computes the rest.
    Devices without that backward recompute it exactly in chunks.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, name):                                    # [n, N, e] each, v[..., -1] == 0
        if name == "sdpa":
            out, lse = _sdpa_lse(q, k, v, scale)
        elif name == "flash_attn":
            out, lse = _flash_attn_lse(q, k, v, scale)
        else:
            out, lse = _xformers_lse(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, g_out, g_lse):
        q, k, v, out, lse = ctx.saved_tensors
        g_out = torch.zeros_like(out) if g_out is None else g_out
        g_lse = torch.zeros_like(lse) if g_lse is None else g_lse
        if q.device.type == "cpu":
            g = g_out.clone()
            g[..., -1] = g_lse.to(g.dtype)
            o = out.clone()
            o[..., -1] = -1.0
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                g.unsqueeze(1), q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), o.unsqueeze(1), lse.unsqueeze(1),
                0.0, False, scale=ctx.scale)
            return dq.squeeze(1), dk.squeeze(1), dv.squeeze(1), None, None
        return (*_recompute_backward(q, k, v, out, lse, g_out, g_lse, ctx.scale), None, None)


def _recompute_backward(q, k, v, out, lse, g_out, g_lse, scale):
    """Exact attention backward from saved (out, lse), chunked over queries."""
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32 if k.dtype != torch.float64 else k.dtype, device=k.device)
    dv = torch.zeros_like(dk)
    n, nq, nk = q.shape[0], q.shape[1], k.shape[1]
    step = max(1, _MATH_MAX_ELEMENTS // max(1, n * nk))
    w = dk.dtype
    for s in range(0, nq, step):
        qs, gs = q[:, s:s + step].to(w), g_out[:, s:s + step].to(w)
        p = torch.exp((qs * scale) @ k.to(w).transpose(-1, -2) - lse[:, s:s + step, None].to(w))  # [n, nq', Nk]
        dsoft = gs @ v.to(w).transpose(-1, -2)
        D = (gs * out[:, s:s + step].to(w)).sum(-1, keepdim=True) - g_lse[:, s:s + step, None].to(w)
        ds = p * (dsoft - D)
        dq[:, s:s + step] = ((ds @ k.to(w)) * scale).to(q.dtype)
        dk += (ds.transpose(-1, -2) @ qs) * scale
        dv += p.transpose(-1, -2) @ gs
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _sdpa_lse(q, k, v, scale):
    """[n, N, e] -> (out, lse) through PyTorch's fused kernels that also return lse."""
    q4, k4, v4 = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)                 # [n, 1, N, e]
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q4, k4, v4, 0.0, False, scale=scale)
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q4, k4, v4, None, True, 0.0, False, scale=scale)[:2]
        lse = lse[..., : q.shape[1]]                                            # lse may be padded
    return out.squeeze(1), lse.squeeze(1)


def _flash_attn_lse(q, k, v, scale):
    from flash_attn import flash_attn_func

    e = q.shape[-1]
    pad = (-e) % 8                                                              # flash-attn needs head dim % 8 == 0
    if pad:
        q, k, v = (torch.nn.functional.pad(t, (0, pad)) for t in (q, k, v))
    out, lse, _ = flash_attn_func(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2),
                                  softmax_scale=scale, return_attn_probs=True)   # [n, N, 1, e'], [n, 1, N]
    return out[:, :, 0, :e], lse[:, 0]


def _xformers_lse(q, k, v, scale):
    from xformers.ops.fmha import memory_efficient_attention_partial

    out, lse = memory_efficient_attention_partial(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), scale=scale)
    return out[:, :, 0], lse[:, 0]


#################################################################################
#                                    Helpers                                    #
#################################################################################

def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None

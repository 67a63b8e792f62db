"""Bandwidth of each memory-bound kernel (SwiGLU, GeGLU, RMSNorm, RoPE, cross-entropy) as a fraction of the measured device-to-device copy bandwidth,
beside the eager PyTorch expression, medians of repeated runs (CUDA events).

    python benches/kernels.py --out results/kernels.jsonl

Prints a table; appends one JSON line per row to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _gpu_timing import copy_bandwidth_gbs, gpu_bench_args, median_ms  # noqa: E402

from rslora_fast.bench import append_jsonl  # noqa: E402
from rslora_fast.ops.swiglu import swiglu_bwd, swiglu_fwd  # noqa: E402


def eager_swiglu_bwd(dh, g, u):
    s = torch.sigmoid(g)
    return dh * u * s * (1 + g * (1 - s)), dh * g * s


def swiglu_rows(n: int, dtype: torch.dtype) -> list:
    g = torch.randn(n, device="cuda", dtype=dtype)
    u = torch.randn(n, device="cuda", dtype=dtype)
    dh = torch.randn(n, device="cuda", dtype=dtype)
    size = g.element_size()
    cases = [
        ("swiglu fwd", 3 * n * size, lambda: swiglu_fwd(g, u), lambda: F.silu(g) * u),
        ("swiglu bwd", 5 * n * size, lambda: swiglu_bwd(dh, g, u), lambda: eager_swiglu_bwd(dh, g, u)),
    ]
    return cases


def geglu_rows(n: int, dtype: torch.dtype) -> list:
    from rslora_fast.ops.geglu import geglu_bwd, geglu_fwd

    g = torch.randn(n, device="cuda", dtype=dtype)
    u = torch.randn(n, device="cuda", dtype=dtype)
    dh = torch.randn(n, device="cuda", dtype=dtype)
    size = g.element_size()

    g_leaf = g.detach().requires_grad_()  # same storage; g itself stays a plain tensor for our op

    def eager_bwd():
        gf = g_leaf
        h = F.gelu(gf, approximate="tanh") * u
        return torch.autograd.grad(h, gf, dh)

    return [
        (
            "geglu(tanh) fwd",
            3 * n * size,
            lambda: geglu_fwd(g, u, "tanh"),
            lambda: F.gelu(g, approximate="tanh") * u,
        ),
        ("geglu(tanh) bwd", 5 * n * size, lambda: geglu_bwd(dh, g, u, "tanh"), eager_bwd),
    ]


def rms_norm_rows(n: int, dtype: torch.dtype, hidden: int = 4096) -> list:
    """Forward, backward with dw (the op: kernel, partial sum, cast) and the dx-only backward that a
    frozen weight takes."""
    from rslora_fast.ops.rms_norm import rms_norm_bwd, rms_norm_bwd_dx, rms_norm_fwd

    x = torch.randn(n // hidden, hidden, device="cuda", dtype=dtype)
    w = torch.randn(hidden, device="cuda", dtype=dtype)

    def eager():  # transformers' LlamaRMSNorm
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)

    dy = torch.randn_like(x)
    _y, rstd = rms_norm_fwd(x, w, 1e-6, False)
    x_leaf = x.detach().requires_grad_()
    w_leaf = w.detach().requires_grad_()

    def eager_bwd(weight):  # autograd through the same expression
        def run():
            xf = x_leaf.float()
            y = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
            return torch.autograd.grad(y, [x_leaf, weight] if weight.requires_grad else [x_leaf], dy)

        return run

    size = x.numel() * x.element_size()
    # fwd: read x, write y; bwd: read dy and x, write dx (the fp32 rstd per row and dw are negligible)
    name = f"rows of {hidden}"
    return [
        (f"rms_norm fwd ({name})", 2 * size, lambda: rms_norm_fwd(x, w, 1e-6, False), eager),
        (
            f"rms_norm bwd ({name})",
            3 * size,
            lambda: rms_norm_bwd(dy, x, w, rstd, False),
            eager_bwd(w_leaf),
        ),
        (
            f"rms_norm bwd dx only ({name})",
            3 * size,
            lambda: rms_norm_bwd_dx(dy, x, w, rstd, False),
            eager_bwd(w),
        ),
    ]


def rope_rows(dtype: torch.dtype, batch: int = 2, seq: int = 4096) -> list:
    """q/k of Llama-3-8B attention (32 q heads, 8 kv heads, head_dim 128) as the transposed views of
    the projection outputs that the attention forward rotates. q/k keep being rotated in place
    between runs (bandwidth does not depend on the values)."""
    from rslora_fast.ops.rope import rope_, rotate_half

    q = torch.randn(batch, seq, 32, 128, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(batch, seq, 8, 128, device="cuda", dtype=dtype).transpose(1, 2)
    ang = torch.rand(1, seq, 128, device="cuda") * 6.3
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)

    def eager():  # transformers' apply_rotary_pos_emb (out of place)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s

    # read and write q and k, read cos and sin
    nbytes = 2 * (q.numel() + k.numel()) * q.element_size() + 2 * cos.numel() * cos.element_size()
    return [(f"rope q+k ({batch} x {seq}, 32/8 heads)", nbytes, lambda: rope_(q, k, cos, sin), eager)]


def cross_entropy_rows(dtype: torch.dtype, tokens: int = 4096, vocab: int = 128256) -> list:
    """Llama-3 logits ``[4096, 128256]`` in chunks as ``ops/fused_ce.py`` splits them; forward reads each
    chunk once, the in-place backward reads and writes it. Eager: the float32 upcast expressions."""
    from rslora_fast.ops.cross_entropy import cross_entropy_bwd_, cross_entropy_fwd
    from rslora_fast.ops.fused_ce import default_chunk_tokens

    chunk = default_chunk_tokens(vocab)
    logits = (torch.randn(tokens, vocab, device="cuda") * 2).to(dtype)
    t = torch.randint(0, vocab, (tokens,), device="cuda")
    t[::7] = -100
    valid = t != -100
    safe_t = torch.where(valid, t, 0)
    lse, _ = cross_entropy_fwd(logits, t)
    scale = valid.float() / valid.sum()
    spans = [(s, min(tokens, s + chunk)) for s in range(0, tokens, chunk)]

    def ours_fwd():
        return [cross_entropy_fwd(logits[s:e], t[s:e]) for s, e in spans]

    def eager_fwd():  # fused_ce's former chunk body
        out = []
        for s, e in spans:
            lf = logits[s:e].float()
            lse_c = torch.logsumexp(lf, dim=-1)
            out.append((lse_c - lf.gather(1, safe_t[s:e, None]).squeeze(1)) * valid[s:e])
        return out

    work = logits.clone()  # the backward overwrites its buffer; values stay in [-1, 1] after the first call

    def ours_bwd():
        for s, e in spans:
            cross_entropy_bwd_(work[s:e], lse[s:e], t[s:e], scale[s:e])

    def eager_bwd():  # fused_ce's former backward chain, ending in the dtype the next matmul reads
        out = []
        for s, e in spans:
            p = torch.exp(logits[s:e].float() - lse[s:e, None])
            p.scatter_add_(1, safe_t[s:e, None], torch.full((e - s, 1), -1.0, device=p.device))
            p *= scale[s:e, None]
            out.append(p.to(dtype))
        return out

    size = logits.numel() * logits.element_size()
    name = f"cross_entropy [{tokens}, {vocab}] in chunks of {chunk}"
    return [(f"{name} fwd", size, ours_fwd, eager_fwd), (f"{name} bwd", 2 * size, ours_bwd, eager_bwd)]


# ---- residual add + RMSNorm (added by the fusions work; one function and one line in main) ----
def add_rms_norm_rows(n: int, dtype: torch.dtype, hidden: int = 4096) -> list:
    """The decoder layer's post-attention ``s = x + residual; y = norm(s)``: forward reads x and
    the residual and writes s and y; the frozen-weight backward reads dy, ds and s and writes the
    addends' gradient. Eager: the add and transformers' LlamaRMSNorm expression (autograd for bwd)."""
    from rslora_fast.ops.rms_norm import add_rms_norm_bwd_dx, add_rms_norm_fwd

    x = torch.randn(n // hidden, hidden, device="cuda", dtype=dtype)
    r, dy, ds = torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    s, _y, rstd = add_rms_norm_fwd(x, r, w, 1e-6, False)
    x_leaf = x.detach().requires_grad_()

    def eager_sum_norm(xx):
        sf = (xx + r).float()
        return xx + r, w * (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)

    def eager_bwd():
        s_e, y_e = eager_sum_norm(x_leaf)
        return torch.autograd.grad([s_e, y_e], [x_leaf], [ds, dy])

    size = x.numel() * x.element_size()
    name = f"rows of {hidden}"
    return [
        (
            f"add_rms_norm fwd ({name})",
            4 * size,
            lambda: add_rms_norm_fwd(x, r, w, 1e-6, False),
            lambda: eager_sum_norm(x),
        ),
        (
            f"add_rms_norm bwd dx ({name})",
            4 * size,
            lambda: add_rms_norm_bwd_dx(dy, ds, s, w, rstd, False),
            eager_bwd,
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=64 * 1024 * 1024)
    args = gpu_bench_args(
        parser,
        "benches/kernels.py",
        repeat=30,
        out="results/kernels.jsonl",
        only_help="time only the kernels whose name contains this",
    )
    if args is None:
        return 1
    copy = copy_bandwidth_gbs()
    gpu = torch.cuda.get_device_name()
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        cases = swiglu_rows(args.elements, dtype) + geglu_rows(args.elements, dtype)
        cases += rms_norm_rows(args.elements, dtype) + rope_rows(dtype)
        cases += cross_entropy_rows(dtype)
        cases += add_rms_norm_rows(args.elements, dtype)  # fusions
        for name, nbytes, ours, eager in cases:
            if args.only not in name:
                continue
            ours_ms, ours_spread = median_ms(ours, repeat=args.repeat)
            eager_ms, _ = median_ms(eager, repeat=args.repeat)
            gbs = nbytes / (ours_ms * 1e-3) / 1e9
            rows.append(
                {
                    "kernel": name,
                    "dtype": str(dtype).removeprefix("torch."),
                    "elements": args.elements,
                    "ours_ms": round(ours_ms, 4),
                    "ours_spread_ms": round(ours_spread, 4),
                    "eager_ms": round(eager_ms, 4),
                    "ours_GBps": round(gbs, 1),
                    "pct_of_copy": round(100 * gbs / copy, 1),
                    "speedup_vs_eager": round(eager_ms / ours_ms, 2),
                    "copy_GBps": round(copy, 1),
                    "gpu": gpu,
                    "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d"),
                }
            )
    append_jsonl(args.out, rows)
    print(f"{gpu}; device-to-device copy {copy:.0f} GB/s (read + write); {args.elements:,} elements")
    print("| kernel | dtype | ours (ms) | GB/s | % of copy | eager (ms) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['kernel']} | {r['dtype']} | {r['ours_ms']:.3f} | {r['ours_GBps']:.0f} | {r['pct_of_copy']:.1f}% "
            f"| {r['eager_ms']:.3f} | {r['speedup_vs_eager']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

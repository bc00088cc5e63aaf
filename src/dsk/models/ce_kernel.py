"""Cross-entropy loss and its logits gradient in one Triton kernel (the fused LM head's core).

For each row of logits ``x`` [N, V] with target ``t``: ``loss = logsumexp(x) - x[t]`` and
``grad = (softmax(x) - onehot(t)) * scale`` (``scale`` = 1 / scored rows; 0 on ignored rows).
One program handles one row (100 KB in bf16 at GPT-2's vocabulary). Two kernels:

* ``cross_entropy_rows`` (two sweeps): a first sweep finds the running max and sum of
  exponentials, a second writes the gradient, re-reading the row; L2 eviction hints keep the
  row cached between them where they can. 2.8 ms on an H100 at batch 32 x 1024 (bf16 logits
  [32768, 50304]; 3.1 ms without the hints).
* ``cross_entropy_rows_onepass``: shifts each row by its target's logit, which is known before
  the sweep, so it needs no running max: one read and one write, and the gradient comes back
  as ``r[:, None] * p`` with one factor per row that the caller applies to the GEMMs' N x D
  sides. 2.06 ms, at the floor (a copy of the same bytes: 2.18 ms). The compiled PyTorch
  expression took 4.7 ms (docs/performance.md).

    >>> from dsk.models.ce_kernel import cross_entropy_rows, cross_entropy_rows_onepass, available
    >>> loss_rows, grad = cross_entropy_rows(logits, targets, inv_count, ignore_index=-100)
    >>> loss_rows, p, r = cross_entropy_rows_onepass(logits, targets, inv_count, ignore_index=-100)

``available(t)`` is False on CPU or without Triton; callers keep a PyTorch path for that
(``dsk.models.model._HeadCrossEntropy``), and tests/test_gpu_paths.py compares the two.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


# (BLOCK, warps, LANES, REVERSE, EVICT), chosen per vocabulary size on the first call (triton.autotune).
# LANES: sweep 1 keeps a running max and sum per lane (no block-wide reduction, so no barrier,
# inside the loop); REVERSE: sweep 2 walks the row backwards, reading first the chunks read
# last, the likeliest to be still in L2. Measured on an H100 in docs/performance.md.
# EVICT: sweep 1 loads with evict_last, sweep 2 and the gradient's stores with evict_first, so the row
# is likelier still in L2 for sweep 2 (3.12 -> 2.79 ms on an H100, docs/performance.md).
CONFIGS = ((4096, 8, 1, 1, 1), (8192, 16, 1, 1, 1), (8192, 16, 1, 1, 0), (4096, 8, 1, 1, 0))

# (BLOCK, warps, EVICT) of the one-pass kernel, autotuned likewise; LIMIT: see _ce_onepass
ONEPASS_CONFIGS = ((4096, 8, 1), (8192, 16, 1), (4096, 8, 0), (8192, 16, 0))
ONEPASS_LIMIT = 30.0

if triton is not None:

    @triton.jit
    def _ce_rows(x_ptr, g_ptr, t_ptr, loss_ptr, scale_ptr, stride_x, stride_g, V, ignore_index,
                 BLOCK: tl.constexpr, LANES: tl.constexpr, REVERSE: tl.constexpr, EVICT: tl.constexpr = 0):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        g_row = g_ptr + row * stride_g
        t = tl.load(t_ptr + row)
        # sweep 1: the row's max and sum of exp(x - max)
        if LANES:
            m = tl.full((BLOCK,), float("-inf"), tl.float32)
            s = tl.zeros((BLOCK,), tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                # EVICT: keep the row in L2 for sweep 2 (evict_last), stream sweep 2 and the gradient through it
                x = tl.load(x_row + cols, mask=cols < V, other=float("-inf"),
                            eviction_policy="evict_last" if EVICT else "").to(tl.float32)
                # one exp per element: of the two factors exp(m - new) and exp(x - new), one is 1;
                # lanes that have seen only padding (-inf) keep s = 0
                m_new = tl.maximum(m, x)
                e = tl.exp(tl.where(m_new == float("-inf"), float("-inf"), -tl.abs(x - m)))
                s = tl.where(x > m, s * e + 1.0, s + e)
                m = m_new
            m_row = tl.max(m, 0)
            lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
        else:
            # one scalar pair per chunk (every chunk has a real column, so the max is finite)
            m_row = tl.full((), float("-inf"), tl.float32)
            s_row = tl.zeros((), tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m_row, tl.max(x, 0))
                s_row = s_row * tl.exp(m_row - m_new) + tl.sum(tl.exp(x - m_new), 0)
                m_row = m_new
            lse = m_row + tl.log(s_row)
        valid = t != ignore_index
        # a target outside [0, V) reads nothing and makes the loss NaN (loud, like PyTorch's index error)
        known = (t >= 0) & (t < V)
        x_t = tl.load(x_row + tl.where(valid & known, t, 0), mask=known | ~valid, other=float("nan")).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - x_t, 0.0))
        scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        # sweep 2: the gradient, reading the row again (from L2 where it is still there)
        n_chunks = tl.cdiv(V, BLOCK)
        for i in range(0, n_chunks):
            start = ((n_chunks - 1 - i) if REVERSE else i) * BLOCK
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            x = tl.load(x_row + cols, mask=mask, other=0.0,
                        eviction_policy="evict_first" if EVICT else "").to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)) * scale
            tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=mask,
                     eviction_policy="evict_first" if EVICT else "")

    _ce_rows_kernel = triton.autotune(
        configs=[triton.Config({"BLOCK": b, "LANES": lanes, "REVERSE": rev, "EVICT": ev}, num_warps=w)
                 for b, w, lanes, rev, ev in CONFIGS],
        key=["V"],
    )(_ce_rows)


    @triton.jit
    def _ce_onepass(x_ptr, p_ptr, t_ptr, loss_ptr, r_ptr, scale_ptr, stride_x, stride_p, V, ignore_index,
                    LIMIT: tl.constexpr, BLOCK: tl.constexpr, EVICT: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        p_row = p_ptr + row * stride_p
        t = tl.load(t_ptr + row)
        valid = t != ignore_index
        known = (t >= 0) & (t < V)
        if valid:
            # shift by the target's logit, known before the sweep: exp(x - x_t) needs no running max,
            # so each element is read once and written once (softmax up to the row factor r)
            x_t = tl.load(x_row + tl.where(known, t, 0), mask=known, other=float("nan")).to(tl.float32)
            s = tl.zeros((BLOCK,), tl.float32)
            mx = tl.full((BLOCK,), float("-inf"), tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < V
                x = tl.load(x_row + cols, mask=mask, other=float("-inf"),
                            eviction_policy="evict_first" if EVICT else "").to(tl.float32)
                e = tl.exp(x - x_t)
                s += e
                mx = tl.maximum(mx, x)
                # the target's column is overwritten below, after a barrier (a mask per column here
                # would break the 16-byte vector stores: measured 2x slower)
                tl.store(p_row + cols, e.to(p_ptr.dtype.element_ty), mask=mask,
                         eviction_policy="evict_first" if EVICT else "")
            shift = x_t
            total = tl.sum(s, 0)
            m = tl.max(mx, 0)
            if m - x_t > LIMIT:
                # the target is far below the row's max (loss > LIMIT): e^(x - x_t) could overflow,
                # and the factor r underflow; redo the row shifted by its max (exact, and rare)
                s = tl.zeros((BLOCK,), tl.float32)
                for start in range(0, V, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < V
                    x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                    e = tl.exp(x - m)
                    s += e
                    tl.store(p_row + cols, e.to(p_ptr.dtype.element_ty), mask=mask)
                shift = m
                total = tl.sum(s, 0)
            scale = tl.load(scale_ptr)
            tl.store(loss_ptr + row, shift + tl.log(total) - x_t)
            # gradient = r * p: softmax - onehot = (e - [col == t] * total) / total
            tl.store(r_ptr + row, scale / total)
            e_t = tl.exp(x_t - shift)
            # every thread's stores of the row are done and visible before the target's column is rewritten
            tl.debug_barrier()
            tl.store(p_row + tl.where(known, t, 0), (e_t - total).to(p_ptr.dtype.element_ty), mask=known)
        else:
            # an ignored row: zero gradient; written (not skipped) because the GEMMs read every row
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                tl.store(p_row + cols, tl.zeros((BLOCK,), p_ptr.dtype.element_ty), mask=cols < V)
            tl.store(loss_ptr + row, 0.0)
            tl.store(r_ptr + row, 0.0)

    _ce_onepass_kernel = triton.autotune(
        configs=[triton.Config({"BLOCK": b, "EVICT": ev}, num_warps=w) for b, w, ev in ONEPASS_CONFIGS],
        key=["V"],
    )(_ce_onepass)


@torch.library.custom_op("dsk::cross_entropy_rows", mutates_args=())
def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                       ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss [N] fp32, gradient [N, V] in the logits' dtype) of ``logits`` [N, V].

    ``scale`` is a one-element fp32 tensor (1 / scored rows) so the caller needs no host sync;
    ignored rows get loss 0 and gradient 0; a target outside [0, V) gets a NaN loss. A custom op:
    torch.compile calls it as it is.
    """
    N, V = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    grad = torch.empty_like(logits)
    if N:
        _ce_rows_kernel[(N,)](logits, grad, targets.contiguous(), loss, scale.float().contiguous(),
                              logits.stride(0), grad.stride(0), V, ignore_index)
    return loss, grad


@cross_entropy_rows.register_fake
def _(logits, targets, scale, ignore_index):
    return logits.new_empty(logits.shape[0], dtype=torch.float32), torch.empty_like(logits)


@torch.library.custom_op("dsk::cross_entropy_rows_onepass", mutates_args=())
def cross_entropy_rows_onepass(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                               ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row loss [N] fp32, ``p`` [N, V] in the logits' dtype, ``r`` [N] fp32) of ``logits`` [N, V]
    with d loss / d logits = ``r[:, None] * p``: one read of the logits and one write, no second sweep.

    ``p = exp(x - x_t)`` (shifted by the row's target logit, which is known before the sweep, so no
    running max and no rescaling pass), ``p[t] = 1 - sum``, ``r = scale / sum``; the caller applies ``r``
    to the GEMMs' N x D operands or results (``dsk.models.model._HeadCrossEntropy``). A row whose target
    logit is more than ``ONEPASS_LIMIT`` below its max (loss > 30: e^x could overflow) is redone shifted by
    the max. Ignored rows: loss 0, ``p`` 0, ``r`` 0; a target outside [0, V): NaN loss.
    """
    N, V = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    r = torch.empty(N, device=logits.device, dtype=torch.float32)
    p = torch.empty_like(logits)
    if N:
        _ce_onepass_kernel[(N,)](logits, p, targets.contiguous(), loss, r, scale.float().contiguous(),
                                 logits.stride(0), p.stride(0), V, ignore_index, LIMIT=ONEPASS_LIMIT)
    return loss, p, r


@cross_entropy_rows_onepass.register_fake
def _(logits, targets, scale, ignore_index):
    n = logits.shape[0]
    return (logits.new_empty(n, dtype=torch.float32), torch.empty_like(logits),
            logits.new_empty(n, dtype=torch.float32))

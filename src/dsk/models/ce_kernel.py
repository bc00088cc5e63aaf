"""Cross-entropy loss and its logits gradient in one Triton kernel (the fused LM head's core).

For each row of logits ``x`` [N, V] with target ``t``: ``loss = logsumexp(x) - x[t]`` and
``grad = (softmax(x) - onehot(t)) * scale`` (``scale`` = 1 / scored rows; 0 on ignored rows).
One program handles one row: a first sweep finds the running max and sum of exponentials,
a second writes the gradient. The row (100 KB in bf16 at GPT-2's vocabulary) is read a
second time while still in L2, so device memory sees about one read and one write of the
logits, where the compiled PyTorch expression read them twice from memory
(docs/performance.md: 4.4 ms a step at batch 32 x 1024 on an H100).

    >>> from dsk.models.ce_kernel import cross_entropy_rows, available
    >>> loss_rows, grad = cross_entropy_rows(logits, targets, inv_count, ignore_index=-100)

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


# (BLOCK, warps, programs per SM; 0 = one program per row). Few rows in flight keep each row in
# L2 between its two sweeps (a row is 100 KB at GPT-2's vocabulary, L2 is 50 MB on an H100)
CONFIGS = ((4096, 8, 0), (8192, 16, 0), (16384, 32, 0), (8192, 8, 2), (8192, 16, 1), (16384, 16, 1), (4096, 8, 4))

if triton is not None:

    @triton.jit
    def _ce_rows(x_ptr, g_ptr, t_ptr, loss_ptr, scale_ptr, stride_x, stride_g, N, V, ignore_index,
                 BLOCK: tl.constexpr, PER_SM: tl.constexpr):
        for row in range(tl.program_id(0), N, tl.num_programs(0)):
            row64 = tl.full((), 0, tl.int64) + row  # offsets past 2^31 elements
            x_row = x_ptr + row64 * stride_x
            g_row = g_ptr + row64 * stride_g
            t = tl.load(t_ptr + row)
            # sweep 1: running max and sum of exp(x - max), one scalar pair per chunk (every
            # chunk has at least one real column, so the max is finite and no lane sees inf - inf)
            m = tl.full((), float("-inf"), tl.float32)
            s = tl.zeros((), tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, 0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
                m = m_new
            lse = m + tl.log(s)
            valid = t != ignore_index
            x_t = tl.load(x_row + tl.where(valid, t, 0)).to(tl.float32)
            tl.store(loss_ptr + row, tl.where(valid, lse - x_t, 0.0))
            scale = tl.where(valid, tl.load(scale_ptr), 0.0)
            # sweep 2: the gradient, reading the row again (from L2)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < V
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                g = (tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)) * scale
                tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=mask)

    _ce_rows_kernel = triton.autotune(
        configs=[triton.Config({"BLOCK": b, "PER_SM": p}, num_warps=w) for b, w, p in CONFIGS], key=["V"],
    )(_ce_rows)


def grid_of(n_rows: int, per_sm: int, device: torch.device) -> int:
    if per_sm == 0:
        return n_rows
    return max(1, min(n_rows, per_sm * torch.cuda.get_device_properties(device).multi_processor_count))


@torch.library.custom_op("dsk::cross_entropy_rows", mutates_args=())
def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                       ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss [N] fp32, gradient [N, V] in the logits' dtype) of ``logits`` [N, V].

    ``scale`` is a one-element fp32 tensor (1 / scored rows) so the caller needs no host sync;
    ignored rows get loss 0 and gradient 0. A custom op: torch.compile calls it as it is.
    """
    N, V = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    grad = torch.empty_like(logits)
    if N:
        _ce_rows_kernel[lambda meta: (grid_of(N, meta["PER_SM"], logits.device),)](
            logits, grad, targets.contiguous(), loss, scale.float().contiguous(), logits.stride(0), grad.stride(0),
            N, V, ignore_index)
    return loss, grad


@cross_entropy_rows.register_fake
def _(logits, targets, scale, ignore_index):
    return logits.new_empty(logits.shape[0], dtype=torch.float32), torch.empty_like(logits)

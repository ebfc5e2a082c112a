"""
DCA's GRN weighted sums as one custom op, with fused Triton kernels on CUDA (dca.py, grn_kernel=True).

    outs[j] = sum_i s_i ⊙ (b[j, i] + r[i, ..., j])          dca.StackSum's contract, the same numbers

Under torch.compile dca.py's sums are plain tensor expressions, and on an H200 inductor made them
cost 1.84x gpt's step at GPT-2 small's shape (results/gpu/h200-2026-11-27). Here a block's sums are
one kernel that reads each stack entry once and writes the n_out sums, and the backward one kernel
that reads each entry and the incoming gradients once and writes each entry's gradient, the gates'
(sums over d) and, per block of rows, b's (sums over the tokens, added up after). Both are
torch.library custom ops with their own autograd, so torch.compile calls them as they are and never
traces into them (torch 2.11's Dynamo got dca.StackSum, an autograd.Function, wrong on CUDA).

Without CUDA the op computes with torch (dca.py's StackSum math); with TRITON_INTERPRET=1 set
before this module is imported, it runs the kernels in Triton's interpreter on the CPU: the tests of
the kernels without a GPU (tests/test_dca_kernels.py).
"""

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (a CPU-only torch): the op computes with torch
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_N, BLOCK_D, NUM_WARPS = 32, 128, 16  # rows (tokens) x columns (features) per program; 8 values a thread


def use_kernels(x):
    return triton is not None and (x.is_cuda or (INTERPRET and x.device.type == "cpu"))


# -----------------------------------------------------------------------------
# the kernels: program (row block, column block) of the (N, D) entries, N = B * T

if triton is not None:
    @triton.jit
    def coefficient(b_ptr, r_ptr, i, j, rows, cols, row_mask, col_mask, N, D, M,
                    N_OUT: tl.constexpr, HAS_GATES: tl.constexpr, B_SCALAR: tl.constexpr, ACC: tl.constexpr):
        """b[j, i] + r[i, rows, j]: (BLOCK_N, BLOCK_D), (1, BLOCK_D) or a scalar."""
        if B_SCALAR:
            c = tl.load(b_ptr + j * M + i).to(ACC)
        else:
            c = tl.load(b_ptr + (j * M + i) * D + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
        if HAS_GATES:
            gate = tl.load(r_ptr + (i * N + rows) * N_OUT + j, mask=row_mask, other=0.0).to(ACC)
            c = c + gate[:, None]
        return c

    @triton.jit
    def add_entry(acc0, acc1, acc2, s, i, b_ptr, r_ptr, rows, cols, row_mask, col_mask, N, D, M,
                  N_OUT: tl.constexpr, HAS_GATES: tl.constexpr, B_SCALAR: tl.constexpr, ACC: tl.constexpr):
        """acc_j += s_i * (b[j, i] + r[i, :, j]) for the N_OUT (at most 3) sums."""
        acc0 += s * coefficient(b_ptr, r_ptr, i, 0, rows, cols, row_mask, col_mask, N, D, M, N_OUT, HAS_GATES, B_SCALAR, ACC)
        if N_OUT > 1:
            acc1 += s * coefficient(b_ptr, r_ptr, i, 1, rows, cols, row_mask, col_mask, N, D, M, N_OUT, HAS_GATES, B_SCALAR, ACC)
        if N_OUT > 2:
            acc2 += s * coefficient(b_ptr, r_ptr, i, 2, rows, cols, row_mask, col_mask, N, D, M, N_OUT, HAS_GATES, B_SCALAR, ACC)
        return acc0, acc1, acc2

    @triton.jit
    def stack_sum_kernel(first_ptr, rest_table, b_ptr, r_ptr, out_ptr, N, D, M,
                         N_OUT: tl.constexpr, HAS_GATES: tl.constexpr, B_SCALAR: tl.constexpr,
                         REST: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[j] = sum_i s_i * (b[j, i] + r[i, :, j]), each entry read once: s_0 (the embedding, or
        the first entry, in its own dtype) from first_ptr, s_1 ... s_{M-1} (dtype REST) from the
        addresses in rest_table."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_mask, col_mask = rows < N, cols < D
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None] * D + cols[None, :]                                    # (BLOCK_N, BLOCK_D)
        acc0 = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
        acc1 = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
        acc2 = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
        s = tl.load(first_ptr + offs, mask=mask, other=0.0).to(ACC)
        acc0, acc1, acc2 = add_entry(acc0, acc1, acc2, s, 0, b_ptr, r_ptr, rows, cols, row_mask, col_mask, N, D, M,
                                     N_OUT, HAS_GATES, B_SCALAR, ACC)
        for i in range(1, M):
            entry = tl.multiple_of(tl.load(rest_table + i - 1).to(tl.pointer_type(REST)), 16)  # 16-byte aligned:
            s = tl.load(entry + offs, mask=mask, other=0.0).to(ACC)                            # vector loads
            acc0, acc1, acc2 = add_entry(acc0, acc1, acc2, s, i, b_ptr, r_ptr, rows, cols, row_mask, col_mask, N, D, M,
                                         N_OUT, HAS_GATES, B_SCALAR, ACC)
        out_ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + offs, acc0.to(out_ty), mask=mask)
        if N_OUT > 1:
            tl.store(out_ptr + N * D + offs, acc1.to(out_ty), mask=mask)
        if N_OUT > 2:
            tl.store(out_ptr + 2 * N * D + offs, acc2.to(out_ty), mask=mask)

    @triton.jit
    def gradient_parts(g, s, i, j, rows, cols, row_mask, col_mask, part_r_ptr, part_b_ptr, N, D, M,
                       N_OUT: tl.constexpr, HAS_GATES: tl.constexpr, B_SCALAR: tl.constexpr):
        """This program's parts of d/dr[i, rows, j] (a sum over its columns) and of d/db[j, i]
        (a sum over its rows), both of g_j * s_i."""
        gs = g * s
        if HAS_GATES:  # part_r: (column blocks, M, N, N_OUT)
            tl.store(part_r_ptr + ((tl.program_id(1) * M + i) * N + rows) * N_OUT + j, tl.sum(gs, axis=1), mask=row_mask)
        if B_SCALAR:   # part_b: (row blocks, N_OUT, M, column blocks)
            tl.store(part_b_ptr + ((tl.program_id(0) * N_OUT + j) * M + i) * tl.num_programs(1) + tl.program_id(1),
                     tl.sum(tl.sum(gs, axis=1), axis=0))
        else:          # part_b: (row blocks, N_OUT, M, D)
            tl.store(part_b_ptr + ((tl.program_id(0) * N_OUT + j) * M + i) * D + cols, tl.sum(gs, axis=0), mask=col_mask)

    @triton.jit
    def entry_gradient(g0, g1, g2, s, i, b_ptr, r_ptr, part_r_ptr, part_b_ptr, rows, cols, row_mask, col_mask, N, D, M,
                       N_OUT: tl.constexpr, HAS_GATES: tl.constexpr, B_SCALAR: tl.constexpr, ACC: tl.constexpr):
        """d/ds_i = sum_j g_j * (b[j, i] + r[i, :, j]); stores the parts of d/dr and d/db on the way."""
        grad = g0 * coefficient(b_ptr, r_ptr, i, 0, rows, cols, row_mask, col_mask, N, D, M, N_OUT, HAS_GATES, B_SCALAR, ACC)
        gradient_parts(g0, s, i, 0, rows, cols, row_mask, col_mask, part_r_ptr, part_b_ptr, N, D, M, N_OUT, HAS_GATES, B_SCALAR)
        if N_OUT > 1:
            grad += g1 * coefficient(b_ptr, r_ptr, i, 1, rows, cols, row_mask, col_mask, N, D, M, N_OUT, HAS_GATES, B_SCALAR, ACC)
            gradient_parts(g1, s, i, 1, rows, cols, row_mask, col_mask, part_r_ptr, part_b_ptr, N, D, M, N_OUT, HAS_GATES, B_SCALAR)
        if N_OUT > 2:
            grad += g2 * coefficient(b_ptr, r_ptr, i, 2, rows, cols, row_mask, col_mask, N, D, M, N_OUT, HAS_GATES, B_SCALAR, ACC)
            gradient_parts(g2, s, i, 2, rows, cols, row_mask, col_mask, part_r_ptr, part_b_ptr, N, D, M, N_OUT, HAS_GATES, B_SCALAR)
        return grad

    @triton.jit
    def stack_sum_backward_kernel(first_ptr, rest_table, grad_first_ptr, grad_rest_table, g_ptr, b_ptr, r_ptr,
                                  part_r_ptr, part_b_ptr, N, D, M,
                                  N_OUT: tl.constexpr, HAS_GATES: tl.constexpr, B_SCALAR: tl.constexpr,
                                  REST: tl.constexpr, ACC: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Each entry's gradient (in its dtype) and the parts of d/dr and d/db; the incoming
        gradients g_j are read once, each entry once."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_mask, col_mask = rows < N, cols < D
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None] * D + cols[None, :]                                    # (BLOCK_N, BLOCK_D)
        g0 = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        g1, g2 = g0, g0
        if N_OUT > 1:
            g1 = tl.load(g_ptr + N * D + offs, mask=mask, other=0.0).to(ACC)
        if N_OUT > 2:
            g2 = tl.load(g_ptr + 2 * N * D + offs, mask=mask, other=0.0).to(ACC)
        s = tl.load(first_ptr + offs, mask=mask, other=0.0).to(ACC)
        grad = entry_gradient(g0, g1, g2, s, 0, b_ptr, r_ptr, part_r_ptr, part_b_ptr, rows, cols, row_mask, col_mask,
                              N, D, M, N_OUT, HAS_GATES, B_SCALAR, ACC)
        tl.store(grad_first_ptr + offs, grad.to(grad_first_ptr.dtype.element_ty), mask=mask)
        for i in range(1, M):
            entry = tl.multiple_of(tl.load(rest_table + i - 1).to(tl.pointer_type(REST)), 16)
            s = tl.load(entry + offs, mask=mask, other=0.0).to(ACC)
            grad = entry_gradient(g0, g1, g2, s, i, b_ptr, r_ptr, part_r_ptr, part_b_ptr, rows, cols, row_mask, col_mask,
                                  N, D, M, N_OUT, HAS_GATES, B_SCALAR, ACC)
            grad_entry = tl.multiple_of(tl.load(grad_rest_table + i - 1).to(tl.pointer_type(REST)), 16)
            tl.store(grad_entry + offs, grad.to(REST), mask=mask)


TRITON_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}


def address_table(tensors, device):
    """The tensors' addresses as one int64 tensor on the device (at least one entry), copied without a
    sync. The kernels take them as 16-byte aligned (vector loads): check_inputs makes sure."""
    assert all(t.data_ptr() % 16 == 0 for t in tensors)
    table = torch.tensor([t.data_ptr() for t in tensors] or [0], dtype=torch.int64)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


def launch(kernel, b, r, stack, *args):
    """kernel over the (N, D) entries of stack: (first entry, the others' addresses, *args, N, D, M)."""
    first, rest = stack[0], stack[1:]
    N, D = first.numel() // first.size(-1), first.size(-1)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(D, BLOCK_D))
    kernel[grid](first, address_table(rest, first.device), *args, N, D, len(stack),
                 N_OUT=b.size(0), HAS_GATES=r is not None, B_SCALAR=b.dim() == 2,
                 REST=getattr(tl, TRITON_DTYPES[(rest or stack)[0].dtype]),
                 ACC=tl.float64 if accumulator_dtype(b, r, stack) == torch.float64 else tl.float32,
                 BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)


def check_inputs(b, r, stack):
    """Contiguous inputs; the entries after the first in one dtype (in DCA they are: the blocks'
    outputs) and 16-byte aligned (a view into a tensor may not be: copied)."""
    n_out, m, D = b.size(0), len(stack), stack[0].size(-1)
    N = stack[0].numel() // D
    if n_out > 3:
        raise ValueError(f"the GRN kernel makes at most 3 sums at once, got {n_out}")
    if 3 * N * D >= 2**31 or triton.cdiv(N, BLOCK_N) * n_out * m * D >= 2**31:  # the kernels index with int32
        raise ValueError(f"the GRN kernel takes at most 2**31 / 3 values an entry and 2**31 partial sums, got "
                         f"{N} x {D} with {m} entries: use a smaller batch, or grn_kernel=false")
    rest_dtype = functools.reduce(torch.promote_types, [s.dtype for s in stack[1:]], stack[-1].dtype)
    rest = [s.to(rest_dtype).contiguous() for s in stack[1:]]
    rest = [s if s.data_ptr() % 16 == 0 else s.clone() for s in rest]
    return b.contiguous(), None if r is None else r.contiguous(), [stack[0].contiguous()] + rest


def accumulator_dtype(b, r, stack):
    """What the kernels sum in (and their partial sums are kept in): float64 if any input is, else float32."""
    return torch.float64 if torch.float64 in (b.dtype, *(s.dtype for s in stack), *(() if r is None else (r.dtype,))) else torch.float32


def out_dtype(b, r, stack):
    dtype = b.dtype if r is None else torch.promote_types(b.dtype, r.dtype)
    for s in stack:
        dtype = torch.promote_types(dtype, s.dtype)
    return dtype


# -----------------------------------------------------------------------------
# the custom ops: what torch.compile sees

@torch.library.custom_op("dca::stack_sum", mutates_args=())
def stack_sum(b: torch.Tensor, r: torch.Tensor | None, stack: list[torch.Tensor]) -> torch.Tensor:
    """(n_out, *entry shape): the n_out weighted sums of the stack."""
    if not use_kernels(stack[0]):
        import dca
        return torch.stack(dca.weighted_sums(b, r, stack)).to(out_dtype(b, r, stack))
    b, r, stack = check_inputs(b, r, stack)
    out = torch.empty(b.size(0), *stack[0].shape, dtype=out_dtype(b, r, stack), device=stack[0].device)
    launch(stack_sum_kernel, b, r, stack, b, r if r is not None else b, out)
    return out


@stack_sum.register_fake
def _(b, r, stack):
    return stack[0].new_empty(b.size(0), *stack[0].shape, dtype=out_dtype(b, r, stack))


@torch.library.custom_op("dca::stack_sum_backward", mutates_args=())
def stack_sum_backward(grad: torch.Tensor, b: torch.Tensor, r: torch.Tensor | None,
                       stack: list[torch.Tensor]) -> list[torch.Tensor]:
    """[d/db, d/dr (empty without gates), d/ds_0, ..., d/ds_{m-1}] from grad = d/d(the sums)."""
    if not use_kernels(stack[0]):
        import dca
        grad_b, grad_r, *grad_stack = dca.weighted_sums_backward(grad.unbind(0), b, r, stack)
        return [grad_b, b.new_empty(0) if grad_r is None else grad_r, *(g.to(s.dtype) for g, s in zip(grad_stack, stack))]
    dtypes = [s.dtype for s in stack]
    b, r, stack = check_inputs(b, r, stack)
    grad = grad.contiguous()
    m, n_out, D = len(stack), b.size(0), stack[0].size(-1)
    N = stack[0].numel() // D
    wide = accumulator_dtype(b, r, stack)
    n_rows, n_cols = triton.cdiv(N, BLOCK_N), triton.cdiv(D, BLOCK_D)
    part_r = torch.empty(n_cols, m, N, n_out, dtype=wide, device=grad.device) if r is not None else grad.new_empty(1, dtype=wide)
    part_b = torch.empty(n_rows, n_out, m, n_cols if b.dim() == 2 else D, dtype=wide, device=grad.device)
    grad_stack = [torch.empty_like(s) for s in stack]
    launch(stack_sum_backward_kernel, b, r, stack, grad_stack[0], address_table(grad_stack[1:], grad.device),
           grad, b, r if r is not None else b, part_r, part_b)
    grad_b = part_b.sum(0)
    grad_b = (grad_b.sum(-1) if b.dim() == 2 else grad_b).to(b.dtype)
    grad_r = part_r.sum(0).view(r.shape).to(r.dtype) if r is not None else b.new_empty(0)
    return [grad_b, grad_r, *(g.to(dtype) for g, dtype in zip(grad_stack, dtypes))]


@stack_sum_backward.register_fake
def _(grad, b, r, stack):
    return [torch.empty_like(b), b.new_empty(0) if r is None else torch.empty_like(r), *(torch.empty_like(s) for s in stack)]


def setup_context(ctx, inputs, output):
    b, r, stack = inputs
    ctx.has_gates = r is not None
    ctx.save_for_backward(b, r, *stack)


def backward(ctx, grad):
    b, r, *stack = ctx.saved_tensors
    grad_b, grad_r, *grad_stack = stack_sum_backward(grad, b, r if ctx.has_gates else None, stack)
    return grad_b, grad_r if ctx.has_gates else None, grad_stack


stack_sum.register_autograd(backward, setup_context=setup_context)

"""dca_kernels.py: the GRN sums' custom op. Its Triton kernels run here in Triton's interpreter on
the CPU (TRITON_INTERPRET=1; .ci/run installs Triton), and the op under torch.compile is called as it
is: one graph, and the same gradients as eager. On a GPU, test_equivalence.py's grn_kernel cases
(EQUIV_DEVICE=cuda) run the compiled kernels against the spec's formulas."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dca  # noqa: E402
from conftest import assert_one_graph_with_eagers_gradients, compile_for_h100, run_kernels_in_interpreter  # noqa: E402

KERNEL_CHECK = r'''
import sys
import torch
import dca, dca_kernels
sys.path.insert(0, "tests")
from conftest import max_gradient_difference
assert dca_kernels.use_kernels(torch.zeros(1)), "the kernels do not run in the interpreter"
torch.manual_seed(0)
worst = {}
# (sums, entries, B, T, d, gates, scalar b (GRN-v1), entry dtypes): blocks of rows and columns with
# ragged edges (T * B = 80 rows > 32, d = 130 > 128), one to three sums, both dtypes of autocast
for n_out, m, B, T, d, gates, scalar, dtypes in [
        (3, 4, 2, 5, 7, True, False, ("float64",)), (1, 3, 2, 40, 130, True, False, ("float64",)),
        (3, 2, 1, 3, 5, False, False, ("float64",)), (2, 3, 2, 3, 5, False, True, ("float64",)),
        (3, 5, 2, 33, 129, True, False, ("float32", "bfloat16")),       # the embedding in float32, the blocks' outputs bf16
        (2, 4, 1, 9, 20, True, False, ("bfloat16", "float32", "bfloat16"))]:  # later entries of two dtypes: cast to one
    wide = getattr(torch, dtypes[0])
    stack = [torch.randn(B, T, d, dtype=getattr(torch, dtypes[min(i, len(dtypes) - 1)]), requires_grad=True) for i in range(m)]
    b = torch.randn(n_out, m, *(() if scalar else (d,)), dtype=wide, requires_grad=True)
    r = torch.relu(torch.randn(m, B, T, n_out, dtype=wide)).requires_grad_() if gates else None
    inputs = [b] + ([r] if gates else []) + stack
    out = dca_kernels.stack_sum(b, r, stack)
    ref = torch.stack(dca.weighted_sums(b, r, stack))
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((out * g).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * g).sum(), inputs)
    assert out.dtype == ref.dtype and all(x.dtype == y.dtype for x, y in zip(grads, ref_grads))
    err = max([((out - ref).abs().max() / ref.abs().max()).item()]
              + [((x - y).abs().max() / y.abs().max()).item() for x, y in zip(grads, ref_grads)])
    worst[dtypes] = max(worst.get(dtypes, 0), err)
print(worst)
assert worst[("float64",)] < 1e-12, worst
assert max(worst[("float32", "bfloat16")], worst[("bfloat16", "float32", "bfloat16")]) < 2e-2, worst  # bf16 gradients
# a whole DCA model: the kernels' loss and gradients == StackSum's
torch.manual_seed(0)
cfg = dict(n_layer=3, n_head=2, n_embd=32, block_size=40, vocab_size=256)
plain, fused = dca.DCA(dca.DCAConfig(**cfg)).double(), dca.DCA(dca.DCAConfig(**cfg, grn_kernel=True)).double()
idx = torch.randint(0, 256, (2, 40))
diff = max_gradient_difference(plain, fused, idx)
print("model: max relative gradient difference", diff)
assert diff < 1e-10, diff
print("KERNELS OK")
'''


def test_triton_kernels_equal_the_weighted_sums_in_the_interpreter():
    run_kernels_in_interpreter(KERNEL_CHECK, timeout=600)


def test_grn_kernel_op_compiles_into_one_graph_with_eagers_gradients():
    torch.manual_seed(0)
    cfg = dca.DCAConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=256, grn_kernel=True)
    assert_one_graph_with_eagers_gradients(dca.DCA(cfg), torch.randint(0, 256, (2, 16)))


def test_grn_kernel_turns_on_the_custom_op_only():
    """grn_kernel=True routes every GRN's sums through the op; off, the op is never called."""
    cfg = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=256)
    idx = torch.randint(0, 256, (1, 8))
    calls = []
    import dca_kernels
    original = dca_kernels.stack_sum
    try:
        dca_kernels.stack_sum = lambda *args: calls.append(1) or original(*args)
        dca.DCA(dca.DCAConfig(**cfg))(idx)
        assert not calls
        dca.DCA(dca.DCAConfig(**cfg, grn_kernel=True))(idx)
        assert len(calls) == cfg["n_layer"] + 1  # every block's GRNs and the final one
    finally:
        dca_kernels.stack_sum = original


def test_triton_kernels_compile_for_an_h100_without_one():
    """The interpreter runs Python, not the compiler: this compiles both kernels to an sm_90 cubin
    (Triton's own ptxas; no GPU needed) for DCA's case under bf16 autocast: three sums with gates, a
    float32 embedding and bf16 block outputs. (Without the launcher's specialisation of the
    arguments' alignment and of M = 1: what the GPU compiles differs in those.)"""
    tl = pytest.importorskip("triton.language", reason="Triton is not installed (.ci/run installs it)")
    import dca_kernels
    consts = dict(N_OUT=3, HAS_GATES=True, B_SCALAR=False, REST=tl.bfloat16, ACC=tl.float32,
                  BLOCK_N=dca_kernels.BLOCK_N, BLOCK_D=dca_kernels.BLOCK_D)
    pointers = dict(first_ptr="*fp32", rest_table="*i64", grad_first_ptr="*fp32", grad_rest_table="*i64", g_ptr="*fp32",
                    b_ptr="*fp32", r_ptr="*bf16", out_ptr="*fp32", part_r_ptr="*fp32", part_b_ptr="*fp32", N="i32", D="i32", M="i32")
    for kernel in (dca_kernels.stack_sum_kernel, dca_kernels.stack_sum_backward_kernel):
        signature = {name: "constexpr" if name in consts else pointers[name] for name in kernel.arg_names}
        compile_for_h100(kernel, signature, consts, dca_kernels.NUM_WARPS)

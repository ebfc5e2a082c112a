"""dcmha_kernels.py: compose -> mask -> softmax -> compose as one custom op (dc_compose=kernel).
Its torch backward against autograd; its Triton kernels in Triton's interpreter on the CPU
(TRITON_INTERPRET=1; .ci/run installs Triton) and compiled for an H100 without one; the op under
torch.compile: one graph and eager's gradients. On a GPU, test_equivalence.py's dc_compose=kernel
cases (EQUIV_DEVICE=cuda) run the compiled kernels in float64 against W_ts written out per (t, s)."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dcmha  # noqa: E402
import dcmha_kernels  # noqa: E402
from conftest import assert_one_graph_with_eagers_gradients, compile_for_h100, run_kernels_in_interpreter  # noqa: E402

# (B, N, T, S, R, offset, window, which factor sets: pre query, pre key, post query, post key).
# Ragged blocks of queries and keys, a chunk's offset (its queries see earlier keys), windows that
# start mid-block, N = 12 padded to 16 heads, and every kind of missing set.
SHAPES = [(2, 3, 5, 5, 2, 0, 0, (1, 1, 1, 1)), (1, 4, 20, 45, 1, 25, 0, (1, 1, 1, 1)),
          (2, 2, 17, 17, 3, 0, 6, (1, 0, 0, 1)), (1, 5, 33, 40, 2, 7, 9, (0, 1, 1, 0)),
          (1, 12, 11, 37, 2, 26, 0, (1, 1, 1, 1)), (1, 1, 3, 3, 2, 0, 0, (1, 1, 1, 1)),
          (2, 4, 9, 9, 2, 0, 0, (0, 0, 1, 1)), (1, 3, 7, 7, 1, 0, 0, (1, 1, 0, 0))]

def case(B, N, T, S, R, offset, window, present, dtype=torch.float64, seed=0):
    """Random logits and factor sets, the op's outputs and gradients, and the reference's, in float64."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, N, T, S, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    factors = [(0.5 * torch.randn(B, T if i % 2 == 0 else S, 2 * R + 1, N, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
               if on else None for i, on in enumerate(present)]
    inputs = [logits] + [f for f in factors if f is not None]
    probs, lse = dcmha_kernels.compose_softmax_compose(logits, *factors, offset, window)
    wide = [x.detach().double().requires_grad_() for x in inputs]
    it = iter(wide[1:])
    ref, ref_lse = dcmha_kernels.reference(wide[0], [None if f is None else next(it) for f in factors], offset, window)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((probs.double() * grad).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * grad).sum(), wide)
    assert probs.dtype == dtype and all(x.dtype == dtype for x in grads)
    errors = [((probs.double() - ref).abs().max() / ref.abs().max()).item(), (lse.double() - ref_lse).abs().max().item()]
    errors += [((x.double() - y).abs().max() / y.abs().max()).item() for x, y in zip(grads, ref_grads)]
    return max(errors)


KERNEL_CHECK = r'''
import sys
import torch
import dcmha, dcmha_kernels
sys.path.insert(0, "tests")
from conftest import max_gradient_difference
from test_dcmha_kernels import SHAPES, case
assert dcmha_kernels.use_kernels(torch.zeros(1)), "the kernels do not run in the interpreter"
worst = max(case(*shape) for shape in SHAPES)
print("float64: worst relative error", worst)
assert worst < 1e-12, worst
worst = max(case(*shape, dtype=torch.float32) for shape in SHAPES[:3])
print("float32:", worst)
assert worst < 1e-4, worst
worst = max(case(*shape, dtype=torch.bfloat16) for shape in SHAPES[:3])  # autocast's dtype, without dc_float32_scores
print("bfloat16:", worst)
assert worst < 5e-2, worst
# a whole DCMHA model: the kernels' loss and gradients == dc_compose=matrix's
torch.manual_seed(0)
cfg = dict(n_layer=2, n_head=3, n_embd=24, block_size=20, vocab_size=256, window=4, window_pattern="LG", query_chunk=7)
plain, fused = (dcmha.DCFormer(dcmha.DCMHAConfig(**cfg, dc_compose=c)).double() for c in ("matrix", "kernel"))
idx = torch.randint(0, 256, (2, 20))
diff = max_gradient_difference(plain, fused, idx)
print("model: max relative gradient difference", diff)
assert diff < 1e-10, diff
print("KERNELS OK")
'''

@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_path_equals_autograd_through_the_reference(shape):
    """Without CUDA (or the interpreter) the op is torch: its hand-written backward (the kernels'
    formulas: Compose's adjoint, the softmax's row terms, the factors' sums) == autograd, in float64."""
    assert not dcmha_kernels.use_kernels(torch.zeros(1))
    assert case(*shape) < 1e-12


def test_triton_kernels_equal_the_reference_in_the_interpreter():
    run_kernels_in_interpreter(KERNEL_CHECK, timeout=900)


def test_kernel_op_compiles_into_one_graph_with_eagers_gradients():
    torch.manual_seed(0)
    cfg = dcmha.DCMHAConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=256, dc_compose="kernel", query_chunk=5)
    assert_one_graph_with_eagers_gradients(dcmha.DCFormer(cfg), torch.randint(0, 256, (2, 16)))


def test_kernel_op_is_called_once_a_chunk_and_only_then():
    cfg = dict(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=256, query_chunk=5)
    idx = torch.randint(0, 256, (1, 12))
    calls = []
    original = dcmha_kernels.compose_softmax_compose
    try:
        dcmha_kernels.compose_softmax_compose = lambda *args: calls.append(args[-2:]) or original(*args)
        dcmha.DCFormer(dcmha.DCMHAConfig(**cfg))(idx)
        assert not calls
        dcmha.DCFormer(dcmha.DCMHAConfig(**cfg, dc_compose="kernel", window=4, window_pattern="LG"))(idx)
        # 3 chunks a layer; (offset, window): a chunk's queries sit after the keys that only earlier queries see
        assert calls == [(0, 4), (3, 4), (3, 4), (0, 0), (5, 0), (10, 0)], calls
    finally:
        dcmha_kernels.compose_softmax_compose = original


@pytest.mark.parametrize("offset", [-1, 4])
def test_queries_outside_the_keys_are_refused(offset):
    """T = 4 queries among S = 7 keys sit at offsets 0 .. 3; outside, the kernels would write past the tensor."""
    with pytest.raises(ValueError, match="offset"):
        dcmha_kernels.compose_softmax_compose(torch.zeros(1, 2, 4, 7), None, None, None, None, offset, 0)


@pytest.mark.parametrize("n_head,dtype", [(12, "fp32"), (12, "bf16"), (4, "fp64")])
def test_triton_kernels_compile_for_an_h100_without_one(n_head, dtype):
    """The interpreter runs Python, not the compiler: this compiles both kernels to an sm_90 cubin
    (Triton's own ptxas; no GPU needed) at the tile sizes a model with n_head heads launches, in
    float32 (GPT-2 small: 12 heads, padded to 16), bf16 (autocast without dc_float32_scores) and
    float64 (the equivalence suite on CUDA: exp and log in float64), specialised as a launch at
    T = S = 1024 is: pointers 16-byte aligned, T, S, offset and window divisible by 16."""
    tl = pytest.importorskip("triton.language", reason="Triton is not installed (.ci/run installs it)")
    NP, BLOCK_T, BLOCK_S = dcmha_kernels.block_sizes(n_head)
    consts = dict(R=2, HAS_PRE_Q=True, HAS_PRE_K=True, HAS_POST_Q=True, HAS_POST_K=True,
                  ACC=tl.float64 if dtype == "fp64" else tl.float32, NP=NP, BLOCK_T=BLOCK_T, BLOCK_S=BLOCK_S)
    wide = "*fp64" if dtype == "fp64" else "*fp32"
    for kernel in (dcmha_kernels.compose_softmax_compose_kernel, dcmha_kernels.compose_softmax_compose_backward_kernel):
        signature = {name: "constexpr" if name in consts else "i32" if name in ("T", "S", "N", "offset", "window")
                     else wide if name == "lse_ptr" or name.startswith("grad_p") else f"*{dtype}"
                     for name in kernel.arg_names}
        aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                   if signature[name].startswith("*") or name in ("T", "S", "offset", "window")}
        compile_for_h100(kernel, signature, consts, dcmha_kernels.NUM_WARPS, attrs=aligned)

"""What the tests that run the scripts share: a subprocess runner and a small offline corpus."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, cwd=ROOT, env=None, check=True):
    """python args... in the repo (one thread); fails the test with the output unless it exits 0."""
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The offline default corpus (this Python's standard library), capped to stay fast."""
    d = tmp_path_factory.mktemp("data")
    run(["prepare_data.py", f"--data_dir={d}", "--max_tokens=400000"])
    return d


# -----------------------------------------------------------------------------
# what the kernel tests share (tests/test_dca_kernels.py, tests/test_dcmha_kernels.py)

def run_kernels_in_interpreter(script, timeout=900):
    """Runs a script that checks Triton kernels in Triton's interpreter (TRITON_INTERPRET=1: the
    kernels run as Python on the CPU, set before triton is imported); it must print KERNELS OK."""
    pytest.importorskip("triton", reason="Triton is not installed (.ci/run installs it)")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0 and "KERNELS OK" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]


def assert_one_graph_with_eagers_gradients(model, idx):
    """torch.compile takes the model, custom op and all, as one graph with no breaks, and its
    gradients are eager's."""
    import torch
    explained = torch._dynamo.explain(model)(idx, idx)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    model(idx, idx)[1].backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    torch.compile(model)(idx, idx)[1].backward()
    for p, g in zip(model.parameters(), eager):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def compile_for_h100(kernel, signature, constexprs, num_warps, attrs=None):
    """Compiles a Triton kernel to an sm_90 cubin with Triton's own ptxas: no GPU needed (the
    interpreter runs Python, not the compiler). signature: each argument's type, "constexpr" for
    those in constexprs; attrs: what a launch specialises (e.g. 16-byte alignment)."""
    triton = pytest.importorskip("triton", reason="Triton is not installed (.ci/run installs it)")
    from triton.backends.compiler import GPUTarget
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs or {})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert len(compiled.asm["cubin"]) > 0 and ".entry" in compiled.asm["ptx"]
    return compiled


def max_gradient_difference(plain, fused, idx):
    """Two models that differ only in how they compute (e.g. with kernels or without): plain's
    weights are moved off their init (so every path carries signal) and loaded into fused; the
    largest relative difference of any parameter's gradient of the loss on idx."""
    import torch
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.3 * torch.randn_like(p))
    fused.load_state_dict(plain.state_dict())
    for model in (plain, fused):
        model(idx, idx)[1].backward()
    return max(((p.grad - q.grad).abs().max() / p.grad.abs().max()).item()
               for p, q in zip(plain.parameters(), fused.parameters()))

"""
The equivalence suite: every variant against the baseline and against itself.

    python test_equivalence.py          # prints every check with its max |difference|
    python -m pytest test_equivalence.py

The shared checks run over every registered model (and the extra settings in CASES):
causality, KV-cache decode == full forward, every parameter gets a gradient, and
torch.compile == eager. Then each paper's own checks follow, one section per file.
Exact claims are checked in float64.
"""

import sys

import pytest
import torch

import gpt

MODELS = gpt.all_models()

# (model name, config overrides) for the shared checks: every model at its defaults, plus the
# settings that take a different code path.
CASES = [(name, {}) for name in MODELS] + [
    ("gpt", {"qk_norm": True, "mlp": "gelu", "tie_embeddings": False}),
]


def case_id(case):
    name, overrides = case
    return name + "".join(f"-{k}={v}" for k, v in overrides.items())


# -----------------------------------------------------------------------------
# helpers

TINY = dict(block_size=32, vocab_size=97, n_layer=4, n_head=4, n_embd=32)


def make_model(name, dtype=torch.float64, seed=0, **overrides):
    """A tiny model of the named kind, in eval mode, in the given dtype."""
    config_class, model_class = MODELS[name]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**TINY, "model": name, **overrides}))
    return model.to(dtype).eval()


def perturb(model, scale=0.05, seed=1):
    """Move every parameter away from its init, so that no check passes because of a zero
    (a zero gate, a zero dynamic weight, a ReLU sitting at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model


def copy_weights(src, dst):
    """Copy every parameter and buffer of src into dst where the names match; return the
    names of dst's tensors that src did not have (the variant's own)."""
    src_state = src.state_dict()
    missing = []
    with torch.no_grad():
        for name, t in dst.state_dict().items():
            if name in src_state and src_state[name].shape == t.shape:
                t.copy_(src_state[name])
            else:
                missing.append(name)
    return missing


def tokens(B=2, T=TINY["block_size"], seed=0, vocab=TINY["vocab_size"]):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def check(label, actual, expected, atol):
    """Print the max |actual - expected| for this check and fail if it exceeds atol."""
    diff = (actual.double() - expected.double()).abs().max().item()
    ok = diff <= atol
    print(f"{'PASS' if ok else 'FAIL'}  {label:<64} max|diff| {diff:.2e}  (atol {atol:.0e})")
    assert ok, f"{label}: max |diff| {diff:.3e} > {atol:.0e}"
    return diff


def decode_logits(model, idx, steps=(5, 1, 1, 7)):
    """Run idx through the model piece by piece with a KV cache: a prefill, single tokens,
    and a multi-token chunk on a non-empty cache; return the concatenated logits."""
    cache = gpt.KVCache(model.config.n_layer)
    out, t = [], 0
    for n in list(steps) + [idx.size(1) - sum(steps)]:
        logits, _ = model(idx[:, t:t + n], cache=cache)
        out.append(logits)
        t += n
    return torch.cat(out, dim=1)


# -----------------------------------------------------------------------------
# the shared checks, over every model

@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_causality(case):
    name, overrides = case
    model = perturb(make_model(name, **overrides))
    idx = tokens()
    t = idx.size(1) // 2
    changed = idx.clone()
    changed[:, t:] = (changed[:, t:] + 1 + torch.arange(changed.size(1) - t)) % TINY["vocab_size"]
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    check(f"{case_id(case)}: future tokens leave earlier logits unchanged", b[:, :t], a[:, :t], 1e-12)
    assert (b[:, t:] - a[:, t:]).abs().max() > 1e-6, "changing tokens changed nothing at all"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kv_cache_decode_equals_full_forward(case):
    name, overrides = case
    model = perturb(make_model(name, **overrides))
    idx = tokens()
    with torch.no_grad():
        full, _ = model(idx)
        stepped = decode_logits(model, idx)
    check(f"{case_id(case)}: KV-cache decode == full forward", stepped, full, 1e-10)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_generate_with_cache_equals_without(case):
    name, overrides = case
    model = perturb(make_model(name, **overrides))
    prompt = tokens(T=5)
    n_new = TINY["block_size"] - 5  # stays inside block_size, where the two must agree exactly
    with_cache = model.generate(prompt, n_new, temperature=0, use_cache=True)
    without = model.generate(prompt, n_new, temperature=0, use_cache=False)
    check(f"{case_id(case)}: greedy generate with cache == without", with_cache, without, 0)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_parameter_gets_a_gradient(case):
    name, overrides = case
    model = perturb(make_model(name, **overrides)).train()
    idx = tokens()
    _, loss = model(idx, targets=torch.roll(idx, -1, dims=1))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or p.grad.abs().max() == 0)]
    print(f"PASS  {case_id(case)}: all {sum(1 for _ in model.parameters())} parameters get a gradient"
          if not no_grad else f"FAIL  {case_id(case)}: no gradient for {no_grad}")
    assert not no_grad, f"parameters without a gradient: {no_grad}"


@pytest.mark.parametrize("name", list(MODELS))
def test_compile_equals_eager(name):
    model = perturb(make_model(name, dtype=torch.float32, n_layer=2))
    idx = tokens()
    targets = torch.roll(idx, -1, dims=1)
    eager_logits, eager_loss = model(idx, targets)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    logits, loss = compiled(idx, targets)
    check(f"{name}: torch.compile == eager (float32)", logits, eager_logits, 1e-4)
    check(f"{name}: torch.compile loss == eager loss", loss, eager_loss, 1e-5)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s", "-p", "no:cacheprovider", *sys.argv[1:]]))

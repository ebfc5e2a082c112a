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
    ("resformer", {"value_residual": "learnable"}),
    ("resformer", {"value_residual": "constant", "value_residual_lambda": 2.0}),
    ("resformer", {"value_residual": "sparse", "value_residual_lambda": 5.0, "value_residual_layers": "3-4"}),
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


# -----------------------------------------------------------------------------
# ResFormer / SVFormer (resformer.py): the value residual

def set_lambdas(model, lambda_1, lambda_2):
    with torch.no_grad():
        for block in model.blocks[1:]:
            block.attn.lambda_1.fill_(lambda_1)
            block.attn.lambda_2.fill_(lambda_2)


def test_resformer_lambda_0_1_equals_gpt():
    base = perturb(make_model("gpt"))
    idx = tokens()
    expected, _ = base(idx)
    learnable = make_model("resformer", value_residual="learnable")
    assert sorted(copy_weights(base, learnable)) == sorted(
        f"blocks.{i}.attn.lambda_{j}" for i in range(1, TINY["n_layer"]) for j in (1, 2))
    set_lambdas(learnable, 0.0, 1.0)
    constant = make_model("resformer", value_residual="constant", value_residual_lambda=0.0)
    assert copy_weights(base, constant) == []
    for label, model in (("learnable λ", learnable), ("constant λ1=0", constant)):
        logits, _ = model(idx)
        check(f"resformer {label} = (0, 1) == gpt, same weights", logits, expected, 1e-12)
    identity = make_model("resformer")
    copy_weights(base, identity)
    assert (identity(idx)[0] - expected).abs().max() > 1e-6, "the default λ = (0.5, 0.5) changed nothing"


def test_svformer_equals_resformer_lambda_1_0_without_unused_wv():
    sv = perturb(make_model("svformer"))
    res = make_model("resformer", value_residual="learnable")
    missing = copy_weights(sv, res)  # all of svformer's weights fit; resformer has W_V and λs extra
    extra = [f"blocks.{i}.attn.{n}" for i in range(1, TINY["n_layer"]) for n in ("c_v.weight", "lambda_1", "lambda_2")]
    assert sorted(missing) == sorted(extra), missing
    assert res.num_params() - sv.num_params() == (TINY["n_layer"] - 1) * (TINY["n_embd"] ** 2 + 2)
    set_lambdas(res, 1.0, 0.0)
    idx = tokens()
    check("svformer == resformer with λ = (1, 0)", sv(idx)[0], res(idx)[0], 1e-12)


def test_resformer_learnable_lambdas_get_gradients_and_no_weight_decay():
    model = perturb(make_model("resformer", value_residual="learnable")).train()
    lambdas = {n: p for n, p in model.named_parameters() if "lambda" in n}
    assert not any(n.startswith("blocks.0.") for n in lambdas), "layer 1 must have no λ"
    assert len(lambdas) == 2 * (TINY["n_layer"] - 1)
    idx = tokens()
    _, loss = model(idx, targets=torch.roll(idx, -1, dims=1))
    loss.backward()
    grads = torch.stack([p.grad.abs() for p in lambdas.values()])
    print(f"PASS  every λ gets a gradient: min |grad| {grads.min().item():.2e}")
    assert grads.min() > 0
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95))
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert all(decay_of[id(p)] == 0.0 for p in lambdas.values()), "λs must get no weight decay"
    assert decay_of[id(model.blocks[1].attn.c_v.weight)] == 0.1


def test_resformer_sparse_mixes_only_the_chosen_layers():
    model = make_model("resformer", n_layer=8, value_residual="sparse",
                       value_residual_lambda=5.0, value_residual_layers="6-8")
    assert [b.attn.mixes for b in model.blocks] == [False] * 5 + [True] * 3
    assert all((b.attn.lambda_1, b.attn.lambda_2) == (5.0, 1.0) for b in model.blocks[5:])
    for bad in ("1-3", "6-9", "7-6", "six", ""):
        with pytest.raises(ValueError):
            make_model("resformer", n_layer=8, value_residual="sparse", value_residual_layers=bad)
    with pytest.raises(ValueError):
        make_model("resformer", value_residual="constant", value_residual_layers="2-3")
    with pytest.raises(ValueError):
        make_model("resformer", value_residual="residual")


def test_svformer_caches_one_value_tensor():
    L, B, T = TINY["n_layer"], 2, 11
    idx = tokens(B=B, T=T)
    nbytes = {}
    for name in ("gpt", "resformer", "svformer"):
        model = perturb(make_model(name))
        cache = gpt.KVCache(L)
        with torch.no_grad():
            model(idx, cache=cache)
        nbytes[name] = cache.nbytes()
        if name == "svformer":
            assert [sorted(d) for d in cache.layers] == [["k", "v"]] + [["k"]] * (L - 1)
    one_tensor = B * TINY["n_head"] * T * (TINY["n_embd"] // TINY["n_head"]) * 8  # float64
    print(f"PASS  cache bytes: gpt {nbytes['gpt']}, resformer {nbytes['resformer']}, svformer {nbytes['svformer']}")
    assert nbytes["gpt"] == nbytes["resformer"] == 2 * L * one_tensor
    assert nbytes["svformer"] == (L + 1) * one_tensor
    assert nbytes["svformer"] * 2 * L == nbytes["gpt"] * (L + 1)  # (L+1)/(2L) of the baseline's


@pytest.mark.parametrize("name", ["resformer", "svformer"])
def test_resformer_decode_reuses_first_layer_values_of_the_current_tokens(name):
    """Decode one token at a time over a long prompt: every step's V_1 must be the new token's."""
    model = perturb(make_model(name, value_residual="learnable") if name == "resformer" else make_model(name))
    idx = tokens()
    with torch.no_grad():
        full, _ = model(idx)
        stepped = decode_logits(model, idx, steps=(1,) * (idx.size(1) - 1))
    check(f"{name}: token-by-token decode == full forward", stepped, full, 1e-10)



if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s", "-p", "no:cacheprovider", *sys.argv[1:]]))

"""
The equivalence suite: every variant against the baseline and against itself.

    python test_equivalence.py          # prints every check with its max |difference|
    python -m pytest test_equivalence.py

The shared checks run over every registered model (and the extra settings in CASES):
causality, KV-cache decode == full forward, every parameter gets a gradient, and
torch.compile == eager. Then each paper's own checks follow, one section per file.
Exact claims are checked in float64.

    EQUIV_DEVICE=cuda python -m pytest test_equivalence.py    # the same checks on a GPU
"""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import gpt

# Every tensor and model of the checks is made on DEVICE (random numbers too: the generators
# live there), so the whole suite runs unchanged on a GPU.
DEVICE = os.environ.get("EQUIV_DEVICE", "cpu")
if DEVICE != "cpu":
    torch.set_default_device(DEVICE)

MODELS = gpt.all_models()
import dca  # noqa: E402  (registered by all_models; their sections use their classes)
import dcmha  # noqa: E402

# (model name, config overrides) for the shared checks: every model at its defaults, plus the
# settings that take a different code path.
CASES = [(name, {}) for name in MODELS] + [
    ("gpt", {"qk_norm": True, "mlp": "gelu", "tie_embeddings": False}),
    ("resformer", {"value_residual": "learnable"}),
    ("resformer", {"value_residual": "constant", "value_residual_lambda": 2.0}),
    ("resformer", {"value_residual": "sparse", "value_residual_lambda": 5.0, "value_residual_layers": "3-4"}),
    ("dcmha", {"window": 4, "query_chunk": 5}),
    ("dcmha", {"dc_static": True, "query_chunk": 3}),
    ("dcmha", {"dc_post": False}),
    ("dcmha", {"dc_pre": False}),
    ("dcmha", {"dc_key_wise": False}),
    ("dcmha", {"dc_query_wise": False, "window": 3, "window_pattern": "L"}),
    ("dcmha", {"dc_query_wise": False, "dc_key_wise": False, "dc_static": True}),
    ("dcmha", {"n_head": 2, "dc_rank": 3, "dc_hidden": 5, "qk_norm": False}),
    ("dcmha", {"dc_compose": "factors", "window": 4, "query_chunk": 5}),
    ("dcmha", {"dc_compose": "factors", "dc_static": True, "dc_post": False, "query_chunk": 3}),
    ("dcmha", {"dc_compose": "factors", "dc_query_wise": False, "dc_key_wise": False, "dc_static": True}),
    ("dcmha", {"dc_compose": "folded", "window": 4, "query_chunk": 5}),
    ("dcmha", {"dc_compose": "folded", "dc_static": True, "dc_pre": False, "query_chunk": 3}),
    ("dcmha", {"dc_compose": "folded", "dc_query_wise": False, "n_head": 2, "dc_rank": 3}),
    ("dcmha", {"dc_compose": "kernel", "window": 4, "query_chunk": 5}),
    ("dcmha", {"dc_compose": "kernel", "dc_pre": False, "dc_key_wise": False, "query_chunk": 3}),
    ("dcmha", {"dc_compose": "kernel", "dc_post": False, "dc_query_wise": False, "n_head": 8, "dc_rank": 1}),
    ("dca", {"dca_k": 1}),
    ("dca", {"dca_k": 2}),
    ("dca", {"grn": "v1"}),
    ("dca", {"grn": "v2", "dca_k": 2}),
    ("dca", {"grn_relu_bias": True}),
    ("dca", {"grn_norm": False}),
    ("dca", {"dca_qkv": False, "dca_k": 1}),
    ("dca", {"mlp": "gelu", "tie_embeddings": False}),
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
    g = torch.Generator(DEVICE).manual_seed(seed)
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


def gpt_and_multiway(name, **overrides):
    """A perturbed gpt and a model of a multi-way kind (DCA, MUDDFormer: separate q, k, v and
    MLP inputs, each with its own norm) carrying gpt's weights: the attention and MLP by name,
    gpt's norm_1 -> norm_q/k/v, norm_2 -> norm_m. Returns (gpt, model, the names gpt lacked)."""
    base = perturb(make_model("gpt", **{k: v for k, v in overrides.items() if k in ("mlp",)}))
    model = make_model(name, **overrides)
    missing = copy_weights(base, model)
    with torch.no_grad():
        for src, dst in zip(base.blocks, model.blocks):
            for norm in (dst.norm_q, dst.norm_k, dst.norm_v):
                if norm is not None:
                    norm.weight.copy_(src.norm_1.weight)
            dst.norm_m.weight.copy_(src.norm_2.weight)
    return base, model, missing


def tokens(B=2, T=TINY["block_size"], seed=0, vocab=TINY["vocab_size"]):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator(DEVICE).manual_seed(seed))


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


def run_shared_checks(case):
    """The four checks above for one case: the newer models' own test files run them over their settings."""
    for shared_check in (test_causality, test_kv_cache_decode_equals_full_forward, test_generate_with_cache_equals_without,
                         test_every_parameter_gets_a_gradient):
        shared_check(case)


@pytest.mark.parametrize("case", [(name, {}) for name in MODELS] + [("dcmha", {"dc_compose": c}) for c in ("factors", "folded", "kernel")],
                         ids=case_id)
def test_compile_equals_eager(case):
    """The compiled forward and backward against eager: the logits, the loss and every gradient."""
    name, overrides = case
    model = perturb(make_model(name, dtype=torch.float32, n_layer=2, **overrides))
    idx = tokens()
    targets = torch.roll(idx, -1, dims=1)
    eager_logits, eager_loss = model(idx, targets)
    eager_loss.backward()
    eager_grads = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    logits, loss = compiled(idx, targets)
    loss.backward()
    check(f"{name}: torch.compile == eager (float32)", logits, eager_logits, 1e-4)
    check(f"{name}: torch.compile loss == eager loss", loss, eager_loss, 1e-5)
    grads = {n: p.grad for n, p in model.named_parameters()}
    worst = max(grads, key=lambda n: (grads[n] - eager_grads[n]).abs().max())
    check(f"{name}: torch.compile gradients == eager (worst: {worst})", grads[worst], eager_grads[worst], 1e-4)


BF16_TOLERANCE = 3e-2  # ‖logits_bf16 - logits_fp32‖ / ‖logits_fp32‖; bf16 keeps 8 bits of mantissa


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_autocast_stays_close_to_float32(name):
    """The training path on a GPU: the same weights under bf16 autocast (as train.py runs them)
    give logits within a few bf16 roundings of float32, and a finite loss close to it."""
    model = perturb(make_model(name, dtype=torch.float32))
    idx = tokens()
    targets = torch.roll(idx, -1, dims=1)
    ref_logits, ref_loss = model(idx, targets)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    rel = ((logits.float() - ref_logits).norm() / ref_logits.norm()).reshape(1)
    check(f"{name}: bf16 autocast vs float32, relative logits error", rel, torch.zeros(1), BF16_TOLERANCE)
    check(f"{name}: bf16 autocast vs float32, loss", loss.float(), ref_loss, 2e-2)


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



# -----------------------------------------------------------------------------
# DCMHA (dcmha.py): dynamically composable multi-head attention

def attn_inputs(attn, B=2, T=12, seed=0):
    """Random q, k, v (B, N, T, hd) and a normed block input x (B, T, D) for one attention layer."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    N, hd, D = attn.n_head, attn.head_dim, attn.c_q.in_features
    q, k, v = (torch.randn(B, N, T, hd, generator=g, dtype=torch.float64) for _ in range(3))
    return q, k, v, torch.randn(B, T, D, generator=g, dtype=torch.float64)


def reference_mask(T, window):
    t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (s <= t) & (s > t - window) if window else s <= t


def reference_attention(attn, q, k, v, x):
    """DCMHA written out from the paper: every set's weights from the parameters one at a
    time, W_ts materialised as a (B, T, S, N, N) tensor, no chunks, mask after the pre-compose."""
    B, N, T, hd = q.shape
    R = attn.rank
    eye = torch.eye(N, dtype=q.dtype)
    W = {stage: eye.expand(B, T, T, N, N).clone() for stage in attn.stages}         # (B, T, S, N, N)
    for i, stage in enumerate(attn.stages):
        if hasattr(attn, "Wb"):
            W[stage] = W[stage] + attn.Wb[i]
        for j, side in enumerate(attn.sides):
            n = i * len(attn.sides) + j
            hidden = F.gelu(x @ attn.W1[:, n], approximate="tanh")                  # (B, T, C)
            w = (hidden @ attn.W2[n].flatten(1)).view(B, T, 2 * R, N)
            w1, w2 = w[:, :, :R], w[:, :, R:]
            w1 = w1 / torch.sqrt(w1.pow(2).mean(-1, keepdim=True) + 1e-6)
            dd = torch.tanh(x @ attn.Wdd[:, n])                                      # (B, T, N)
            per_token = torch.einsum("btin,btim->btnm", w1, w2) + torch.diag_embed(dd)  # (B, T, N, N)
            W[stage] = W[stage] + (per_token[:, :, None] if side == "query" else per_token[:, None, :])
    mask = reference_mask(T, attn.window)
    a = q @ k.mT / math.sqrt(hd)
    if "pre" in W:
        a = torch.einsum("bnts,btsnm->bmts", a, W["pre"])
    p = a.masked_fill(~mask, float("-inf")).softmax(-1)
    if "post" in W:
        p = torch.einsum("bnts,btsnm->bmts", p, W["post"])
    return p.masked_fill(~mask, 0.0) @ v


def ctx_for(T):
    cos, sin = gpt.rope_tables(2, T, 10000.0)
    return gpt.Context(cos, sin)


@pytest.mark.parametrize("window", [0, 4])
@pytest.mark.parametrize("static", [False, True])
def test_dcmha_zero_dynamic_weights_equals_gpt(window, static):
    """W2 = 0 and Wdd = 0 make every dynamic term exactly 0 (W1 stays random): DCMHA is then
    gpt's attention with the same q/k/v/o weights (with the same local windows)."""
    base = perturb(make_model("gpt", qk_norm=True))
    for block in base.blocks[::2]:
        block.attn.window = window or None  # layers 0, 2 local: window_pattern "LG"
    model = perturb(make_model("dcmha", window=window, dc_static=static, query_chunk=5), seed=2)
    own = {f"blocks.{i}.attn.{n}" for i in range(TINY["n_layer"]) for n in ("W1", "W2", "Wdd")}
    own |= {f"blocks.{i}.attn.Wb" for i in range(TINY["n_layer"])} if static else set()
    assert set(copy_weights(base, model)) == own
    assert [b.attn.window for b in model.blocks] == [b.attn.window for b in base.blocks]
    idx = tokens()
    different = (model(idx)[0] - base(idx)[0]).abs().max()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W2.zero_()
            block.attn.Wdd.zero_()
            if static:
                block.attn.Wb.zero_()
    check(f"dcmha W2 = Wdd = 0 (window={window}, static={static}) == gpt", model(idx)[0], base(idx)[0], 1e-12)
    assert different > 1e-4, "non-zero dynamic weights changed nothing"


@pytest.mark.parametrize("n_head,rank", [(1, 2), (2, 1), (3, 3), (4, 2), (4, 1), (2, 3)])
@pytest.mark.parametrize("window,chunk,static,compose", [
    (window, chunk, static, compose) for window, chunk, static in [(0, 0, True), (4, 5, False), (0, 3, False)]
    for compose in ["matrix", "factors", "folded", "kernel"] if not (static and compose == "kernel")])  # no W_b in the kernel
def test_dcmha_attention_equals_explicit_W_ts(n_head, rank, window, chunk, static, compose):
    """The per-token Q_t + K_s form (compose=matrix), the factorised form (factors), the form
    folded into the q·kᵀ and probs @ v matmuls (folded) and the custom op (kernel: Triton's kernels
    on CUDA), chunked, == W_ts materialised per (t, s), in float64, with random non-zero weights.
    Also checks R and C come from the config."""
    model = make_model("dcmha", n_embd=48, n_head=n_head, dc_rank=rank, dc_hidden=7 if static else 0,
                       window=window, query_chunk=chunk, dc_static=static, dc_compose=compose)
    attn = perturb(model, scale=0.5).blocks[0].attn
    C = 7 if static else 4 * n_head
    D = 48
    assert attn.W1.shape == (D, 4, C) and attn.W2.shape == (4, C, 2 * rank, n_head)
    assert attn.Wdd.shape == (D, 4, n_head) and attn.window == (window or None)
    q, k, v, x = attn_inputs(attn)
    with torch.no_grad():
        expected = reference_attention(attn, q, k, v, x)
        actual = attn.attend(q, k, v, x, ctx_for(q.size(2)))
        # the dynamic terms are large here: compose differs a lot from plain attention
        plain = F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask(q.size(2), window))
    check(f"dcmha {compose} N={n_head} R={rank} window={window} chunk={chunk} static={static}: == explicit W_ts",
          actual, expected, 1e-12)
    assert (expected - plain).abs().max() > 1e-2


@pytest.mark.parametrize("window", [0, 4, 7])
def test_dcmha_chunked_equals_unchunked(window):
    idx = tokens()
    whole = perturb(make_model("dcmha", window=window, query_chunk=0, n_layer=2), scale=0.2)
    expected, _ = whole(idx)
    for chunk in (1, 3, 8, idx.size(1), idx.size(1) + 5):
        model = make_model("dcmha", window=window, query_chunk=chunk, n_layer=2)
        assert copy_weights(whole, model) == []
        check(f"dcmha window={window}: query chunks of {chunk} == unchunked", model(idx)[0], expected, 1e-12)


@pytest.mark.parametrize("window,chunk,T", [(4, 3, 12), (4, 0, 12), (1, 2, 9), (0, 8, 40)])
def test_dcmha_window_sees_exactly_its_keys(window, chunk, T):
    """With v = I the attention output is the composed probabilities, so its non-zeros are
    the keys each query sees: the window's w keys (itself included), or all earlier keys on
    a global layer, also for sequences longer than n_embd (the key range is the sequence's)."""
    model = make_model("dcmha", window=window, window_pattern="L", query_chunk=chunk)
    attn = perturb(model, scale=0.5).blocks[0].attn
    q, k, _, x = attn_inputs(attn, T=T)
    v = torch.eye(T, dtype=torch.float64).expand(2, attn.n_head, T, T)
    with torch.no_grad():
        probs = attn.attend(q, k, v, x, ctx_for(T))                                  # (B, N, T, S)
    seen = (probs != 0).any(1)                                                       # (B, T, S)
    assert T > TINY["n_embd"] or window
    assert torch.equal(seen, reference_mask(T, window).expand_as(seen))
    counts = seen[0].sum(-1)
    expected_counts = (torch.arange(T) + 1).clamp(max=window or T)
    assert torch.equal(counts, expected_counts), counts
    print(f"PASS  dcmha window={window} chunk={chunk}: query t sees exactly min(t+1, window) keys: {counts.tolist()}")


def loss64(model, idx):
    """The next-token loss in float64 (gpt.py's forward takes it in float32)."""
    logits, _ = model(idx)
    return F.cross_entropy(logits.flatten(0, 1), torch.roll(idx, -1, dims=1).flatten())


def directional_derivative(model, idx, p, direction, eps):
    with torch.no_grad():
        p.add_(eps * direction)
        plus = loss64(model, idx)
        p.sub_(2 * eps * direction)
        minus = loss64(model, idx)
        p.add_(eps * direction)
    return (plus - minus) / (2 * eps)


@pytest.mark.parametrize("overrides", [{}, {"dc_static": True, "window": 4, "query_chunk": 5}])
def test_dcmha_gradients_reach_W1_W2_Wdd_Wb(overrides):
    """From the real (tiny) init: the gradients of the real parameters are non-zero and equal
    the loss's finite differences (the authors' PyTorch port trained copies of them instead)."""
    model = make_model("dcmha", n_layer=2, **overrides).train()
    idx = tokens()
    loss64(model, idx).backward()
    g = torch.Generator(DEVICE).manual_seed(3)
    for name, p in model.named_parameters():
        if name.split(".")[-1] not in ("W1", "W2", "Wdd", "Wb"):
            continue
        assert p.grad is not None and p.grad.abs().max() > 0, name
        direction = torch.randn(p.shape, generator=g, dtype=p.dtype)
        expected = directional_derivative(model, idx, p, direction, eps=1e-3 * p.std().item())
        actual = (p.grad * direction).sum()
        check(f"dcmha {name}: autograd == finite differences (rel)", actual / expected, torch.ones(()), 1e-4)


ABLATIONS = {
    "pre only": (dict(dc_post=False), [0, 1]),
    "post only": (dict(dc_pre=False), [2, 3]),
    "query-wise only": (dict(dc_key_wise=False), [0, 2]),
    "key-wise only": (dict(dc_query_wise=False), [1, 3]),
    "pre, key-wise": (dict(dc_post=False, dc_query_wise=False), [1]),
}


@pytest.mark.parametrize("label", list(ABLATIONS))
def test_dcmha_ablation_flags_drop_exactly_their_sets(label):
    """An ablated model == the full model with the dropped sets' W2 and Wdd zeroed; it has no
    parameters for them (DDP would find them unused). Sets: [pre-q, pre-k, post-q, post-k]."""
    overrides, kept = ABLATIONS[label]
    full = perturb(make_model("dcmha", dc_static=True), scale=0.3)
    ablated = make_model("dcmha", dc_static=True, **overrides)
    assert all(n.split(".")[-1] in ("W1", "W2", "Wdd", "Wb") for n in copy_weights(full, ablated))
    stages = ablated.blocks[0].attn.stages
    with torch.no_grad():
        for fb, ab in zip(full.blocks, ablated.blocks):
            fa, aa = fb.attn, ab.attn
            aa.W1.copy_(fa.W1[:, kept])
            aa.W2.copy_(fa.W2[kept])
            aa.Wdd.copy_(fa.Wdd[:, kept])
            aa.Wb.copy_(fa.Wb[[("pre", "post").index(s) for s in stages]])
            dropped = [n for n in range(4) if n not in kept]
            fa.W2[dropped] = 0
            fa.Wdd[:, dropped] = 0
            if len(stages) == 1:  # the dropped stage's static W_b, too
                fa.Wb[1 - ("pre", "post").index(stages[0])] = 0
    idx = tokens()
    check(f"dcmha {label} == full with the other sets zeroed", ablated(idx)[0], full(idx)[0], 1e-12)
    n_sets = len(kept)
    assert ablated.blocks[0].attn.W2.size(0) == n_sets


def test_dcmha_config_validation():
    for bad in (dict(dc_pre=False, dc_post=False), dict(dc_query_wise=False, dc_key_wise=False),
                dict(dc_rank=0), dict(dc_hidden_mult=0), dict(dc_hidden=-1), dict(query_chunk=-1),
                dict(window=-2), dict(window_pattern=""), dict(window_pattern="LX"), dict(dc_compose="fused"),
                dict(dc_compose="kernel", dc_static=True)):
        with pytest.raises(ValueError):
            dcmha.DCMHAConfig(**TINY, **bad).validate()
    config = dcmha.DCMHAConfig(**TINY)
    assert (config.dc_rank, config.dc_hidden_dim, config.qk_norm, config.dc_static) == (2, 4 * TINY["n_head"], True, False)
    assert dcmha.DCMHAConfig(**TINY, dc_hidden=9).dc_hidden_dim == 9


def test_dcmha_decode_caches_key_factors_for_every_key():
    model = perturb(make_model("dcmha", window=4, query_chunk=3))
    idx = tokens()
    with torch.no_grad():
        full, _ = model(idx)
        cache = gpt.KVCache(model.config.n_layer)
        stepped = torch.cat([model(idx[:, t:t + 1], cache=cache)[0] for t in range(idx.size(1))], dim=1)
    check("dcmha one token at a time (window 4) == full forward", stepped, full, 1e-10)
    R, N = model.config.dc_rank, model.config.n_head
    assert cache.layers[0]["dc_key_factors"].shape == (2, idx.size(1), 2, 2 * R + 1, N)


@pytest.mark.parametrize("float32_scores", [True, False])
def test_dcmha_float32_scores_under_bf16_autocast(float32_scores):
    """dc_float32_scores: under bf16 autocast the attention (logits, both Composes, softmax,
    probs @ v) runs in float32, while the projections stay in bf16; off, it runs in bf16 as the
    authors' code does. Either way the logits stay close to the all-float32 model's."""
    model = perturb(make_model("dcmha", dtype=torch.float32, dc_float32_scores=float32_scores))
    seen = []
    for block in model.blocks:
        attend_chunk = block.attn.attend_chunk
        block.attn.attend_chunk = lambda q, k, v, *rest, f=attend_chunk: seen.append((q.dtype, k.dtype)) or f(q, k, v, *rest)
    idx = tokens()
    ref_logits, _ = model(idx)
    seen.clear()
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        logits, _ = model(idx)
    want = torch.float32 if float32_scores else torch.bfloat16
    assert seen and all(dtypes == (want, want) for dtypes in seen), f"attention ran in {set(seen)}, not {want}"
    assert logits.dtype == torch.bfloat16  # the lm head: still autocast's
    rel = ((logits.float() - ref_logits).norm() / ref_logits.norm()).reshape(1)
    check(f"dcmha dc_float32_scores={float32_scores}: bf16 autocast vs float32, relative logits error",
          rel, torch.zeros(1), BF16_TOLERANCE)


def test_dcmha_attention_has_no_graph_breaks():
    model = make_model("dcmha", dtype=torch.float32, window=4, query_chunk=8, dc_static=True, n_layer=2)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(tokens())
    print(f"PASS  dcmha torch._dynamo.explain: {explanation.graph_count} graph, {explanation.graph_break_count} breaks")
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons



# -----------------------------------------------------------------------------
# DCA (dca.py): DeepCrossAttention

L = TINY["n_layer"]


def grn_modules(model):
    return [m for m in model.modules() if isinstance(m, dca.GRN)]


def perturb_grns(model, scale=0.5, seed=2):
    """Move every GRN parameter far from its init (b = 1, w = 0, gate norm = identity), so
    that the gates are large and the relus clip for many tokens."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    with torch.no_grad():
        for grn in grn_modules(model):
            for p in grn.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model


def gates_of(grn, s, relu_bias=False):
    """The relu's input for every GRN j of a GRN-v3 module on entry s: w_j·n_j(s) (+ b_j),
    (n_out, B, T) or (n_out, B, T, d) with relu_bias."""
    d = s.size(-1)
    n = lambda j: F.layer_norm(s, (d,), grn.norm_weight[j], grn.norm_bias[j]) if grn.gate_norm else s
    z = torch.stack([(n(j) * grn.w[j]).sum(-1) for j in range(grn.w.size(0))])
    return z[..., None] + grn.b[:, 0, None, None, :] if relu_bias else z


def naive_dca_logits(model, idx):
    """DCA straight from the spec's formulas: the stack a Python list, torch.stack of it at
    every layer, every GRN with its own LayerNorm on the gate input, torch.relu."""
    c = model.config
    d, k = c.n_embd, c.dca_k
    T = idx.size(1)
    ctx = gpt.Context(model.rope_cos[:T], model.rope_sin[:T])
    e = model.tok_emb(idx)
    outputs = []                                   # f_1, f_2, ...

    def stack(t):                                  # S_t, or S_t^(k) of k-DCA; t = L + 1: the final GRN
        if k == 0 or t - 1 <= k:
            entries = [e] + outputs
        else:                                      # [e, f_1 + ... + f_{t-k-1}, f_{t-k}, ..., f_{t-1}]
            entries = [e, sum(outputs[:t - k - 1])] + outputs[t - k - 1:]
        return torch.stack(entries)                # (m, B, T, d)

    def grn(S, module, j):                         # GRN j of a GRN module over the stack S
        b = module.b[j]
        if c.grn == "v1":
            return (b[:, None, None, None] * S).sum(0)
        if c.grn == "v2":
            return (b[:, None, None, :] * S).sum(0)
        n = F.layer_norm(S, (d,), module.norm_weight[j], module.norm_bias[j]) if c.grn_norm else S
        z = (n * module.w[j]).sum(-1, keepdim=True)                  # w·n(s_i): (m, B, T, 1)
        b = b[:, None, None, :]
        coef = torch.relu(b + z) if c.grn_relu_bias else b + torch.relu(z)
        return (S * coef).sum(0)

    for t, block in enumerate(model.blocks, start=1):
        S = stack(t)
        if c.dca_qkv:
            q_in, k_in, v_in = (grn(S, block.grn, j) for j in range(3))
            a = block.attn(block.norm_q(q_in), ctx, k_in=block.norm_k(k_in), v_in=block.norm_v(v_in))
        else:
            q_in = grn(S, block.grn, 0)
            a = block.attn(block.norm_q(q_in), ctx)
        outputs.append(a + block.mlp(block.norm_m(q_in + a)))
    x = grn(stack(c.n_layer + 1), model.grn_f, 0)
    return model.lm_head(model.norm_f(x))[..., :c.vocab_size]


def gpt_and_dca(**overrides):
    """A perturbed gpt and a DCA at its init (b = 1, w = 0) carrying gpt's weights: the
    attention and MLP by name, norm_1 -> norm_q/k/v, norm_2 -> norm_m."""
    base, model, missing = gpt_and_multiway("dca", **overrides)
    assert all(".grn" in n or n.startswith("grn_f") or ".norm_" in n for n in missing), missing
    return base, model


INIT_CASES = [{}, {"dca_k": 1}, {"dca_k": 2}, {"dca_k": L}, {"grn": "v1"}, {"grn": "v2"},
              {"grn_relu_bias": True}, {"grn_norm": False}, {"dca_qkv": False, "dca_k": 2},
              {"mlp": "gelu"}]


@pytest.mark.parametrize("overrides", INIT_CASES, ids=str)
def test_dca_at_init_equals_gpt(overrides):
    base, model = gpt_and_dca(**overrides)
    idx = tokens()
    with torch.no_grad():
        expected, _ = base(idx)
        actual, _ = model(idx)
    check(f"dca {overrides} at init == gpt (copied weights)", actual, expected, 1e-12)


@pytest.mark.parametrize("k", [L, L + 3])
def test_dca_k_at_least_n_layer_equals_full_dca(k):
    full = perturb_grns(perturb(make_model("dca")))
    k_dca = make_model("dca", dca_k=k)
    k_dca.load_state_dict(full.state_dict())   # same parameters, same shapes
    idx = tokens()
    with torch.no_grad():
        check(f"{k}-DCA (n_layer={L}) == full DCA", k_dca(idx)[0], full(idx)[0], 0)


def check_efficient_equals_naive(label, model, naive_logits):
    """model(idx) == naive_logits(model, idx), a torch.stack version of the same model, for the
    logits AND every parameter's gradient (relative to its size) of a cross-entropy loss, in
    float64 on one batch; -> (idx, the model's logits) for further checks."""
    idx = tokens()
    targets = torch.roll(idx, -1, dims=1)
    loss = lambda logits: F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))  # noqa: E731
    logits, _ = model(idx)  # (gpt.py's loss is in float32; here both losses stay in float64)
    loss(logits).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    naive = naive_logits(model, idx)
    loss(naive).backward()
    check(f"{label}: efficient == naive, logits", logits, naive, 1e-10)
    diff = max((grads[n] - p.grad).abs().max().item() / (1 + p.grad.abs().max().item())
               for n, p in model.named_parameters())
    check(f"{label}: efficient == naive, all gradients (relative)", torch.tensor(diff), torch.tensor(0.0), 1e-10)
    return idx, logits


NAIVE_CASES = [{"grn": v, "dca_k": k} for v in ("v1", "v2") for k in (0, 1, 2)] + [
    {"dca_k": k, "grn_relu_bias": relu_bias, "grn_norm": norm}
    for k in (0, 1, 2) for relu_bias in (False, True) for norm in (True, False)] + [
    {"dca_qkv": False}, {"dca_qkv": False, "dca_k": 1, "grn_relu_bias": True}] + [
    # the GRN sums as dca_kernels.py's custom op (on CUDA its Triton kernels, here its torch path)
    {"grn_kernel": True}, {"grn_kernel": True, "dca_k": 2}, {"grn_kernel": True, "grn": "v1"},
    {"grn_kernel": True, "grn": "v2", "dca_k": 1}, {"grn_kernel": True, "dca_qkv": False}]


@pytest.mark.parametrize("overrides", NAIVE_CASES, ids=str)
def test_dca_efficient_equals_naive_reference(overrides):
    """The stack-free path (StackSum, the gate norm once per entry, the running sum of k-DCA)
    == the spec's formulas with torch.stack, for the logits AND every parameter's gradient."""
    model = perturb_grns(perturb(make_model("dca", **overrides))).train()
    idx, logits = check_efficient_equals_naive(f"dca {overrides}", model, naive_dca_logits)
    if model.config.grn == "v3":  # the perturbation really makes the relus clip (and pass) somewhere
        e = model.tok_emb(idx)
        z = torch.cat([gates_of(grn, e, relu_bias=model.config.grn_relu_bias).flatten() for grn in grn_modules(model)])
        assert (z < 0).any() and (z > 0).any()


def test_dca_stacksum_gradcheck():
    """StackSum's hand-written backward against finite differences, with and without gates,
    for vector b (GRN-v2/v3) and scalar b (GRN-v1)."""
    g = torch.Generator(DEVICE).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    m, n_out, B, T, d = 3, 2, 2, 3, 4
    stack = [rand(B, T, d) for _ in range(m)]
    for b, r in [(rand(n_out, m, d), rand(m, B, T, n_out)), (rand(n_out, m, d), None), (rand(n_out, m), None)]:
        assert torch.autograd.gradcheck(lambda b, r, *s: dca.StackSum.apply(b, r, *s), (b, r, *stack))
    print("PASS  StackSum backward == finite differences (gradcheck)")


@pytest.mark.parametrize("overrides", [{}, {"grn": "v1"}, {"grn": "v2", "dca_k": 2}, {"dca_qkv": False}], ids=str)
def test_dca_no_grad_sums_equal_stacksum(overrides):
    """Under torch.no_grad the GRNs use plain sums instead of StackSum: the same numbers."""
    model = perturb_grns(make_model("dca", **overrides))
    idx = tokens()
    with_grad, _ = model(idx)
    with torch.no_grad():
        without, _ = model(idx)
    check(f"dca {overrides}: no_grad plain sums == StackSum", without, with_grad, 1e-12)


def test_dca_gate_w_trains_from_its_init():
    """At the real init (w = 0) every gate sits at relu(0). torch.relu's derivative there is 0
    and would leave w at 0 forever; gate_relu's is 1, so w gets a gradient at step 0 — and
    the gate norm's scale and bias get theirs from step 1 on (their gradient carries a factor w)."""
    model = make_model("dca").train()
    idx = tokens()
    targets = torch.roll(idx, -1, dims=1)

    def grads():
        """max |dL/dw_j| for every GRN j (each row of each GRN module's w), and the largest
        gradient of any gate-norm parameter."""
        model.zero_grad()
        model(idx, targets)[1].backward()
        grns = grn_modules(model)
        w = torch.cat([grn.w.grad.abs().amax(-1) for grn in grns])          # (3 L + 1,)
        norm = max(p.grad.abs().max() for grn in grns for p in (grn.norm_weight, grn.norm_bias))
        return w, norm

    w, norm = grads()
    print(f"      at init: min over GRNs of max|dL/dw| = {w.min():.2e}; max|dL/d gate norm| = {norm:.1e}")
    assert len(w) == 3 * L + 1 and w.min() > 0, "some GRN's w gets no gradient at init"
    relu = dca.gate_relu
    try:  # what torch.relu would do
        dca.gate_relu = torch.relu
        w, _ = grads()
    finally:
        dca.gate_relu = relu
    check("with torch.relu (relu'(0) = 0) w would get no gradient at init", w, torch.zeros_like(w), 0)


def test_dca_training_opens_the_gates():
    """A few AdamW steps from the real init (the optimizer train.py builds): every w leaves 0,
    the gates open for some tokens, and the loss goes down."""
    model = make_model("dca", dtype=torch.float32).train()
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-3, betas=(0.9, 0.98))
    idx = tokens(B=4)
    targets = torch.roll(idx, -1, dims=1)
    losses = []
    for _ in range(10):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    grns = grn_modules(model)
    w_min = min(grn.w.abs().max().item() for grn in grns)
    e = model.tok_emb(idx)
    open_share = torch.cat([gates_of(grn, e).flatten() > 0 for grn in grns]).double().mean()
    print(f"      after 10 steps: min over GRNs of max|w| = {w_min:.1e}; gates open for "
          f"{open_share:.0%} of (token, GRN) on the embedding; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert w_min > 1e-3 and 0 < open_share < 1 and losses[-1] < losses[0]


def test_dca_grn_parameters_get_no_weight_decay():
    model = make_model("dca")
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.98))
    decayed = {id(p) for group in opt.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    grn_params = [p for grn in grn_modules(model) for p in grn.parameters()]
    assert grn_params and not any(id(p) in decayed for p in grn_params)
    assert any(id(p) in decayed for p in model.blocks[0].attn.parameters())


def test_dca_parameter_counts_match_the_paper():
    """Sec. 4's ablation at 6 layers, d = 512: GRN-v3 adds 0.03M parameters, DCA 0.08M. Ours:
    GRN-v3 0.025M; DCA 0.071M (our q/k/v norms are RMSNorms without bias; with the paper's
    presumably LayerNorm-with-bias norms it would be 0.077M)."""
    shape = dict(n_layer=6, n_embd=512, n_head=8, vocab_size=256, block_size=16)
    n = lambda name, **kw: gpt.MODELS[name][1](gpt.MODELS[name][0](model=name, **shape, **kw)).num_params()
    base = n("gpt")
    grn_v3, full = n("dca", dca_qkv=False) - base, n("dca") - base
    print(f"      extra parameters: GRN-v3 {grn_v3 / 1e6:.3f}M, DCA {full / 1e6:.3f}M")
    assert round(grn_v3 / 1e6, 2) == 0.03 and 0.07 <= full / 1e6 <= 0.08


def test_dca_decode_of_k_dca_crosses_the_sum_slot():
    """KV-cache decoding with k = 1 (every block past the second reads the sum slot)."""
    model = perturb_grns(perturb(make_model("dca", dca_k=1)))
    idx = tokens()
    with torch.no_grad():
        check("1-DCA: KV-cache decode == full forward (perturbed GRNs)", decode_logits(model, idx), model(idx)[0], 1e-10)


def test_dca_config_rejects_bad_values():
    for bad in ({"grn": "v4"}, {"dca_k": -1}):
        with pytest.raises(ValueError):
            dca.DCAConfig(**bad).validate()



if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s", "-p", "no:cacheprovider", *sys.argv[1:]]))

"""
The equivalence section of MUDDFormer (muddformer.py), to be merged into test_equivalence.py:
there MUDD_CASES joins CASES and test_muddformer_shared_checks goes away.

    python -m pytest -q -s tests/test_equivalence_muddformer.py
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import gpt
import test_equivalence as shared
from test_equivalence import (make_model, perturb, tokens, check, check_efficient_equals_naive,
                              decode_logits, TINY, DEVICE)

import muddformer  # noqa: E402  (registered by all_models)

# -----------------------------------------------------------------------------
# MUDDFormer (muddformer.py): multiway dynamic dense connections

L = TINY["n_layer"]

# the settings that take their own code path, for the shared checks (the default is in CASES)
MUDD_CASES = [("muddformer", o) for o in (
    {"mudd_norm": True},
    {"mudd_streams": "shared"},
    {"mudd_streams": "shared", "mudd_dynamic": False},          # DenseFormer
    {"mudd_dynamic": False},
    {"mudd_streams": "vr", "mudd_layers": 2},                    # ~ modded-nanogpt record 81
    {"mudd_streams": "kvr", "mudd_layers": 1},                   # -Q; only DA_L
    {"mudd_streams": "qkv"},                                     # no r: no DA_L
    {"mudd_streams": "r", "mudd_norm": True},
    {"mudd_norm": True, "mudd_streams": "shared", "mudd_hidden": 8},
    {"n_layer": 1},
    {"mlp": "gelu", "tie_embeddings": False, "qk_norm": True, "mudd_realloc": False},
)]


@pytest.mark.parametrize("case", MUDD_CASES, ids=shared.case_id)
def test_muddformer_shared_checks(case):
    """Causality, KV-cache decode == full forward, greedy generate with == without the cache,
    and every parameter gets a gradient, for each of MUDD_CASES."""
    shared.run_shared_checks(case)


def das(model):
    return list(model.das.values())


def perturb_das(model, scale=0.5, seed=2):
    """Move W2 and a far from their init (W2 = 0, a one-hot), so that every way mixes every
    entry with large signed, token-dependent weights."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    with torch.no_grad():
        for da in das(model):
            for p in [da.a] + ([da.w2.weight] if da.dynamic else []):
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model


def gpt_and_mudd(**overrides):
    """A perturbed gpt and a MUDDFormer at its init without re-allocation, carrying gpt's
    weights: the attention and MLP by name, norm_1 -> norm_q/k/v, norm_2 -> norm_m."""
    base, model, missing = shared.gpt_and_multiway("muddformer", mudd_realloc=False, **overrides)
    assert all(n.startswith(("das.", "stack_norms.")) or ".norm_" in n for n in missing), missing
    return base, model


INIT_CASES = [{}, {"mudd_norm": True}, {"mudd_streams": "shared"}, {"mudd_dynamic": False},
              {"mudd_layers": 1}, {"mudd_layers": 2}, {"mudd_streams": "vr"}, {"mlp": "gelu"}]


@pytest.mark.parametrize("overrides", INIT_CASES, ids=str)
def test_muddformer_at_init_equals_gpt(overrides):
    """§3's init (W2 = 0, a one-hot; with mudd_norm a = 0 and the post-norm of 0 is 0) makes
    every way return X_i: the model is gpt.py's, exactly, in float64."""
    base, model = gpt_and_mudd(**overrides)
    idx = tokens()
    with torch.no_grad():
        expected, _ = base(idx)
        check(f"muddformer {overrides} at init == gpt (copied weights)", model(idx)[0], expected, 0)
        different = (perturb_das(model)(idx)[0] - expected).abs().max()
    assert different > 1e-4, "moving W2 and a changed nothing"


@pytest.mark.parametrize("k", [L, L + 3])
def test_muddformer_layers_at_least_n_layer_equals_every_da(k):
    full = perturb_das(perturb(make_model("muddformer")))
    some = make_model("muddformer", mudd_layers=k)
    some.load_state_dict(full.state_dict())       # the same parameters, the same shapes
    idx = tokens()
    with torch.no_grad():
        check(f"muddformer mudd_layers={k} (n_layer={L}) == mudd_layers=0", some(idx)[0], full(idx)[0], 0)


def naive_mudd_logits(model, idx):
    """MUDDFormer from the spec's formulas: the stack torch.stack'ed at every DA, the weights
    W = GELU(rmsnorm(X_i) W1) W2 + a written out, the ways one einsum."""
    c = model.config
    B, T = idx.shape
    ctx = gpt.Context(model.rope_cos[:T], model.rope_sin[:T])
    xs = [model.tok_emb(idx)]                                          # X_0, X_1, ...
    q_in = k_in = v_in = r_in = xs[0]
    for l, block in enumerate(model.blocks):
        if block.norm_k is None:
            a = r_in + block.attn(block.norm_q(q_in), ctx)
        else:
            a = r_in + block.attn(block.norm_q(q_in), ctx, k_in=block.norm_k(k_in), v_in=block.norm_v(v_in))
        x = a + block.mlp(block.norm_m(a))
        xs.append(x)
        q_in = k_in = v_in = r_in = x
        if str(l) not in model.das:
            continue
        da = model.das[str(l)]
        S = torch.stack([model.stack_norms[j](s) if c.mudd_norm else s for j, s in enumerate(xs)])  # (m, B, T, D)
        if c.mudd_dynamic:
            h = F.rms_norm(x, (c.n_embd,), da.gen_norm.weight if c.mudd_norm else None, 1e-6)
            W = (F.gelu(h @ da.w1.weight.T) @ da.w2.weight.T).view(B, T, da.C, len(xs)) + da.a
        else:
            W = da.a.expand(B, T, da.C, len(xs))
        mixed = torch.einsum("LBTD,CBTL->CBTD", S, W.permute(2, 0, 1, 3))   # (C, B, T, D)
        ways = "r" if l == c.n_layer - 1 and c.mudd_streams != "shared" else c.mudd_streams
        if ways == "shared":
            q_in = k_in = v_in = r_in = x + model.das[str(l)].post_norm(mixed[0]) if c.mudd_norm else mixed[0]
            continue
        for way, y in zip([w for w in "qkvr" if w in ways], mixed):
            if c.mudd_norm:
                y = x + (da.post_norm(y) if way == "r" else y)
            if way == "q":
                q_in = y
            elif way == "k":
                k_in = y
            elif way == "v":
                v_in = y
            else:
                r_in = y
    return model.lm_head(model.norm_f(r_in))[..., :c.vocab_size]


NAIVE_CASES = [{}, {"mudd_norm": True}, {"mudd_streams": "shared"}, {"mudd_streams": "shared", "mudd_norm": True},
               {"mudd_dynamic": False}, {"mudd_streams": "vr", "mudd_layers": 2}, {"mudd_streams": "qkv"},
               {"mudd_streams": "kvr", "mudd_hidden": 5}]


@pytest.mark.parametrize("overrides", NAIVE_CASES, ids=str)
def test_muddformer_efficient_equals_naive_reference(overrides):
    """The list stack and the addcmul chains == the stacked einsum, for the logits AND every
    parameter's gradient, with W2 and a far from their init."""
    model = perturb_das(perturb(make_model("muddformer", **overrides))).train()
    check_efficient_equals_naive(f"muddformer {overrides}", model, naive_mudd_logits)


@pytest.mark.parametrize("norm", [False, True])
def test_muddformer_W1_gets_no_gradient_at_init(norm):
    """W2 = 0 cuts W1 (and, with PrePostDANorm, every DA norm's scale) off the loss at step 0;
    W2 and a do get a gradient, so training moves them first."""
    model = make_model("muddformer", mudd_norm=norm).train()
    idx = tokens()
    model(idx, torch.roll(idx, -1, dims=1))[1].backward()
    zero = [da.w1.weight for da in das(model)]
    if norm:
        zero += [da.gen_norm.weight for da in das(model)] + [n.weight for n in model.stack_norms]
        zero += [da.post_norm.weight for da in das(model) if hasattr(da, "post_norm")]
    grad = torch.cat([p.grad.flatten() for p in zero])
    check(f"muddformer mudd_norm={norm}: W1{' and the DA norms' if norm else ''} get gradient 0 at init",
          grad, torch.zeros_like(grad), 0)
    assert all(da.w2.weight.grad.abs().max() > 0 and da.a.grad.abs().max() > 0 for da in das(model))


@pytest.mark.parametrize("n_layer,n_embd,mlp", [(4, 32, "swiglu"), (6, 384, "swiglu"), (12, 768, "swiglu"),
                                                (5, 64, "gelu"), (2, 32, "swiglu"), (1, 32, "swiglu")])
def test_muddformer_reallocation_widths(n_layer, n_embd, mlp):
    """§2.4: FFN widths grow 0.5 -> 1.5 D_f with depth, multiples of 64, summing to L·D_f
    (± 64); L = 1 keeps D_f."""
    config = muddformer.MUDDConfig(**{**TINY, "n_layer": n_layer, "n_embd": n_embd, "mlp": mlp})
    model = muddformer.MUDDFormer(config)
    widths = [block.mlp.c_proj.in_features for block in model.blocks]
    d_f = gpt.MLP.default_hidden(config)
    print(f"      L={n_layer} d={n_embd} {mlp}: D_f {d_f}, widths {widths}")
    assert widths == [config.ffn_hidden(i) for i in range(n_layer)]
    assert all(w % 64 == 0 for w in widths) and widths == sorted(widths)
    assert abs(sum(widths) - n_layer * d_f) <= 64
    if n_layer == 1:
        assert widths == [d_f]
    else:
        assert abs(widths[0] - d_f / 2) <= 32 and abs(widths[-1] - 1.5 * d_f) <= 32
    off = muddformer.MUDDConfig(**{**TINY, "n_layer": n_layer, "n_embd": n_embd, "mlp": mlp, "mudd_realloc": False})
    assert [off.ffn_hidden(i) for i in range(n_layer)] == [d_f] * n_layer


def test_muddformer_n_layer_1_builds_with_one_final_da():
    model = perturb(make_model("muddformer", n_layer=1))
    assert list(model.das) == ["0"] and (model.das["0"].C, model.das["0"].m) == (1, 2)
    logits, _ = model(tokens())
    assert logits.shape == (2, TINY["block_size"], TINY["vocab_size"]) and torch.isfinite(logits).all()


def test_muddformer_structure_follows_the_options():
    """Which DAs exist, how many ways and entries each mixes, its generator width K (the
    authors' rule), and which blocks have three attention norms."""
    def layout(**overrides):
        m = make_model("muddformer", **overrides)
        return ({l: (da.C, da.m, da.w1.out_features if da.dynamic else 0) for l, da in m.das.items()},
                [b.norm_k is not None for b in m.blocks])
    assert layout() == ({"0": (4, 2, 64), "1": (4, 3, 64), "2": (4, 4, 64), "3": (1, 5, 64)},
                        [False, True, True, True])
    assert layout(n_layer=16)[0]["15"] == (1, 17, 128) and layout(n_layer=16)[0]["14"] == (4, 16, 128)
    assert layout(mudd_layers=2, mudd_streams="vr") == ({"2": (2, 4, 64), "3": (1, 5, 64)}, [False, False, False, True])
    assert layout(mudd_streams="qkv", mudd_layers=1) == ({"2": (3, 4, 64)}, [False, False, False, True])
    assert layout(mudd_streams="shared", mudd_hidden=7)[0] == {str(l): (1, l + 2, 7) for l in range(L)}
    assert layout(mudd_streams="r")[1] == [False] * L
    assert layout(mudd_dynamic=False)[0]["3"] == (1, 5, 0)
    model = make_model("muddformer", mudd_norm=True, mudd_streams="vr", mudd_layers=2)
    assert len(model.stack_norms) == L + 1 and hasattr(model.das["3"], "post_norm")
    assert all(not da.a.detach().any() for da in das(model))
    assert torch.equal(make_model("muddformer").das["1"].a, torch.tensor([[0.0, 0, 1]] * 4, dtype=torch.float64))


def test_muddformer_flops_per_token_matches_flop_counter():
    """flops_per_token() / 3 == what FlopCounterMode counts in one forward (the matmuls, and
    the attention's as bmm under the math backend) + the mixes, which it cannot see:
    2 FLOPs per (way, entry, element)."""
    for overrides in ({}, {"mudd_streams": "shared", "mudd_dynamic": False}, {"mudd_streams": "qkv", "mudd_hidden": 9},
                      {"mudd_streams": "vr", "mudd_layers": 2, "mudd_norm": True}, {"n_layer": 1}):
        model = make_model("muddformer", dtype=torch.float32, **overrides)
        c = model.config
        idx = tokens(B=2)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            model(idx)
        counted = counter.get_total_flops() / idx.numel()
        ways = 1 if c.mudd_streams == "shared" else len(c.mudd_streams)
        mixes = sum(2 * (1 if l == c.n_layer - 1 else ways) * (l + 2) * c.n_embd for l in c.da_layers())
        forward = model.flops_per_token(idx.size(1)) / 3
        print(f"      {overrides}: flops_per_token/3 {forward:,.0f}, counted {counted:,.0f} + mixes {mixes:,}")
        assert abs(forward - counted) <= 0.03 * counted
        assert forward - counted == mixes


def test_muddformer_kv_cache_holds_only_k_and_v():
    idx = tokens(T=11)
    sizes = {}
    for name in ("gpt", "muddformer"):
        cache = gpt.KVCache(L)
        with torch.no_grad():
            make_model(name)(idx, cache=cache)
        sizes[name] = cache.nbytes()
        assert [sorted(d) for d in cache.layers] == [["k", "v"]] * L
    assert sizes["muddformer"] == sizes["gpt"]


def test_muddformer_decode_token_by_token():
    model = perturb_das(perturb(make_model("muddformer", mudd_norm=True)))
    idx = tokens()
    with torch.no_grad():
        stepped = decode_logits(model, idx, steps=(1,) * (idx.size(1) - 1))
        check("muddformer one token at a time == full forward (perturbed DAs)", stepped, model(idx)[0], 1e-10)


def test_muddformer_prior_a_gets_no_weight_decay():
    model = make_model("muddformer")
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95))
    decayed = {id(p) for group in opt.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    assert not any(id(da.a) in decayed for da in das(model))
    assert all(id(da.w1.weight) in decayed and id(da.w2.weight) in decayed for da in das(model))


def test_muddformer_config_rejects_bad_values():
    for bad in ({"mudd_streams": ""}, {"mudd_streams": "qq"}, {"mudd_streams": "qkvm"}, {"mudd_streams": "Shared"},
                {"mudd_hidden": -1}, {"mudd_layers": -1}, {"mudd_streams": "qkv", "n_layer": 1}):
        with pytest.raises(ValueError):
            muddformer.MUDDConfig(**bad).validate()
    assert muddformer.MUDDConfig(mudd_streams="rv").ways == "vr"


@pytest.mark.parametrize("overrides", [{}, {"mudd_norm": True, "mudd_streams": "vr"}], ids=str)
def test_muddformer_has_no_graph_breaks(overrides):
    model = make_model("muddformer", dtype=torch.float32, n_layer=2, **overrides)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(tokens(), torch.roll(tokens(), -1, dims=1))
    print(f"PASS  muddformer {overrides} torch._dynamo.explain: {explanation.graph_count} graph, "
          f"{explanation.graph_break_count} breaks")
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons

"""
The equivalence section of AttnRes (attnres.py), to be merged into test_equivalence.py:
there ATTNRES_CASES joins CASES and test_attnres_shared_checks goes away.

    python -m pytest -q -s tests/test_equivalence_attnres.py
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import gpt
import test_equivalence as shared
from test_equivalence import (make_model, perturb, copy_weights, tokens, check, check_efficient_equals_naive,
                              decode_logits, TINY)

import attnres  # noqa: E402  (registered by all_models)

# -----------------------------------------------------------------------------
# AttnRes (attnres.py): attention residuals

L = TINY["n_layer"]
N_SUB = 2 * L  # sublayers; reader N_SUB is the final mix

# the settings that take their own code path, for the shared checks (the default is in CASES)
ATTNRES_CASES = [("attnres", o) for o in (
    {"attnres_block": 1},
    {"attnres_block": 2},
    {"attnres_block": 3},                                        # a shorter last block
    {"attnres_block": 2 * L},                                    # one block: e and a partial
    {"attnres_gate": "sigmoid"},
    {"attnres_key_norm": False},
    {"attnres_key_scale": False},
    {"attnres_block": 3, "attnres_gate": "sigmoid", "attnres_key_norm": False, "attnres_key_scale": False},
    {"n_layer": 1},
    {"mlp": "gelu", "tie_embeddings": False, "qk_norm": True},
)]


@pytest.mark.parametrize("case", ATTNRES_CASES, ids=shared.case_id)
def test_attnres_shared_checks(case):
    """Causality, KV-cache decode == full forward, greedy generate with == without the cache,
    and every parameter gets a gradient, for each of ATTNRES_CASES."""
    shared.run_shared_checks(case)


def attnres_modules(model):
    return [m for m in model.modules() if isinstance(m, attnres.AttnRes)]


def perturb_attnres(model, scale=0.5, seed=2):
    """Move every w and γ far from their init (w = 0, γ = 1): |w| ~ 0.5·sqrt(d), so the
    logits w·k spread over several units and α is far from uniform."""
    g = torch.Generator(shared.DEVICE).manual_seed(seed)
    with torch.no_grad():
        for m in attnres_modules(model):
            for p in m.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model


def block_sources(n, S):
    """The sources of every reader r = 0..n (sublayers 0..n-1, then the final mix), each a
    tuple of the outputs it sums: 0 = e, i = v_i (sublayer i's output, 1-based). Written from
    the spec: e, the completed blocks before r, and r's block's partial sum when it is non-empty."""
    S = S or 1
    lists = []
    for r in range(n + 1):
        done = [tuple(range(k * S + 1, (k + 1) * S + 1)) for k in range(r // S)]
        partial = [tuple(range(r // S * S + 1, r + 1))] if r % S else []
        lists.append([(0,)] + done + partial)
    return lists


def naive_attnres_logits(model, idx):
    """AttnRes straight from the paper's formulas: every reader torch.stack-s its sources,
    RMSNorm-s them with its γ (F.rms_norm), and takes einsums; Block sums made from scratch."""
    c = model.config
    d = c.n_embd
    T = idx.size(1)
    ctx = gpt.Context(model.rope_cos[:T], model.rope_sin[:T])
    outputs = [model.tok_emb(idx)]                                   # e, v_1, v_2, ...
    lists = block_sources(2 * c.n_layer, c.attnres_block)

    def reader(r):
        if r == 2 * c.n_layer:
            return model.res_f
        block = model.blocks[r // 2]
        return block.attn_res if r % 2 == 0 else block.mlp_res

    def mix(r):
        V = torch.stack([sum(outputs[i] for i in group) for group in lists[r]])   # (m, B, T, d)
        if r == 0:                                                   # e alone: no weights
            return V[0]
        res = reader(r)
        if c.attnres_key_norm:
            K = F.rms_norm(V, (d,), res.key_scale, eps=1e-6)
        else:
            K = V if res.key_scale is None else V * res.key_scale
        z = torch.einsum("d,mbtd->mbt", res.query, K)
        alpha = z.softmax(0) if c.attnres_gate == "softmax" else z.sigmoid()
        return torch.einsum("mbt,mbtd->btd", alpha, V)

    for j in range(2 * c.n_layer):
        block = model.blocks[j // 2]
        h = mix(j)
        outputs.append(block.attn(block.norm_1(h), ctx) if j % 2 == 0 else block.mlp(block.norm_2(h)))
    return model.lm_head(model.norm_f(mix(2 * c.n_layer)))[..., :c.vocab_size]


def record(model, idx):
    """One forward's e and sublayer outputs [e, v_1, ..., v_2L] and its mixes [h_0, ..., h_2L]
    (the inputs of norm_1, norm_2 and norm_f)."""
    outputs, mixes = [], []
    keep_output = lambda module, args, out: outputs.append(out)  # noqa: E731
    keep_input = lambda module, args: mixes.append(args[0])      # noqa: E731
    hooks = [model.tok_emb.register_forward_hook(keep_output)]
    for block in model.blocks:
        hooks += [block.norm_1.register_forward_pre_hook(keep_input), block.attn.register_forward_hook(keep_output),
                  block.norm_2.register_forward_pre_hook(keep_input), block.mlp.register_forward_hook(keep_output)]
    hooks.append(model.norm_f.register_forward_pre_hook(keep_input))
    with torch.no_grad():
        model(idx)
    for hook in hooks:
        hook.remove()
    return outputs, mixes


def zero_queries(model):
    with torch.no_grad():
        for m in attnres_modules(model):
            m.query.zero_()
    return model


def set_norm_eps(model, eps):
    for module in model.modules():
        if isinstance(module, gpt.RMSNorm):
            module.eps = eps
    return model


INIT_CASES = [{}, {"attnres_block": 1}, {"attnres_block": 2}, {"attnres_block": 3}, {"attnres_block": 2 * L},
              {"attnres_block": 2 * L + 3}, {"attnres_gate": "sigmoid"}, {"attnres_key_norm": False},
              {"attnres_key_scale": False}, {"mlp": "gelu"}]


@pytest.mark.parametrize("overrides", INIT_CASES, ids=str)
def test_attnres_at_init_equals_gpt(overrides):
    """w = 0 and eps = 0 in norm_1, norm_2, norm_f: α is uniform, so each mix is gpt's residual
    sum divided by the number of sources, and the scale-invariant RMSNorms make the logits and
    every shared gradient gpt's, in float64. With gpt's eps (1e-6) the mean's scale shows."""
    base = perturb(make_model("gpt", **{k: v for k, v in overrides.items() if k == "mlp"}))
    model = make_model("attnres", **overrides)
    missing = copy_weights(base, model)
    assert set(missing) == {n for n, _ in model.named_parameters() if "_res." in n or n.startswith("res_f.")}
    idx = tokens()
    different = (model(idx)[0] - base(idx)[0]).abs().max().item()
    for m in (base, model):
        set_norm_eps(m, 0.0)
    grads = []
    for m in (base, model):
        m.zero_grad()
        logits = m(idx)[0]
        F.cross_entropy(logits.flatten(0, 1), torch.roll(idx, -1, dims=1).flatten()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    check(f"attnres {overrides} w = 0, eps = 0 == gpt: logits", model(idx)[0], base(idx)[0], 1e-12)
    diff = max((grads[1][n] - g).abs().max().item() for n, g in grads[0].items())
    check(f"attnres {overrides} w = 0, eps = 0 == gpt: every shared gradient",
          torch.tensor(diff), torch.tensor(0.0), 1e-12)
    print(f"      with eps = 1e-6 the logits differ by {different:.1e}")
    assert different > 1e-5, "the default eps should show the mean's smaller scale"


def test_attnres_block_source_lists():
    """Which sources every reader mixes, written out for S = 2 and 3 (L = 4, 8 sublayers):
    e, the completed blocks, and the current block's partial sum (never an empty one)."""
    e = (0,)
    s2 = [[e], [e, (1,)], [e, (1, 2)], [e, (1, 2), (3,)], [e, (1, 2), (3, 4)], [e, (1, 2), (3, 4), (5,)],
          [e, (1, 2), (3, 4), (5, 6)], [e, (1, 2), (3, 4), (5, 6), (7,)], [e, (1, 2), (3, 4), (5, 6), (7, 8)]]
    s3 = [[e], [e, (1,)], [e, (1, 2)], [e, (1, 2, 3)], [e, (1, 2, 3), (4,)], [e, (1, 2, 3), (4, 5)],
          [e, (1, 2, 3), (4, 5, 6)], [e, (1, 2, 3), (4, 5, 6), (7,)], [e, (1, 2, 3), (4, 5, 6), (7, 8)]]
    assert block_sources(N_SUB, 2) == s2 and block_sources(N_SUB, 3) == s3
    assert block_sources(N_SUB, 1) == [[(i,) for i in range(r + 1)] for r in range(N_SUB + 1)]  # Full
    one_block = [[e]] + [[e, tuple(range(1, r + 1))] for r in range(1, N_SUB + 1)]
    assert block_sources(N_SUB, N_SUB) == block_sources(N_SUB, N_SUB + 3) == one_block
    config = attnres.AttnResConfig(**TINY, attnres_block=3)
    assert [config.sources_read(r) for r in range(1, N_SUB + 1)] == [len(s) for s in s3[1:]]


@pytest.mark.parametrize("block", [0, 2, 3, 2 * L + 3])
@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_attnres_mix_at_w_0_is_the_mean_of_its_sources(block, gate):
    """With w = 0 (and everything else perturbed) each mix the model feeds a norm is the mean
    of exactly block_sources' sources (softmax), or half their sum (sigmoid: α = 1/2)."""
    model = zero_queries(perturb(make_model("attnres", attnres_block=block, attnres_gate=gate)))
    outputs, mixes = record(model, tokens())
    assert len(outputs) == len(mixes) == N_SUB + 1
    for r, sources in enumerate(block_sources(N_SUB, block)):
        summed = [sum(outputs[i] for i in group) for group in sources]
        expected = sum(summed) / len(summed) if gate == "softmax" or r == 0 else sum(summed) / 2
        check(f"attnres S={block} {gate}: reader {r}'s mix at w = 0", mixes[r], expected, 1e-12)


NAIVE_CASES = [{}, {"attnres_block": 2}, {"attnres_block": 3}, {"attnres_block": 2 * L},
               {"attnres_block": 2 * L + 3}, {"attnres_gate": "sigmoid"}, {"attnres_key_norm": False},
               {"attnres_key_scale": False}, {"attnres_block": 3, "attnres_gate": "sigmoid", "attnres_key_norm": False}]


@pytest.mark.parametrize("overrides", NAIVE_CASES, ids=str)
def test_attnres_efficient_equals_naive_reference(overrides):
    """The stack-free path (the sources a list, each key's logits for all its readers in one
    matmul, the norm folded into w) == the formulas with torch.stack, F.rms_norm and einsum,
    after moving w and γ far from their init: the logits AND every parameter's gradient."""
    model = perturb_attnres(perturb(make_model("attnres", **overrides))).train()
    idx, logits = check_efficient_equals_naive(f"attnres {overrides}", model, naive_attnres_logits)
    with torch.no_grad():  # the perturbed w really matter
        assert (zero_queries(model)(idx)[0] - logits).abs().max() > 1e-2


def test_attnres_block_1_equals_full():
    full = perturb_attnres(perturb(make_model("attnres")))
    block_1 = make_model("attnres", attnres_block=1)
    block_1.load_state_dict(full.state_dict())
    idx = tokens()
    with torch.no_grad():
        check("attnres S = 1 == Full (same parameters)", block_1(idx)[0], full(idx)[0], 0)


def test_attnres_w_gets_a_gradient_at_init_and_gamma_none():
    """At the real init dL/dw ≠ 0 for every reader (no dead gate) and dL/dγ = 0 exactly
    (z = w·(γ ⊙ k̂) has dz/dγ = w ⊙ k̂ = 0). The first sublayer reads e alone: no AttnRes."""
    model = make_model("attnres").train()
    idx = tokens()
    model(idx, torch.roll(idx, -1, dims=1))[1].backward()
    readers = model.readers()
    assert model.blocks[0].attn_res is None and len(readers) == N_SUB
    w = torch.stack([m.query.grad.abs().max() for m in readers])
    gamma = torch.stack([m.key_scale.grad.abs().max() for m in readers])
    print(f"      at init: min over readers of max|dL/dw| = {w.min():.2e}, max|dL/dγ| = {gamma.max():.1e}")
    assert w.min() > 0
    check("attnres at init: dL/dγ", gamma, torch.zeros_like(gamma), 0)


@pytest.mark.parametrize("key_scale", [True, False])
def test_attnres_parameters_and_no_weight_decay(key_scale):
    """Extra parameters: w and γ (d each) for readers 1..2L (2L - 1 sublayers and the final
    mix; the first sublayer reads e alone): 2d·2L, d·2L without γ. None gets weight decay."""
    d = TINY["n_embd"]
    model = make_model("attnres", attnres_key_scale=key_scale)
    extra = model.num_params() - make_model("gpt").num_params()
    assert extra == (2 if key_scale else 1) * d * N_SUB, extra
    own = {n for n, _ in model.named_parameters() if "_res." in n or n.startswith("res_f.")}
    names = ["query", "key_scale"] if key_scale else ["query"]
    expected = {f"blocks.{j // 2}.{'attn' if j % 2 == 0 else 'mlp'}_res.{p}" for j in range(1, N_SUB) for p in names}
    assert own == expected | {f"res_f.{p}" for p in names}
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95))
    decayed = {id(p) for group in opt.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    assert not any(id(p) in decayed for m in attnres_modules(model) for p in m.parameters())
    assert id(model.blocks[0].attn.c_q.weight) in decayed


def saved_activations(model, forward, idx):
    """The activations autograd keeps for the backward of forward(idx), in units of one
    (B, T, d) tensor: every distinct storage of at least that size once (a source read by ten
    mixes counts once); the parameters and the small (B, T, sources) logits and α left out."""
    B, T = idx.shape
    unit = B * T * model.config.n_embd
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.nbytes() >= unit * t.element_size():
            storages[s.data_ptr()] = s.nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(idx)
    return sum(storages.values()) / unit


@pytest.mark.parametrize("overrides", [{}, {"attnres_block": 3},
                                       {"attnres_gate": "sigmoid", "attnres_key_norm": False}], ids=str)
def test_attnres_saves_each_source_once(overrides):
    """gpt's activations + at most 2L + 1 (B, T, d) tensors (the sources), for Full and Block
    alike; the torch.stack of the paper's pseudocode saves every source once per reader."""
    idx = tokens(B=3, T=16)
    base_model = make_model("gpt", dtype=torch.float32).train()
    base = saved_activations(base_model, base_model, idx)
    model = perturb_attnres(make_model("attnres", dtype=torch.float32, **overrides)).train()
    ours = saved_activations(model, model, idx)
    naive = saved_activations(model, lambda idx: naive_attnres_logits(model, idx), idx)
    print(f"      saved (B, T, d) units: gpt {base:.1f}, attnres {overrides} {ours:.1f}, with torch.stack {naive:.1f}")
    assert ours <= base + N_SUB + 1
    assert naive > base + N_SUB + 1  # the count would catch a stacking implementation


@pytest.mark.parametrize("block", [2, 3])
def test_attnres_decode_across_block_boundaries(block):
    """Token by token and in chunks, with w and γ far from init: == the full forward. The KV
    cache holds k and v only (each token's mix reads its own sources)."""
    model = perturb_attnres(perturb(make_model("attnres", attnres_block=block)))
    idx = tokens()
    with torch.no_grad():
        full, _ = model(idx)
        check(f"attnres S={block}: token-by-token decode == full forward",
              decode_logits(model, idx, steps=(1,) * (idx.size(1) - 1)), full, 1e-10)
        check(f"attnres S={block}: chunked decode == full forward",
              decode_logits(model, idx, steps=(3, 1, 5, 2)), full, 1e-10)
        cache = gpt.KVCache(L)
        model(idx[:, :7], cache=cache)
    assert all(sorted(layer) == ["k", "v"] for layer in cache.layers)


def counted_forward_flops(model, idx):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(idx)
    return counter.get_total_flops() / idx.numel()


@pytest.mark.parametrize("case", [("attnres", {})] + ATTNRES_CASES, ids=shared.case_id)
def test_attnres_flops_per_token_matches_flop_counter(case):
    """flops_per_token() / 3 (one forward) within 3% of FlopCounterMode's count, and exactly
    that count plus the mix's 2d per (reader, source), which is elementwise work the counter
    does not see (it counts matmuls: the layers, the attention, the key logits)."""
    _, overrides = case
    model = make_model("attnres", dtype=torch.float32, **overrides)
    c = model.config
    idx = tokens(B=2, T=c.block_size)
    counted = counted_forward_flops(model, idx)
    forward = model.flops_per_token(c.block_size) / 3
    pairs = sum(len(s) for s in block_sources(2 * c.n_layer, c.attnres_block)[1:])
    print(f"      {shared.case_id(case)}: counted {counted:.0f}, flops_per_token/3 {forward:.0f} "
          f"({forward / counted - 1:+.1%}), (reader, source) pairs {pairs}")
    assert abs(forward / counted - 1) <= 0.03
    assert forward - counted == 2 * c.n_embd * pairs


def test_attnres_logits_and_mixes_stay_float32_under_bf16_autocast(monkeypatch):
    """Under bf16 autocast the key logits, α and every mix stay float32 (logits or a softmax in
    bf16 are a pitfall of public ports: a bf16 logit of |z| ~ 30 is off by ~0.1); the
    sublayers' matmuls run in bf16."""
    model = perturb_attnres(make_model("attnres", dtype=torch.float32, attnres_block=3), scale=1.0)
    g = torch.Generator(shared.DEVICE).manual_seed(3)
    sources = [torch.randn(2, 16, TINY["n_embd"], generator=g) for _ in range(4)]
    queries = torch.stack([m.folded_query() for m in model.readers()]).detach()      # (2L, d)
    exact_z = [attnres.key_logits(s.double(), queries.double(), True) for s in sources]
    exact = model.double().mix([(s.double(), z, 1) for s, z in zip(sources, exact_z)], 3)
    model.float()
    with torch.autocast(torch.device(shared.DEVICE).type, dtype=torch.bfloat16):
        z = [attnres.key_logits(s, queries, True) for s in sources]
        h = model.mix([(s, z, 1) for s, z in zip(sources, z)], 3)
        in_model = []  # the sources and logits of a whole forward
        key_logits = attnres.key_logits
        monkeypatch.setattr(attnres, "key_logits", lambda s, *a: in_model.append(key_logits(s, *a)) or in_model[-1])
        outputs, mixes = record(model, tokens())
    assert all(t.dtype == torch.float32 for t in z + [h] + mixes + in_model) and outputs[1].dtype == torch.bfloat16
    print(f"      logits up to {max(t.abs().max() for t in exact_z):.1f}")
    check("attnres under bf16 autocast: key logits in float32", torch.cat(z, -1), torch.cat(exact_z, -1), 1e-4)
    check("attnres under bf16 autocast: the mix in float32", h, exact, 1e-4)


@pytest.mark.parametrize("overrides", [{}, {"attnres_block": 3}], ids=str)
def test_attnres_has_no_graph_breaks(overrides):
    model = make_model("attnres", dtype=torch.float32, **overrides).train()
    idx = tokens()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(idx, torch.roll(idx, -1, dims=1))
    print(f"PASS  attnres {overrides} torch._dynamo.explain: {explanation.graph_count} graph, "
          f"{explanation.graph_break_count} breaks")
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def test_attnres_config_rejects_bad_values():
    for bad in ({"attnres_block": -1}, {"attnres_gate": "relu"}, {"attnres_key_norm": "yes"},
                {"attnres_key_scale": 1}):
        with pytest.raises(ValueError):
            attnres.AttnResConfig(**bad).validate()
    attnres.AttnResConfig(attnres_block=2 * L + 3).validate()  # one block: allowed

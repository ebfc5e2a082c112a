"""
The papers' own recipes where ours differ, as config values whose defaults keep our behaviour:
DCA's grn_weight_decay and gate_grad_at_zero (bit-identical at the defaults), ResFormer's
Learnable-ResFormer Plus, and value_residual_lambda given to a mode that never reads it.

    python -m pytest -q -s tests/test_paper_options.py
"""

import pytest
import torch

import dca
import gpt
import resformer
import train
from test_equivalence import make_model, perturb, tokens, check, copy_weights, decode_logits, TINY

L = TINY["n_layer"]


# -----------------------------------------------------------------------------
# DCA: grn_weight_decay, gate_grad_at_zero

def grn_modules(model):
    return [m for m in model.modules() if isinstance(m, dca.GRN)]


def logits_and_grads(model, idx):
    model.zero_grad()
    logits, loss = model(idx, torch.roll(idx, -1, dims=1))
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def decay_of(model):
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.98))
    by_id = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters()}


def test_dca_paper_options_default_to_our_behaviour_bit_for_bit():
    assert (dca.DCAConfig().grn_weight_decay, dca.DCAConfig().gate_grad_at_zero) == (False, 1.0)
    # the general relu at grad 1 is gate_relu itself, forward and backward, zeros included
    z = torch.tensor([-2.0, -0.0, 0.0, 0.0, 1e-30, 3.0], dtype=torch.float64, requires_grad=True)
    upstream = torch.arange(1.0, 7.0, dtype=torch.float64)
    results = []
    for relu in (dca.gate_relu, lambda z: dca.relu_with_grad_at_zero(z, 1.0)):
        out = relu(z)
        (grad,) = torch.autograd.grad(out, z, upstream)
        check("gate relu at grad 1: forward", out, z.detach().clamp_min(0), 0)
        check("gate relu at grad 1: backward (zeros pass the gradient)", grad, upstream * (z >= 0), 0)
        results.append((out.detach(), grad))
    (a, grad_a), (b, grad_b) = results
    assert torch.equal(a, b) and torch.equal(a.signbit(), b.signbit()) and torch.equal(grad_a, grad_b)
    # a model at its defaults == the same model with both options given explicitly, bit for bit,
    # at the real init (every gate exactly at relu(0)) and perturbed
    idx = tokens()
    for label, prepare in (("init", lambda m: m), ("perturbed", perturb)):
        default = prepare(make_model("dca").train())
        explicit = make_model("dca", grn_weight_decay=False, gate_grad_at_zero=1.0).train()
        explicit.load_state_dict(default.state_dict())
        (a, grads_a), (b, grads_b) = logits_and_grads(default, idx), logits_and_grads(explicit, idx)
        check(f"dca defaults == explicit defaults ({label}): logits", a, b, 0)
        for name in grads_a:
            assert torch.equal(grads_a[name], grads_b[name]), name
    # and no GRN parameter is decayed, as before
    decay = decay_of(make_model("dca"))
    assert all(decay[n] == 0.0 for n in decay if ".grn." in n or n.startswith("grn_f."))


@pytest.mark.parametrize("overrides", [{}, {"grn_relu_bias": True, "dca_k": 1}], ids=str)
def test_dca_gate_grad_at_zero_is_the_gradient_of_w_at_init(overrides):
    """At init w = 0, so every gate input is exactly 0: the option sets w's gradient there
    (1 ours, 0.5 jnp.maximum, 0 torch/jax relu: none), and changes no forward value."""
    idx = tokens()
    w_grads, logits = {}, {}
    for g in (1.0, 0.5, 0.0):
        model = make_model("dca", gate_grad_at_zero=g, **overrides).train()
        logits[g], grads = logits_and_grads(model, idx)
        w_grads[g] = torch.cat([grads[n].flatten() for n in grads if n.endswith(".w")])
    check("logits with grad 0.5 at 0 == with grad 1", logits[0.5], logits[1.0], 0)
    check("logits with grad 0 at 0 == with grad 1", logits[0.0], logits[1.0], 0)
    if overrides.get("grn_relu_bias"):  # relu(b + w·n(s)) with b = 1: no gate sits at 0
        check("relu(b + z): w's gradient does not depend on the option", w_grads[0.0], w_grads[1.0], 0)
        return
    assert w_grads[1.0].abs().max() > 0
    check("grad 0.5 at 0: half of w's gradient", w_grads[0.5], 0.5 * w_grads[1.0], 1e-15)
    check("grad 0 at 0 (torch.relu): w gets no gradient at all", w_grads[0.0], torch.zeros_like(w_grads[0.0]), 0)


def test_dca_gate_grad_at_zero_0_leaves_every_gate_dead():
    """The dead-gate reading, reproduced: with torch.relu's derivative w never leaves 0 and
    GRN-v3 trains as GRN-v2; with 0.5 it trains, as with ours."""
    idx = tokens(B=4)
    for g, alive in ((0.0, False), (0.5, True)):
        model = make_model("dca", dtype=torch.float32, gate_grad_at_zero=g).train()
        opt = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-3, betas=(0.9, 0.98))
        for _ in range(3):
            _, loss = model(idx, torch.roll(idx, -1, dims=1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        w = max(grn.w.abs().max().item() for grn in grn_modules(model))
        print(f"      gate_grad_at_zero={g}: max |w| after 3 AdamW steps = {w:.1e}")
        assert (w > 1e-4) if alive else (w == 0.0)


def test_dca_grn_weight_decay_decays_b_and_w_like_the_flax_recipe():
    default, paper = decay_of(make_model("dca")), decay_of(make_model("dca", grn_weight_decay=True))
    grn_names = [n for n in default if ".grn." in n or n.startswith("grn_f.")]
    decayed = sorted(n for n in grn_names if paper[n] > 0)
    assert decayed == sorted(n for n in grn_names if n.endswith((".b", ".w")))
    assert len(decayed) == 2 * (L + 1)                      # b and w of every GRN module
    assert all(paper[n] == 0.0 for n in grn_names if "norm_" in n)  # the gate norms stay undecayed
    assert all(paper[n] == default[n] for n in default if n not in grn_names)
    v1 = decay_of(make_model("dca", grn="v1", grn_weight_decay=True))  # GRN-v1: b only, (n_out, m)
    assert sorted(n for n in v1 if v1[n] > 0 and (".grn." in n or n.startswith("grn_f."))) == \
        sorted(n for n in v1 if n.endswith(".b"))


# -----------------------------------------------------------------------------
# ResFormer: Learnable-ResFormer Plus; value_residual_lambda only where it is read

def test_resformer_plus_is_a_softmax_over_the_layers_times_a_shared_scale():
    model = make_model("resformer", value_residual="learnable_plus")
    check("Plus at init: λ = N", model.lambda_scale, torch.tensor(float(L)), 0)
    check("Plus at init: λ_{n,1} = N / (N - 1) for n = 2..N", model.plus_lambda_1(),
          torch.full((L - 1,), L / (L - 1), dtype=torch.float64), 1e-15)
    assert [b.attn.lambda_2.item() for b in model.blocks[1:]] == [0.5] * (L - 1)
    assert not hasattr(model.blocks[0].attn, "lambda_2"), "layer 1 is V_1 itself: no λ"
    perturb(model)
    # the same mix as the learnable mode with λ1, λ2 set to Plus's values
    learnable = make_model("resformer", value_residual="learnable")
    copy_weights(model, learnable)
    lambda_1 = model.plus_lambda_1()
    check("Plus: the λ_{n,1} sum to λ", lambda_1.sum(), model.lambda_scale, 1e-12)
    with torch.no_grad():
        for n, block in enumerate(learnable.blocks[1:]):
            block.attn.lambda_1.copy_(lambda_1[n])
            block.attn.lambda_2.copy_(model.blocks[n + 1].attn.lambda_2)
    idx = tokens()
    check("Plus == learnable with Plus's λs, same weights", model(idx)[0], learnable(idx)[0], 1e-12)


def test_resformer_plus_trains_every_lambda_decodes_and_decays_none():
    model = perturb(make_model("resformer", value_residual="learnable_plus")).train()
    idx = tokens()
    _, loss = model(idx, torch.roll(idx, -1, dims=1))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not no_grad, no_grad
    decay = decay_of(model)
    lambdas = [n for n in decay if "lambda" in n]
    assert sorted(lambdas) == sorted(["lambda_scale", "lambda_logits"] + [f"blocks.{i}.attn.lambda_2" for i in range(1, L)])
    assert all(decay[n] == 0.0 for n in lambdas)
    model.eval()
    with torch.no_grad():
        full, _ = model(idx)
        check("Plus: KV-cache decode == full forward", decode_logits(model, idx), full, 1e-10)
        changed = idx.clone()
        changed[:, 16:] = (changed[:, 16:] + 1) % TINY["vocab_size"]
        check("Plus: future tokens leave earlier logits unchanged", model(changed)[0][:, :16], full[:, :16], 1e-12)
    prompt = tokens(T=5)
    n_new = TINY["block_size"] - 5
    check("Plus: greedy generate with cache == without",
          model.generate(prompt, n_new, temperature=0), model.generate(prompt, n_new, temperature=0, use_cache=False), 0)


@pytest.mark.parametrize("mode", ["identity", "learnable", "learnable_plus"])
def test_value_residual_lambda_with_a_mode_that_ignores_it_is_an_error(mode):
    for value in (2.0, 5.0, 0.0):  # 2.0 too: "given" is not "different from the default"
        with pytest.raises(ValueError, match="value_residual_lambda is only read by"):
            make_model("resformer", value_residual=mode, value_residual_lambda=value)
    # from train.py's flags: only flags given explicitly reach the config (train.py reports the
    # ValueError as a one-line UserError)
    with pytest.raises((ValueError, train.UserError), match="value_residual_lambda is only read by"):
        _, values, _ = train.parse_args(["--model=resformer", f"--value_residual={mode}", "--value_residual_lambda=2"])
        gpt.build_model(gpt.config_from_dict({**values, "vocab_size": 256}))
    _, values, _ = train.parse_args(["--model=resformer", f"--value_residual={mode}"])
    config = gpt.config_from_dict({**values, "vocab_size": 256})
    # and a checkpoint's config dict (every field, defaults included) builds again
    assert gpt.build_model(gpt.config_from_dict(gpt.config_to_dict(config))).config == config


def test_value_residual_lambda_defaults_to_2_where_it_is_read():
    assert resformer.ResFormerConfig().value_residual_lambda is None
    model = make_model("resformer", value_residual="constant")
    assert all((b.attn.lambda_1, b.attn.lambda_2) == (2.0, 1.0) for b in model.blocks[1:])
    model = make_model("resformer", value_residual="sparse", value_residual_layers="3-4")
    assert [b.attn.mixes for b in model.blocks] == [False, False, True, True]
    assert all(b.attn.lambda_1 == 2.0 for b in model.blocks[2:])
    _, values, _ = train.parse_args(["--model=resformer", "--value_residual=constant", "--value_residual_lambda=5"])
    model = gpt.build_model(gpt.config_from_dict({**values, "vocab_size": 256}))
    assert model.blocks[1].attn.lambda_1 == 5.0

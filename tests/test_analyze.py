"""
analyze.py: trains two tiny models with train.py, analyses them side by side, and checks the
files and their numbers; then every registered model's probes, in process: they only read (the
logits do not move), they reproduce each attention's output, and each paper gets its figure.

    python -m pytest -q -s tests/test_analyze.py
"""

import json
import os

import pytest
import torch

import analyze
from conftest import run
import gpt
from test_equivalence import make_model, perturb, tokens, TINY

TRAIN_TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
              "--eval_iters=2", "--log_interval=10", "--warmup_iters=2", "--max_iters=20", "--eval_interval=20"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """gpt and svformer, 20 steps each with train.py, then analyze.py on both at once."""
    pytest.importorskip("matplotlib")
    root = tmp_path_factory.mktemp("runs")
    out = {name: root / name for name in ("gpt", "svformer")}
    for name, out_dir in out.items():
        run(["train.py", f"--model={name}", f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TRAIN_TINY])
    result = run(["analyze.py", f"--data_dir={data_dir}", *(f"--out_dir={d}" for d in out.values()),
                  f"--compare_dir={root / 'compare'}", "--batches=2", "--batch_size=4"])
    print(result.stdout)
    return root, out, {name: json.loads((d / "analysis.json").read_text()) for name, d in out.items()}


def nan_padded(rows):
    """A JSON matrix padded with null -> a float64 tensor padded with NaN."""
    return torch.tensor([[float("nan") if v is None else v for v in row] for row in rows], dtype=torch.float64)


def in_unit_interval(values):
    flat = torch.tensor(values, dtype=torch.float64).flatten()
    return bool(((flat >= 0) & (flat <= 1 + 1e-9)).all())


def check_analysis(a, n_layer, n_head):
    """The numbers every model's analysis.json must have, in their ranges."""
    assert a["hooks_max_logit_change"] == 0, "the probes changed the logits"
    assert a["attention_recompute_max_error"] < 1e-4, "recomputed probabilities @ v != the attention's output"
    att = a["attention"]
    assert torch.tensor(att["entropy"]).shape == (n_layer, n_head) and in_unit_interval(att["entropy"])
    assert torch.tensor(att["first_token_share"]).shape == (n_layer, n_head) and in_unit_interval(att["first_token_share"])
    assert len(att["token_importance_entropy"]) == n_layer and in_unit_interval(att["token_importance_entropy"])
    assert all(v > 0 for v in a["value_norm"]["mean"] + a["value_norm"]["first_token"])
    hidden = a["hidden"]
    cosine = torch.tensor(hidden["cosine"])
    assert len(hidden["labels"]) == len(hidden["norm"]) == n_layer + 1 and cosine.shape == (n_layer + 1, n_layer + 1)
    assert all(v > 0 for v in hidden["norm"])
    assert torch.allclose(cosine.diagonal(), torch.ones(n_layer + 1), atol=1e-5) and cosine.abs().max() <= 1 + 1e-5
    assert torch.allclose(cosine, cosine.T, atol=1e-6)
    assert a["kv_cache"]["bytes_per_token"] > 0 and 0 < a["val_loss"] < 10


def test_analyze_writes_its_files_with_sane_numbers(trained):
    root, out, results = trained
    for name, out_dir in out.items():
        a = results[name]
        assert a["model"] == name and a["dataset"] == "pystdlib" and a["step"] == 20
        check_analysis(a, n_layer=2, n_head=2)
        ckpt = torch.load(out_dir / "ckpt.pt", weights_only=False)
        assert abs(a["val_loss"] - ckpt["best_val_loss"]) < 0.5  # other val batches, same model
        assert (out_dir / "analysis_overview.png").read_bytes()[:8] == PNG
    assert (out["gpt"] / "analysis_compare.png").exists() is False      # --compare_dir was given
    assert (root / "compare" / "analysis_compare.png").read_bytes()[:8] == PNG


def test_svformer_kv_cache_is_l_plus_1_over_2l_of_gpt(trained):
    _, _, results = trained
    L = 2
    gpt_bytes, sv_bytes = (results[n]["kv_cache"]["bytes_per_token"] for n in ("gpt", "svformer"))
    assert sv_bytes * 2 * L == gpt_bytes * (L + 1), (gpt_bytes, sv_bytes)
    assert gpt_bytes == 2 * L * 32 * 4  # K and V, n_embd floats each, per layer, float32


def test_kv_cache_bytes_per_token_counts_what_each_model_caches():
    L, d, N = TINY["n_layer"], TINY["n_embd"], TINY["n_head"]
    bytes_of = lambda name, **kw: gpt.kv_cache_bytes_per_token(make_model(name, dtype=torch.float32, **kw), 20)
    assert bytes_of("gpt") == bytes_of("resformer") == bytes_of("dca") == 2 * L * d * 4
    assert bytes_of("svformer") == (L + 1) * d * 4
    R = 2  # DCMHA also caches each key's factors: (pre, post) x (2R + 1) x N numbers per layer
    assert bytes_of("dcmha") == 2 * L * d * 4 + L * 2 * (2 * R + 1) * N * 4
    assert gpt.kv_cache_bytes_per_token(make_model("gpt", dtype=torch.float32), 10 ** 6) == 2 * L * d * 4


CASES = [(name, {}) for name in gpt.all_models()] + [
    ("resformer", {"value_residual": "learnable_plus"}),
    ("dcmha", {"window": 4, "query_chunk": 5}),
    ("dcmha", {"dc_post": False, "dc_key_wise": False, "dc_static": True}),
    ("dcmha", {"dc_compose": "folded", "window": 4, "query_chunk": 5}),
    ("dcmha", {"dc_compose": "kernel", "window": 4, "query_chunk": 5}),
    ("dca", {"dca_k": 1, "grn_relu_bias": True}),
    ("dca", {"grn": "v1", "dca_qkv": False}),
] + [(name, o) for name, o in (("muddformer", {"mudd_streams": "vr", "mudd_layers": 2}),
                               ("attnres", {"attnres_block": 3})) if name in gpt.all_models()]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0] + "".join(f"-{k}={v}" for k, v in c[1].items()))
def test_probes_only_read_and_reproduce_the_attention(case):
    """In float64: the logits with the probes == without, exactly; the recomputed attention
    probabilities (DCMHA's composed ones) times v == the attention's real output; the probes
    are gone afterwards."""
    name, overrides = case
    model = perturb(make_model(name, **overrides))
    idx = tokens()
    batches = [(idx, torch.roll(idx, -1, dims=1)), (idx.flip(0), idx)]
    with torch.no_grad():
        before, _ = model(idx)
    a = analyze.analyze(model, batches, kv_context=16)
    assert a["attention_recompute_max_error"] < 1e-10
    check_analysis(a, TINY["n_layer"], TINY["n_head"])
    with torch.no_grad():
        after, _ = model(idx)
    assert torch.equal(before, after)
    leftovers = [n for n, m in model.named_modules() for attr in ("attend", "attend_chunk", "mixing_factors",
                                                                    "mix", "weights") if attr in vars(m)]
    assert not leftovers and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    if name == "resformer":
        lambdas = a["resformer"]["lambda_1"]
        assert lambdas[0] is None and all(v is not None for v in lambdas[1:])
    if name == "dcmha":
        sizes = [v for layer in a["dcmha"].values() for v in layer if v is not None]
        assert sizes and all(v > 0 for v in sizes)       # perturbed: W_ts is not I
        if overrides.get("dc_static"):
            return                                       # W_b starts at N(0, 0.1²/N): not tiny
        fresh = analyze.analyze(make_model(name, **overrides), batches, kv_context=16)
        sizes = [v for layer in fresh["dcmha"].values() for v in layer if v is not None]
        assert max(sizes) < 0.05, sizes                  # at init W_ts ≈ I: the dynamic parts are tiny


def save_checkpoint(model, out_dir, meta):
    """A checkpoint in train.py's format (the fields analyze.py reads)."""
    os.makedirs(out_dir, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_config": gpt.config_to_dict(model.config),
                "train_config": {"dataset": "pystdlib"}, "meta": meta, "step": 0}, os.path.join(out_dir, "ckpt.pt"))


def test_each_paper_gets_its_figure(data_dir, tmp_path):
    """DCA's GRN weights and gates, DCMHA's composition, ResFormer's λs, the depth-mixing
    weights of MUDDFormer and AttnRes: in analysis.json with sane values, and as PNGs; all
    the runs side by side in one figure."""
    pytest.importorskip("matplotlib")
    meta = json.loads((data_dir / "pystdlib" / "meta.json").read_text())
    runs = {"dca": ("dca", {}), "dcmha": ("dcmha", {}), "plus": ("resformer", {"value_residual": "learnable_plus"}),
            "mudd": ("muddformer", {}), "attnres": ("attnres", {})}
    runs = {k: v for k, v in runs.items() if v[0] in gpt.all_models()}
    for key, (name, overrides) in runs.items():
        save_checkpoint(perturb(make_model(name, dtype=torch.float32, vocab_size=256, **overrides)), tmp_path / key, meta)
    results = analyze.main([f"--data_dir={data_dir}", *(f"--out_dir={tmp_path / k}" for k in runs),
                            "--batches=2", "--batch_size=2"])
    assert (tmp_path / "dca" / "analysis_compare.png").read_bytes()[:8] == PNG
    figures = {"dca": "dca_grn", "dcmha": "dcmha", "plus": "resformer_lambdas", "mudd": "depth_mixing",
               "attnres": "depth_mixing"}
    for key, result in zip(runs, results):
        a = json.loads((tmp_path / key / "analysis.json").read_text())
        check_analysis(a, TINY["n_layer"], TINY["n_head"])
        assert (tmp_path / key / f"analysis_{figures[key]}.png").read_bytes()[:8] == PNG
    a = {key: json.loads((tmp_path / key / "analysis.json").read_text()) for key in runs}
    L = TINY["n_layer"]
    b = nan_padded(a["dca"]["dca"]["b_mean"]["q"])                         # readers x entries
    assert b.shape == (L + 1, L + 1) and torch.isnan(b).sum() == L * (L + 1) // 2
    assert in_unit_interval([v for row in a["dca"]["dca"]["gate_open"]["k"] for v in row if v is not None])
    assert set(a["dcmha"]["dcmha"]) == {"pre_query", "pre_key", "post_query", "post_key"}
    lambdas = a["plus"]["resformer"]["lambda_1"][1:]
    assert a["plus"]["resformer"]["mode"] == "learnable_plus" and len(lambdas) == L - 1
    if "mudd" in a:
        assert set(a["mudd"]["muddformer"]["weights"]) == {"q", "k", "v", "r"}
    if "attnres" in a:
        alpha = nan_padded(a["attnres"]["attnres"]["alpha"])
        assert alpha.shape[0] == 2 * L and torch.allclose(alpha.nansum(-1), torch.ones(2 * L, dtype=torch.float64))


def test_a_missing_checkpoint_or_dataset_is_a_one_line_error(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="ckpt.pt not found"):
        analyze.main([f"--out_dir={tmp_path / 'nothing'}"])
    save_checkpoint(make_model("gpt", dtype=torch.float32, vocab_size=256), tmp_path / "run", {})
    with pytest.raises(SystemExit, match="--dataset=pystdlib"):
        analyze.main([f"--out_dir={tmp_path / 'run'}", f"--data_dir={tmp_path / 'no_data'}"])


def test_val_batches_are_train_pys_eval_windows(data_dir):
    """--batches=eval_iters --batch_size=batch_size --seed=0 scores the very windows train.py's evals
    do (the README scores checkpoints on another split's windows this way)."""
    import train
    block_size, eval_iters, batch_size = 32, 5, 4
    _, batches = analyze.val_batches({"train_config": {"dataset": "pystdlib"}, "model_config": {"vocab_size": 256}},
                                     str(data_dir), eval_iters, batch_size, block_size, seed=0)
    val = train.Batches(os.path.join(data_dir, "pystdlib", "val.bin"), block_size, 0, 256)
    offsets = val.draw(eval_iters * batch_size).view(eval_iters, batch_size)  # as train.py draws them
    for (x, y), row in zip(batches, offsets):
        x_train, y_train = val.get(row, torch.device("cpu"))
        assert torch.equal(x, x_train) and torch.equal(y, y_train)

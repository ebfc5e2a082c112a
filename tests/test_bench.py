"""bench.py: runs every kind of spec at a tiny shape and prints what the README's tables need."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2", "--repeats=2", "--warmup=1"]


def bench(*args):
    return subprocess.run([sys.executable, str(ROOT / "bench.py"), *TINY, *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_bench_json_has_every_key_and_ratio_to_gpt():
    out = bench("--models=dca:dca_k=1;grn=v2,resformer:value_residual=learnable", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["model"] for r in rows] == ["gpt", "dca:dca_k=1;grn=v2", "resformer:value_residual=learnable"]
    for r in rows:
        assert set(r) == {"model", "params", "ms_per_step", "tokens_per_s", "flops_per_token", "mfu", "peak_mem_mb",
                          "ratio_to_gpt", "step_ms", "mem_ratio_to_gpt", "kv_bytes_per_token", "kv_ratio_to_gpt"}
        assert len(r["step_ms"]) == 2 and abs(r["ms_per_step"] - sum(r["step_ms"]) / 2) <= 0.011  # median of 2 repeats
        assert r["params"] > 0 and r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0
        assert r["mfu"] is None  # a CPU is in no peak table: no MFU rather than a wrong one
    assert rows[0]["ratio_to_gpt"] == 1.0 and rows[0]["mem_ratio_to_gpt"] == 1.0
    assert rows[1]["params"] > rows[0]["params"]  # the GRNs
    assert [r["kv_ratio_to_gpt"] for r in rows] == [1.0, 1.0, 1.0]  # neither caches more than K and V


def test_bench_cpu_memory_is_the_models_not_tritons_code():
    # the CPU probe measures the RSS a fresh process gains; a kernel model's first step imports Triton
    # (~140 MB), which showed dca:grn_kernel=true at 10x gpt's memory at a tiny shape
    rows = json.loads(bench("--models=dca,dca:grn_kernel=true", "--json").stdout)
    dca, kernel = rows[1]["peak_mem_mb"], rows[2]["peak_mem_mb"]
    assert kernel < 2 * dca + 20, (dca, kernel)


def test_bench_reports_svformers_smaller_kv_cache():
    rows = json.loads(bench("--models=svformer", "--json").stdout)
    L = int(next(a for a in TINY if a.startswith("--n_layer=")).split("=")[1])
    assert rows[1]["kv_ratio_to_gpt"] == round((L + 1) / (2 * L), 3)  # L keys + one shared value, of 2L


def test_bench_mfu_with_a_given_peak():
    rows = json.loads(bench("--models=gpt", "--json", "--peak_flops=1e8").stdout)  # a tiny peak: a visible MFU
    r = rows[0]
    assert r["mfu"] > 0 and abs(r["mfu"] / (r["flops_per_token"] * r["tokens_per_s"] / 1e8) - 1) < 1e-2


def test_bench_dtype_is_the_steps_autocast_dtype():
    out = bench("--models=gpt", "--markdown", "--dtype=bfloat16")
    assert out.returncode == 0, out.stderr
    assert "| bfloat16 |" in out.stdout.splitlines()[0] and "| float32 |" in bench("--models=gpt", "--markdown").stdout


def test_bench_markdown_has_one_row_per_model():
    out = bench("--models=gpt,svformer", "--markdown")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == ["gpt", "svformer"]
    sys.path.insert(0, str(ROOT))
    from train import cpu_name
    assert out.stdout.startswith(f"CPU ({cpu_name()}), ")  # a table names the machine its times are of


def test_bench_bad_spec_is_a_one_line_error():
    for spec, words in [("gtp", "unknown model"), ("dca:dca_kk=2", "no option"), ("dca:dca_k=two", "not a valid int"), ("dca:grn=v4", "grn="),
                        ("dca:dca_qkv=flase", "not a valid bool")]:
        out = bench(f"--models={spec}")
        assert out.returncode != 0 and words in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_bench_profile_sorts_the_time_by_kind_and_writes_each_models_top_kernels(tmp_path):
    out = bench("--models=gpt,dca", "--json", f"--profile={tmp_path}")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    for r in rows:
        kinds = r["kernel_ms"]
        assert set(kinds) == {"attention", "matmul", "fused", "other", "total"}
        assert kinds["matmul"] > 0 and abs(sum(v for k, v in kinds.items() if k != "total") - kinds["total"]) < 0.05
        assert (tmp_path / f"{r['model']}.txt").read_text().startswith(f"{r['model']}: ms per step of CPU ops")
    table = bench("--models=gpt", "--markdown", f"--profile={tmp_path}").stdout
    assert "where the time goes" in table and table.count("| `gpt` |") == 2


def test_ratio_to_gpt_pairs_each_round_with_gpts():
    """Rounds 1-3 slow the machine 1x, 2x, 3x; x takes 1.2x gpt's step but its middle round also
    hits a hiccup (1.5x). The medians' ratio (3.6 / 2 = 1.8) takes the hiccup for x's speed; the
    median of the per-round ratios (1.2, 1.8, 1.2) does not."""
    sys.path.insert(0, str(ROOT))
    from bench import paired_ratio
    gpt, x = [1.0, 2.0, 3.0], [1.2, 1.2 * 2 * 1.5, 1.2 * 3]
    assert abs(paired_ratio(x, gpt) - 1.2) < 1e-12 and abs(paired_ratio(gpt, gpt) - 1.0) < 1e-12


def test_kernel_kinds_of_cuda_kernel_and_cpu_op_names():
    sys.path.insert(0, str(ROOT))
    from bench import kernel_kind
    for name, kind in [("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
                       ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "matmul"), ("triton_tem_fused_mm_3", "matmul"),
                       ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
                       ("fmha_cutlassB_f32_aligned_64x64_k64_sm80", "attention"), ("aten::mm", "matmul"),
                       ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "fused"), ("aten::add_", "other"),
                       ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("aten::addmm", "matmul")]:
        assert kernel_kind(name) == kind, name


def test_compile_gives_every_model_its_own_graph(monkeypatch):
    # Every model runs GPT.forward; past dynamo's 8 graphs per code object the ninth model's forward ran
    # uncompiled in the GPU benches (a warning in their logs). Ten models here, traced by dynamo without
    # inductor (fast): each must leave its own whole-model graph on GPT.forward.
    sys.path.insert(0, str(ROOT))
    import argparse
    import torch
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    import bench
    import gpt
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend="eager"))
    torch._dynamo.reset()
    specs = ["gpt", "resformer", "resformer:value_residual=learnable", "resformer:value_residual=learnable_plus",
             "svformer", "dcmha", "dca", "dca:dca_k=2", "muddformer", "attnres"]
    args = argparse.Namespace(batch_size=2, block_size=16, n_layer=2, n_head=2, n_embd=32, vocab_size=256,
                              repeats=1, warmup=1, compile=True, dtype="float32")
    try:
        with torch._dynamo.config.patch(recompile_limit=8):  # dynamo's default; bench's raise is undone after
            bench.time_steps(specs, args, torch.device("cpu"))
        assert len(_debug_get_cache_entry_list(gpt.GPT.forward.__code__)) >= len(specs)
    finally:
        torch._dynamo.reset()

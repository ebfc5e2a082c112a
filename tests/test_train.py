"""
The training loop end to end, on a small slice of the offline corpus: train -> checkpoint ->
resume -> sample, exact resume, DDP == one process, and the clear errors for user mistakes.
"""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import gpt  # noqa: E402
from conftest import run  # noqa: E402
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=2"]


def read_log(out_dir):
    """The step records of log.jsonl (not the {"event": "start", ...} record of each start)."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "step" in r]


def train(data_dir, out_dir, *extra, **kw):
    return run(["train.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY, *extra], **kw)


def test_train_checkpoint_resume_sample(data_dir, tmp_path):
    out = tmp_path / "out"
    result = train(data_dir, out, "--max_iters=30", "--eval_interval=15")
    assert "step 30" in result.stdout and os.path.exists(out / "ckpt.pt")
    log = read_log(out)
    assert log[-1]["val"] < log[0]["loss"], "training did not lower the loss"
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 30 and ckpt["model_config"]["model"] == "gpt"
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    result = train(data_dir, out, "--max_iters=40", "--eval_interval=10", "--init_from=resume")
    assert "resuming from" in result.stdout and "step 40" in result.stdout
    result = run(["sample.py", f"--out_dir={out}", "--start=def ", "--num_samples=2", "--max_new_tokens=20"])
    samples = [s for s in result.stdout.split("-" * 40) if s.strip()]
    assert len(samples) == 2 and all(s.strip().startswith("def") for s in samples)
    kv = gpt.kv_cache_bytes_per_token(gpt.build_model(gpt.config_from_dict(ckpt["model_config"])), 1)
    assert f"gpt: KV cache {kv / 1024:.2f} KiB per token" in result.stderr  # (on stderr: stdout is the samples)


def test_resume_matches_uninterrupted_run(data_dir, tmp_path):
    common = ["--max_iters=12", "--lr_decay_iters=12", "--eval_interval=6"]
    train(data_dir, tmp_path / "a", *common)
    train(data_dir, tmp_path / "b", *common, "--max_iters=6")  # stops, with a checkpoint, at step 6
    train(data_dir, tmp_path / "b", *common, "--init_from=resume")
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 13))
    assert [(r["loss"], r.get("val")) for r in a] == [(r["loss"], r.get("val")) for r in b]  # bit for bit


def test_ddp_two_processes_match_one(data_dir, tmp_path):
    """2 gloo processes with batch 4 each == 1 process with 2 micro-batches of 4 (same global
    batch, same data): same losses and same weights, up to float summation order."""
    common = ["--max_iters=4", "--eval_interval=4", "--gradient_accumulation_steps=2"]
    train(data_dir, tmp_path / "one", *common)
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
         f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'two'}", *TINY, *common])
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    for r1, r2 in zip(one, two):
        assert abs(r1["loss"] - r2["loss"]) < 1e-5, (r1, r2)
    assert abs(one[-1]["val"] - two[-1]["val"]) < 1e-5
    w1 = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5


@pytest.mark.parametrize("args, message", [
    (["--dataset=nothing_here"], "python prepare_data.py"),
    (["--n_embd=30", "--n_head=4"], "n_embd=30 must be divisible by n_head=4"),
    (["--block_size=10000000"], "fewer than block_size"),
    (["--n_layre=3"], "unknown option '--n_layre=3'"),
    (["--value_residual=learnable"], "--model=resformer"),
    (["--model=nope"], "unknown --model=nope"),
    (["--n_layer=three"], "--n_layer=three: expected an integer"),
    (["--init_from=resume", "--out_dir=/nonexistent/x"], "does not exist"),
    (["--learning_rate=1e6", "--max_iters=30", "--eval_interval=30"], "loss became"),
])
def test_user_mistakes_give_one_line_errors(data_dir, tmp_path, args, message):
    result = run(["train.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path}", *TINY[:-1], *args], check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_resume_with_another_tokenizer_is_refused(data_dir, tmp_path):
    out = tmp_path / "out"
    train(data_dir, out, "--max_iters=2", "--eval_interval=2")
    other = tmp_path / "other" / "pystdlib"
    other.mkdir(parents=True)
    for f in ("train.bin", "val.bin"):
        (other / f).write_bytes((data_dir / "pystdlib" / f).read_bytes())
    meta = json.loads((data_dir / "pystdlib" / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "tokenizer": "gpt2", "vocab_size": 50257}))
    result = train(tmp_path / "other", out, "--max_iters=4", "--init_from=resume", check=False)
    assert result.returncode == 2 and "tokenizer" in result.stderr and "Traceback" not in result.stderr


def test_resume_on_data_made_again_says_so(data_dir, tmp_path):
    """The same --data_dir made again with another --val_split between two sittings of a run: the
    resume goes on (it may be meant) but says the data changed; on the same data it says nothing."""
    out = tmp_path / "out"
    train(data_dir, out, "--max_iters=2", "--eval_interval=2")
    same = train(data_dir, out, "--max_iters=4", "--eval_interval=2", "--init_from=resume")
    assert "has changed since the checkpoint" not in same.stderr
    other = tmp_path / "other" / "pystdlib"
    other.mkdir(parents=True)
    for f in ("train.bin", "val.bin"):
        (other / f).write_bytes((data_dir / "pystdlib" / f).read_bytes())
    meta = json.loads((data_dir / "pystdlib" / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "val_split": "documents"}))
    changed = train(tmp_path / "other", out, "--max_iters=6", "--eval_interval=2", "--init_from=resume")
    assert "has changed since the checkpoint" in changed.stderr and "tokens then" in changed.stderr, changed.stderr
    assert "documents now" in changed.stderr and read_log(out)[-1]["step"] == 6


def test_resume_refuses_to_change_the_model(data_dir, tmp_path):
    train(data_dir, tmp_path, "--max_iters=2", "--eval_interval=2")
    result = train(data_dir, tmp_path, "--max_iters=4", "--init_from=resume", "--n_layer=3", check=False)
    assert result.returncode == 2 and "cannot change --n_layer" in result.stderr


def test_config_file_and_inverse_sqrt_schedule(data_dir, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('max_iters = 3\neval_interval = 3\nlr_schedule = "inverse_sqrt"\nmlp = "gelu"\nn_layer = 1\n')
    train(data_dir, tmp_path / "out", f"--config={cfg}")  # TINY's --n_layer=2 on the command line wins
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["mlp"] == "gelu" and ckpt["train_config"]["lr_schedule"] == "inverse_sqrt"
    assert ckpt["model_config"]["n_layer"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"n_layers": 3}')
    result = train(data_dir, tmp_path / "out", f"--config={bad}", check=False)
    assert result.returncode == 2 and "n_layers" in result.stderr


def test_learning_rate_schedules():
    sys.path.insert(0, ROOT)
    from train import TrainConfig, learning_rate_at
    c = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    lrs = [learning_rate_at(s, c) for s in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] <= 1.0                       # warmup rises
    assert abs(lrs[10] - 1.0) < 1e-9 and abs(lrs[110] - 0.1) < 1e-9  # cosine from peak to min_lr
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    c.lr_schedule = "inverse_sqrt"
    assert abs(learning_rate_at(39, c) - (10 / 40) ** 0.5) < 1e-9


def test_peak_flops_table_matches_the_right_card_or_none():
    sys.path.insert(0, ROOT)
    from train import peak_flops
    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12   # SXM
    assert peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert peak_flops("NVIDIA L40S", "bfloat16") == 362e12 and peak_flops("NVIDIA L4", "bfloat16") == 121e12
    assert peak_flops("Tesla T4", "float16") == 65e12 and peak_flops("Tesla T4", "bfloat16") is None  # no bf16 units
    assert peak_flops("cpu", "float32") is None                          # unknown: no MFU, not a wrong one
    assert peak_flops("cpu", "float32", override=2e12) == 2e12


def test_log_has_training_time_and_mfu_with_a_given_peak(data_dir, tmp_path):
    train(data_dir, tmp_path / "m", "--max_iters=6", "--eval_interval=3", "--peak_flops=1e12")
    log = read_log(tmp_path / "m")
    assert all(0 < r["mfu"] < 1 and r["time"] > 0 for r in log)
    assert [r["time"] for r in log] == sorted(r["time"] for r in log)
    assert "mfu" not in read_log_of(train(data_dir, tmp_path / "n", "--max_iters=2", "--eval_interval=2"), tmp_path / "n")[0]


def read_log_of(result, out_dir):
    assert result.returncode == 0
    return read_log(out_dir)


def test_tf32_flag_sets_cudas_float32_matmuls_and_the_log_records_them(monkeypatch):
    # DCMHA's attention stays in float32 under bf16 autocast; with TF32 its matmuls round their inputs
    # to 10 bits of mantissa, which no GPU has trained yet: --tf32=false keeps them in full float32.
    # (No GPU here: CUDA's presence is faked; the settings are torch's globals, restored after.)
    sys.path.insert(0, ROOT)
    import train
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    try:
        for given, tf32 in (([], True), (["--tf32=false"], False)):
            c = train.parse_args(["--device=cuda", "--dtype=bfloat16", *given])[0]
            system = train.setup_device(c, 0, 1, 0)
            assert system.device.type == "cuda" and (matmul.allow_tf32, cudnn.allow_tf32) == (tf32, tf32)
            record = train.start_record([], c, gpt.GPTConfig(), system, None)
            assert record["cuda_matmul"] == {"allow_tf32": tf32, "allow_bf16_reduced_precision_reduction":
                                             matmul.allow_bf16_reduced_precision_reduction}
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before
    assert train.start_record([], c, gpt.GPTConfig(), train.setup_device(train.parse_args(["--device=cpu"])[0], 0, 1, 0), None)[
        "cuda_matmul"] is None  # not on the CPU

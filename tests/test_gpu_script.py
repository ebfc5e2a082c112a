"""tests/gpu/run.py, the GPU check, in its CPU mode: the script itself is tested before it meets a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_runs_every_step_on_the_cpu_and_reports_from_its_logs(tmp_path):
    out = tmp_path / "gpu"
    result = subprocess.run([sys.executable, "tests/gpu/run.py", "--device=cpu", "--models=gpt,dca:dca_k=2", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ALL CHECKS PASSED" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["equivalence"]["passed"] > 0 and summary["equivalence"]["failed"] == 0
    # + the trained-only twin, which runs train.py under a python -c that sets torch's CUDA backend
    assert set(summary["train"]) == {"gpt", "dca:dca_k=2", "gpt:dtype=bfloat16;allow_bf16_reduced_precision_reduction=false"}
    for spec, run in summary["train"].items():
        if run["trained_only"]:  # the twin: trained for its losses, no resume or sample, not a check
            assert spec == "gpt:dtype=bfloat16;allow_bf16_reduced_precision_reduction=false"
            assert run["exit"] == "0" and run["loss_falls"] and run["resumed"] is None and run["sampled"] is None
        else:
            assert run["loss_falls"] and run["resumed"] and run["sampled"]
    assert [row["model"] for row in summary["bench"]["tiny"]] == ["gpt", "dca:dca_k=2"]
    assert summary["explain"]["gpt"]["graph_breaks"] == 0
    assert (out / "logs.tar.gz").stat().st_size > 0
    assert summary["profiles"] == ["profile-tiny/dca-dca_k-2.txt", "profile-tiny/gpt.txt"]
    table = (out / "table.md").read_text()
    assert "where the time goes" in table and "| `dca:dca_k=2` | " in table.split("where the time goes")[1]
    # the report again, from the logs alone
    again = subprocess.run([sys.executable, "tests/gpu/run.py", f"--report={out / 'logs'}", str(tmp_path / "again")],
                           cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["train"] == summary["train"]


def test_report_flags_a_bench_past_dynamos_recompile_limit(tmp_path):
    # The H100's first call (2026-11-26) benched nine models in one process at the DCA paper's shape; the ninth
    # compiled past dynamo's 8 graphs for GPT.forward and ran it uncompiled, with only a warning in the log
    logs = ROOT / "results/gpu/h100-2026-11-26/1-full/logs"
    again = subprocess.run([sys.executable, "tests/gpu/run.py", f"--report={logs}", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["bench_past_recompile_limit"] == ["dca_paper"]
    assert "bench `dca_paper` hit dynamo's recompile_limit" in (tmp_path / "table.md").read_text()
    assert "ALL CHECKS PASSED" not in again.stdout
    # and it fails the checks by itself: the same results less the flag pass them
    gpu_run = load_gpu_run()
    clean = {"train": {}, "explain": {}, "bench": {"tiny": [{"model": "gpt"}]}}
    assert gpu_run.checks_passed(clean)
    assert not gpu_run.checks_passed({**clean, "bench_past_recompile_limit": ["tiny"]})
    # a twin trained only for its losses must run, but its loss may blow up (that is what it is there to show)
    blown_up = {"exit": "0", "trained_only": True, "loss_falls": False, "resumed": None, "sampled": None}
    assert gpu_run.checks_passed({**clean, "train": {"dcmha:dc_float32_scores=false": blown_up}})
    assert not gpu_run.checks_passed({**clean, "train": {"dcmha:dc_float32_scores=false": {**blown_up, "exit": "1"}}})
    assert not gpu_run.checks_passed({**clean, "train": {"dcmha": {**blown_up, "trained_only": False, "loss_falls": True}}})


def test_a_training_runs_backend_setting_is_set_before_train_py_runs(tmp_path):
    # dcmha's bf16 attention blew up on the GPU, not on the CPU: one suspect is cuBLAS's bf16 sums in
    # bf16, which is a setting of torch's, not a flag of train.py's; the spec sets it all the same
    gpu_run = load_gpu_run()
    spec = "dcmha:dc_float32_scores=false;allow_bf16_reduced_precision_reduction=false"
    assert gpu_run.spec_flags(spec) == ["--model=dcmha", "--dc_float32_scores=false"]
    assert gpu_run.train_command("dcmha:dc_float32_scores=false") == [sys.executable, "train.py"]
    (tmp_path / "train.py").write_text("import sys, torch\n"  # stands in for train.py: what it was started with
                                       "print(torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction, sys.argv)\n")
    ran = subprocess.run([*gpu_run.train_command(spec), *gpu_run.spec_flags(spec)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "False ['train.py', '--model=dcmha', '--dc_float32_scores=false']"


def load_gpu_run():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_run", ROOT / "tests/gpu/run.py")
    gpu_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_run)
    return gpu_run


def test_phase_one_starts_the_training_runs_beside_gpt2_smalls_compiles(tmp_path, monkeypatch):
    # The H200's call of 2026-11-27 queued its training runs behind the compiles, which held the pool's
    # workers, and six of them timed out. Here every compile of the big shape lasts until the training
    # runs are done: they must run as many at a time as the pool left them, beside at most big_workers compiles.
    import argparse
    import threading
    import time
    gpu_run = load_gpu_run()
    lock, trained, running = threading.Lock(), threading.Event(), {"train": 0, "warm": 0}
    most = {"train": 0, "warm": 0}
    order = []

    def busy(kind, seconds=None, until=None):
        with lock:
            running[kind] += 1
            most[kind] = max(most[kind], running[kind])
        time.sleep(seconds) if seconds else until.wait(30)
        with lock:
            running[kind] -= 1

    def fake_train(r, mode, spec, data_dir, work, checks=True):
        busy("train", seconds=0.3)
        order.append(spec)
        if len(order) == len(specs) + len(mode["train_also"]):
            trained.set()

    def fake_bench(r, mode, shape_name, bench_specs, warm):
        if warm:
            busy("warm", until=trained)
        return 0

    monkeypatch.setattr(gpu_run, "train", fake_train)
    monkeypatch.setattr(gpu_run, "bench", fake_bench)
    monkeypatch.setattr(gpu_run.Runner, "run", lambda self, name, args, env=None, min_time=10: (0, ""))
    mode = {**gpu_run.MODES["cuda"], "workers": 5, "big_workers": 2, "train_also": ("dcmha:dc_float32_scores=false",)}
    specs = ["gpt", "dca", "dcmha", "attnres"]
    args = argparse.Namespace(budget=0, only="train,bench", shapes="gpt2_small", device="cpu")
    start = time.time()
    gpu_run.run_steps(args, specs, mode, tmp_path, tmp_path)
    assert trained.is_set() and time.time() - start < 20
    assert most == {"train": 3, "warm": 2}  # workers - big_workers training runs at a time, big_workers compiles
    # gpt's compile first (phase 2 benches nothing without the baseline), then the slowest
    assert sorted(gpu_run.model_specs(), key=gpu_run.compile_order)[:3] == ["gpt", "dcmha", "dcmha:dc_compose=kernel"]
    # the training runs the longest first (each compiles its model), the same order less gpt's head start
    assert gpu_run.training_order(["gpt", "resformer", "attnres", "dca", "dcmha"]) == ["dcmha", "dca", "attnres", "gpt", "resformer"]

"""
The TPU path of train.py (--device=xla), run for real on XLA's CPU backend (PJRT_DEVICE=CPU).
Every model of the registry trains a few steps on XLA and must
  - match the eager CPU run of the same seed and batches: tightly in float32, loosely in
    bfloat16 (XLA's bf16 autocast against eager float32),
  - stop compiling new graphs once the first steps and the first eval are done,
  - leave a checkpoint of plain CPU tensors, tied weights still tied, that resumes on the CPU
    exactly like the eager run's,
  - and, since this venv holds an older torch (2.9), train under torch.compile on the CPU too.
Run it with tests/xla/run.sh (which makes the venv with torch_xla); it ends with the line
`xla: N passed, M failed` and exits non-zero on any failure.
"""

import contextlib
import io
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import traceback

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import gpt    # noqa: E402
import train  # noqa: E402

import torch_xla  # noqa: E402
import torch_xla.debug.metrics as metrics  # noqa: E402

# Start XLA's runtime before the first eager backward: autograd sizes its per-device queues
# once, from the devices known then, and XLA's would be missing (an INTERNAL ASSERT later)
torch_xla.device()

STEPS, EVAL = 8, 4   # evals (and checkpoints) at steps 4 and 8; every graph exists after step 4
TINY = ["--n_layer=3", "--n_head=4", "--n_embd=64", "--block_size=64", "--batch_size=4",
        "--eval_iters=2", "--log_interval=1", f"--eval_interval={EVAL}", f"--max_iters={STEPS}",
        "--warmup_iters=2", f"--lr_decay_iters={STEPS - 1}", "--min_lr=0", "--seed=7"]  # the last lr is 0.0
EXTRA = {"gpt": ["--gradient_accumulation_steps=2"],     # two micro-batches in the one graph
         "dcmha": ["--query_chunk=16", "--window=24"]}  # several query chunks and a local layer
FP32_TOL = 1e-4       # max |loss difference|, XLA float32 vs eager float32 (seen: ~1e-6)
BF16_TOL = 0.02       # XLA bfloat16 autocast vs eager float32 (seen: ~5e-4)
COMPILE_TOL = 1e-3    # inductor float32 vs eager float32
MAX_GRAPHS = 3        # per run: the first step (it also creates Adam's state), the other steps, eval


def make_data(data_dir):
    """A byte-level corpus from this Python's standard library, as prepare_data.py would write it."""
    folder = os.path.join(data_dir, "tiny")
    os.makedirs(folder)
    stdlib = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(stdlib) if n.endswith(".py"))
    text = b"".join(open(os.path.join(stdlib, n), "rb").read() for n in names)[:300_000]
    tokens = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    split = len(tokens) * 9 // 10
    tokens[:split].tofile(os.path.join(folder, "train.bin"))
    tokens[split:].tofile(os.path.join(folder, "val.bin"))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"tokenizer": "byte", "vocab_size": 256, "source": "check_xla"}, f)


def train_run(data_dir, out_dir, *args):
    """train.main in this process (torch_xla's graph cache and counters are per process);
    -> the records of log.jsonl. Its output is shown only when it fails."""
    argv = [f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out_dir}", *TINY, *args]
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            train.main(argv)
    except BaseException as e:
        raise RuntimeError(f"train.py {' '.join(argv)} failed: {type(e).__name__}: {e}\n{output.getvalue()}") from e
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "step" in r]  # not the {"event": "start"} records


def max_loss_diff(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b], "the runs logged different steps"
    diffs = [abs(r[k] - s[k]) for r, s in zip(a, b) for k in ("loss", "val") if k in r]
    return max(diffs)


def compiled_graphs():
    return int(metrics.counter_value("UncachedCompile") or 0)


def graphs_of_run(records, before):
    """-> (graphs compiled by this run, graphs compiled after the warm-up)."""
    at = {r["step"]: r["graphs"] for r in records}
    return at[STEPS] - before, at[STEPS] - at[EVAL]


def check_model(name, tmp, data_dir):
    """-> list of (check, ok, detail)."""
    extra = [f"--model={name}", *EXTRA.get(name, [])]
    results = []

    def check(label, ok, detail):
        results.append((label, bool(ok), detail))

    eager = train_run(data_dir, f"{tmp}/{name}-eager", *extra, "--device=cpu", "--dtype=float32")
    for dtype, tol in (("float32", FP32_TOL), ("bfloat16", BF16_TOL)):
        before = compiled_graphs()
        xla = train_run(data_dir, f"{tmp}/{name}-xla-{dtype}", *extra, "--device=xla", f"--dtype={dtype}")
        diff = max_loss_diff(eager, xla)
        check(f"{dtype} loss vs eager", diff <= tol, f"max|diff| {diff:.1e} (tol {tol:g})")
        total, late = graphs_of_run(xla, before)
        check(f"{dtype} graphs", total <= MAX_GRAPHS and late == 0,
              f"{total} compiled, {late} after step {EVAL}")

    # torch.compile (inductor, on the CPU) with this venv's older torch: the path CUDA users of
    # torch < 2.12 take. Its evals run the compiled model under no_grad, where torch 2.9-2.11's
    # Dynamo once failed on DCA's custom autograd.Function.
    compiled = train_run(data_dir, f"{tmp}/{name}-compiled", *extra, "--device=cpu", "--dtype=float32", "--compile=true")
    diff = max_loss_diff(eager, compiled)
    check(f"torch.compile {torch.__version__} on the CPU vs eager", diff <= COMPILE_TOL, f"max|diff| {diff:.1e} (tol {COMPILE_TOL:g})")

    # the XLA checkpoint: CPU tensors, portable optimizer groups, ties kept, resumes on the CPU
    xla_dir, eager_dir = f"{tmp}/{name}-xla-float32", f"{tmp}/{name}-eager"
    on_cpu = torch.load(f"{xla_dir}/ckpt.pt", weights_only=False)  # an XLA tensor would load back onto XLA
    problems = []

    def walk(obj, path):
        if torch.is_tensor(obj) and obj.device.type != "cpu":
            problems.append(f"{path} on {obj.device}")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")
    walk(on_cpu, "ckpt")
    for group in on_cpu["optimizer"]["param_groups"]:
        if not isinstance(group["lr"], float) or group["capturable"]:
            problems.append(f"optimizer group lr={group['lr']!r} capturable={group['capturable']}")
    cpu_model = gpt.build_model(gpt.config_from_dict(on_cpu["model_config"]))
    state = cpu_model.state_dict(keep_vars=True)
    for k1, v1 in state.items():
        for k2, v2 in state.items():
            if k1 < k2 and v1 is v2 and not torch.equal(on_cpu["model"][k1], on_cpu["model"][k2]):
                problems.append(f"{k1} and {k2} are tied in the model but differ in the checkpoint")
    if not problems:
        resumed = f"{tmp}/{name}-xla-resumed-on-cpu"
        shutil.copytree(xla_dir, resumed)
        more = [*extra, "--device=cpu", "--dtype=float32", "--init_from=resume", f"--max_iters={STEPS + 2}"]
        a = train_run(data_dir, resumed, *more)[-2:]
        b = train_run(data_dir, eager_dir, *more)[-2:]
        diff = max_loss_diff(a, b)
        if diff > FP32_TOL:
            problems.append(f"resumed on the CPU, steps {STEPS + 1}-{STEPS + 2} differ from eager by {diff:.1e}")
    check("checkpoint", not problems, "; ".join(problems) or "CPU tensors, ties kept, resumes on the CPU")
    return results


def main():
    models = list(gpt.all_models())
    print(f"xla: torch {torch.__version__}, torch_xla {torch_xla.__version__}, "
          f"PJRT_DEVICE={os.environ.get('PJRT_DEVICE')}, models: {', '.join(models)}", flush=True)
    passed = failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = f"{tmp}/data"
        make_data(data_dir)
        for name in models:
            t0 = time.time()
            try:
                results = check_model(name, tmp, data_dir)
            except Exception:
                results = [("runs", False, traceback.format_exc())]
            for label, ok, detail in results:
                passed, failed = passed + ok, failed + (not ok)
                print(f"  {name:10s} {'ok  ' if ok else 'FAIL'} {label}: {detail}", flush=True)
            print(f"  {name:10s} {time.time() - t0:.0f} s", flush=True)
    print(f"xla: {passed} passed, {failed} failed", flush=True)
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())

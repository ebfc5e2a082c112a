"""
The GPU path, proven and measured in one call: everything a lent H100 / H200 must show.

    python tests/gpu/run.py OUT                 # on the GPU machine: ~8 minutes on one H100 / H200
    python tests/gpu/run.py --device=cpu OUT    # the same steps at tiny shapes on the CPU (CI runs this)

The steps, each with its log under OUT/logs/:
  1. equivalence  test_equivalence.py on the device (EQUIV_DEVICE): the float64 exactness checks and
                  bf16 autocast against float32, for every model
  2. explain      torch._dynamo.explain per model: graphs and graph breaks of one training forward
  3. train        train.py for every model with the device's defaults (on CUDA: torch.compile + bf16,
                  fused AdamW, pinned memory): the loss falls, nothing is compiled after the first
                  eval, --init_from=resume continues the run, sample.py samples from it; and a few
                  twins trained only for their losses (DCMHA's bf16 attention), which are not checks
  4. bench        bench.py --compile --profile at the DCA paper's shape and at GPT-2 small's: ms/step,
                  tokens/s, MFU, peak memory and the ratio to gpt, every model in one process, and
                  where each model's time goes (its kernel time per step: matmuls, attention, the
                  kernels inductor fused, the rest; its top kernels under logs/profile-<shape>/)
Steps 1-3 run side by side with bench's compilation (--warm_cache: compiling is CPU work, which the
machine's cores do in parallel, and inductor keeps what it compiled on disk): GPT-2 small's compiles
a few at a time, gpt's then the slowest first, beside the suite, explain and the training runs (the
longest first, then the trained-only twins), then the other compiles; then the timed benches run
alone on the idle GPU. Nothing needs the network.

Writes OUT/summary.json, OUT/table.md and OUT/logs.tar.gz, prints the table last, and exits with 0
only when every check passed. --budget (seconds) bounds the whole run: a step that would not fit
is skipped, and says so.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "vocab_size")
MODES = {
    "cuda": dict(
        shapes={
            # the DCA paper's LM1B models (6 layers, d 512, 8 heads, 128 tokens), a batch that fills the GPU
            "dca_paper": dict(n_layer=6, n_head=8, n_embd=512, block_size=128, batch_size=256, vocab_size=32000),
            "gpt2_small": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16, vocab_size=50304),
        },
        train=["--max_iters=200", "--eval_interval=100", "--log_interval=25", "--eval_iters=10"],
        resume_to=250, equivalence=["-k", "not compile"], bench_compile=True, repeats=20, loss_drop=0.5,
        workers=12, big_workers=6, budget=500, phase_2=160,
        # at T = 1024 DCMHA's default 128-query chunks unroll into 8 chunk graphs a layer, which did not
        # compile in 310 s (H200); two chunks a layer: the same numbers, compiled on the CPU as fast as one
        # chunk (55 s against 110 s at 2 layers, B = 1), with less memory for the scores than one chunk
        # dc_compose=kernel: one chunk, whose masked key blocks the kernels skip (its graph is small)
        bench_spec={"gpt2_small": {"dcmha": "dcmha:query_chunk=512",
                                   "dcmha:dc_compose=kernel": "dcmha:dc_compose=kernel;query_chunk=0"}},
        # trained only: with its attention in bf16 (the authors' precision) dcmha's loss blew up
        # on an H200 and an H100 (step ~150) where the all-float32 twin trained; dcmha now keeps
        # its scores in float32 (dc_float32_scores), and this twin shows the bf16 way beside it.
        # On the CPU the bf16 way trains, eager and compiled: the next two tell the GPU's suspects
        # apart, inductor's Triton kernels (uncompiled) and cuBLAS's reduced-precision bf16 sums (off).
        # The float32 attention that trained had no TF32 (train.py's since): the last one has none
        train_also=("dcmha:dc_float32_scores=false", "dcmha:dc_float32_scores=false;compile=false",
                    "dcmha:dc_float32_scores=false;allow_bf16_reduced_precision_reduction=false",
                    "dcmha:tf32=false")),
    "cpu": dict(
        shapes={"tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=2, vocab_size=256)},
        train=["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=20",
               "--eval_interval=10", "--log_interval=5", "--eval_iters=2", "--warmup_iters=2", "--compile=false"],
        resume_to=25, equivalence=["-k", "gpt and (causality or bf16)"], bench_compile=False, repeats=2, loss_drop=0.05,
        workers=2, big_workers=1, budget=0, phase_2=0, bench_spec={},
        # bf16 autocast on the CPU; and train.py started the way a BACKEND_SETTINGS spec starts it
        train_also=("gpt:dtype=bfloat16;allow_bf16_reduced_precision_reduction=false",)),
}


def model_specs():
    """Every registered model at its defaults, k-DCA with k = 2, both DCA's with their GRN sums in
    dca_kernels.py's Triton kernels (grn_kernel: faster than inductor's plain sums?) and DCMHA with
    compose-softmax-compose in dcmha_kernels.py's (dc_compose=kernel: faster than the matmuls?).
    (DCMHA's other Compose forms, dc_compose=factors and folded, stay in the equivalence suite; each
    was benched once, as the ninth model, whose forward dynamo then left uncompiled (bench.py's
    recompile limit, since raised): their compiled GPU times are unknown.)"""
    import gpt
    return list(gpt.all_models()) + ["dca:dca_k=2", "dca:grn_kernel=true", "dca:dca_k=2;grn_kernel=true",
                                     "dcmha:dc_compose=kernel"]


def bench_spec(mode, shape_name, spec):
    """The spec bench runs for spec at this shape (the same model; a setting that compiles in time there)."""
    return mode["bench_spec"].get(shape_name, {}).get(spec, spec)


BIG_SHAPE = "gpt2_small"  # its compiles run a few at a time (mode["big_workers"]): each takes GBs and many cores
SLOWEST_TO_COMPILE = ("dcmha", "dca", "attnres", "muddformer")  # as timed on an H100


def slowness(spec):
    """0 for the model slowest to compile, ..., len(SLOWEST_TO_COMPILE) for the rest."""
    name = spec.partition(":")[0]
    return SLOWEST_TO_COMPILE.index(name) if name in SLOWEST_TO_COMPILE else len(SLOWEST_TO_COMPILE)


def compile_order(spec):
    """-1 for gpt (the baseline: without it phase 2 benches nothing), then the slowest first."""
    return -1 if spec == "gpt" else slowness(spec)


def training_order(specs):
    """The training runs, the longest first (each compiles its model): the pool ends sooner than
    with gpt's short run first and dca's last."""
    return sorted(specs, key=slowness)


# settings of torch's CUDA backend, not of train.py, that a training run's spec may set: train.py
# then runs under a python -c that sets them first
BACKEND_SETTINGS = {"allow_bf16_reduced_precision_reduction": "torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction"}


def spec_settings(spec):
    """'dca:dca_k=2;grn_kernel' -> [('dca_k', '=', '2'), ('grn_kernel', '', '')]."""
    return [item.partition("=") for item in filter(None, spec.partition(":")[2].split(";"))]


def spec_flags(spec):
    """'dca:dca_k=2' -> ['--model=dca', '--dca_k=2'] for train.py (without BACKEND_SETTINGS)."""
    return [f"--model={spec.partition(':')[0]}"] + [f"--{key}{sep}{value}" for key, sep, value in spec_settings(spec)
                                                     if key not in BACKEND_SETTINGS]


def train_command(spec):
    """How to start train.py for spec: [python, 'train.py'], or a python -c that first sets the
    spec's BACKEND_SETTINGS ('allow_bf16_reduced_precision_reduction=false') and then runs it."""
    prelude = [f"{BACKEND_SETTINGS[key]} = {value.capitalize()}" for key, _, value in spec_settings(spec)
               if key in BACKEND_SETTINGS]
    if not prelude:
        return [sys.executable, "train.py"]
    return [sys.executable, "-c", "; ".join(["import runpy, sys, torch", *prelude, "sys.argv[0] = 'train.py'",
                                             "runpy.run_path('train.py', run_name='__main__')"])]


def slug(spec):
    import bench  # its profile files are named the same way
    return bench.file_name(spec)


def shape_flags(shape):
    return [f"--{k}={shape[k]}" for k in SHAPE_KEYS]


class Runner:
    """Runs commands with a log file each, all bounded by one deadline."""

    def __init__(self, logs, budget, device):
        self.logs, self.device = logs, device
        self.deadline = time.time() + budget if budget else float("inf")
        self.lock = threading.Lock()

        self.phase_deadline = self.deadline

    def left(self):
        return min(self.deadline, self.phase_deadline) - time.time()

    def run(self, name, args, env=None, min_time=10):
        """Run args; return (exit code or 'skipped'/'timeout', output). The output goes to logs/name.txt."""
        if self.left() < min_time:
            return "skipped", f"skipped: {self.left():.0f} s left of the budget"
        timeout = None if self.left() == float("inf") else self.left()
        start = time.time()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        try:
            p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            code, out = p.returncode, p.stdout + "\n" + p.stderr
        except subprocess.TimeoutExpired as e:
            code, out = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        with open(self.logs / f"{name}.txt", "a") as f:
            f.write(f"$ {' '.join(map(str, args))}\n{out}\n[exit {code} after {time.time() - start:.1f} s]\n")
        with self.lock:
            print(f"  {name}: exit {code} ({time.time() - start:.0f} s)", flush=True)
        return code, out


# -----------------------------------------------------------------------------
# the steps

def equivalence(r, mode):
    files = ["test_equivalence.py"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_equivalence_*.py"))
    r.run("equivalence", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *files,
                          *mode["equivalence"]], env={"EQUIV_DEVICE": r.device})


def explain_models(device, specs, out_file):
    """In a process of its own: graphs and graph breaks of one training forward of each model."""
    import torch
    import bench
    import gpt
    device = torch.device(device)
    shape = dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=256)
    results = {}
    for spec in specs:
        name, overrides = bench.parse_spec(spec)
        config_class, model_class = gpt.all_models()[name]
        model = model_class(config_class(**{**shape, "model": name, **overrides})).to(device)
        idx = torch.randint(0, 256, (4, 256), device=device)
        torch._dynamo.reset()
        e = torch._dynamo.explain(model)(idx, idx)
        results[spec] = {"graphs": e.graph_count, "graph_breaks": e.graph_break_count,
                         "reasons": [str(b.reason)[:200] for b in e.break_reasons][:5]}
    with open(out_file, "w") as f:
        json.dump(results, f, indent=1)


def explain(r, specs):
    r.run("explain", [sys.executable, __file__, "--explain", f"--device={r.device}", f"--models={','.join(specs)}",
                      str(r.logs / "explain.json")])


def train(r, mode, spec, data_dir, work, checks=True):
    """train -> resume -> sample for one model, into logs/train-<spec>.txt and its log.jsonl
    (checks=False: train only, for its losses)."""
    out = work / f"train-{slug(spec)}"
    common = [f"--data_dir={data_dir}", f"--out_dir={out}", f"--device={r.device}", *spec_flags(spec), *mode["train"]]
    name = f"train-{slug(spec)}"
    if r.run(name, [*train_command(spec), *common])[0] == 0 and checks:
        r.run(name, [*train_command(spec), *common, "--init_from=resume", f"--max_iters={mode['resume_to']}"])
        r.run(name, [sys.executable, "sample.py", f"--out_dir={out}", f"--device={r.device}", "--start=def ",
                     "--num_samples=2", "--max_new_tokens=64"])
    if (out / "log.jsonl").exists():
        shutil.copy(out / "log.jsonl", r.logs / f"{name}.jsonl")
    shutil.rmtree(out, ignore_errors=True)  # the checkpoints go


def bench(r, mode, shape_name, specs, warm):
    """warm: compile one model in a process of its own (in parallel with others); else time
    them all in one process, into logs/bench-<shape>.txt. Returns the exit code."""
    shape = mode["shapes"][shape_name]
    args = [sys.executable, "bench.py", f"--device={r.device}", *shape_flags(shape)] + (["--compile"] if mode["bench_compile"] else [])
    if warm:
        return r.run(f"warm-{shape_name}-{slug(specs[0])}", [*args, "--warm_cache", f"--models={specs[0]}"])[0]
    return r.run(f"bench-{shape_name}", [*args, "--json", f"--models={','.join(specs)}", f"--repeats={mode['repeats']}",
                                         "--warmup=3", f"--profile={r.logs / f'profile-{shape_name}'}"], min_time=60)[0]


# -----------------------------------------------------------------------------
# the report: made from the logs alone, so that it can be made again from committed logs

def commands(text):
    """A log of appended commands -> [(command line, exit code, output)]."""
    out = []
    for part in ("\n" + text).split("\n$ ")[1:]:
        command, _, rest = part.partition("\n")
        exits = re.findall(r"\[exit (\S+) after", rest)
        out.append((command, exits[-1] if exits else "?", rest))
    return out


def flag(command, name):
    values = re.findall(rf"--{name}=(\S+)", command)
    return values[-1] if values else None


def collect_train(logs, name, loss_drop, trained_only=False):
    steps = commands((logs / f"{name}.txt").read_text())
    train_cmd, code, text = steps[0]
    result = {"exit": code, "trained_only": trained_only}
    if code != "0" or not (logs / f"{name}.jsonl").exists():
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith("[exit")]
        errors = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b|error:", line)]
        result["error"] = (errors or lines or [""])[-1][:200]
        return result
    log = [rec for rec in map(json.loads, (logs / f"{name}.jsonl").read_text().splitlines()) if "step" in rec]  # not the start events
    first_run = [rec for rec in log if rec["step"] <= int(flag(train_cmd, "max_iters"))]
    evals = [rec for rec in first_run if "val" in rec]
    result.update(val=evals[-1]["val"], best_val=min(rec["val"] for rec in evals), first_loss=first_run[0]["loss"],
                  ms=first_run[-1]["ms"], steps=first_run[-1]["step"],
                  loss_falls=evals[-1]["val"] < first_run[0]["loss"] - loss_drop)
    if "graphs" in first_run[-1]:  # compiled: every graph exists once the first eval has run
        after = first_run[first_run.index(evals[0]) + 1:]
        result["no_recompile"] = all(rec["graphs"] == first_run[-1]["graphs"] for rec in after)
    if trained_only:  # a finding, not a check: no resume, no sample
        return {**result, "resumed": None, "sampled": None}
    resume = [step for step in steps if "--init_from=resume" in step[0]]
    result["resumed"] = bool(resume) and resume[0][1] == "0" and "resuming from" in resume[0][2] \
        and log[-1]["step"] == int(flag(resume[0][0], "max_iters"))
    sample = [step for step in steps if "sample.py" in step[0]]
    result["sampled"] = bool(sample) and sample[0][1] == "0" and sample[0][2].count("def") >= 2
    return result


def collect(logs):
    """Everything the report shows, parsed from the folder of logs."""
    info = json.loads((logs / "run.json").read_text())
    results = {**info, "train": {}, "bench": {}}
    eq = logs / "equivalence.txt"
    if eq.exists():
        text = eq.read_text()
        summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed)", line)]
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?)", summary[-1] if summary else "")}
        results["equivalence"] = {"exit": commands(text)[-1][1], "passed": counts.get("passed", 0),
                                  "failed": counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0),
                                  "failures": re.findall(r"^FAILED (\S+)", text, re.M)[:20]}
    explain_file = logs / "explain.json"
    results["explain"] = json.loads(explain_file.read_text()) if explain_file.exists() else {}
    for spec in info["models"] + info.get("train_also", []):
        if (logs / f"train-{slug(spec)}.txt").exists():
            results["train"][spec] = collect_train(logs, f"train-{slug(spec)}", info["loss_drop"],
                                                   trained_only=spec not in info["models"])
    for shape_name in info["shapes"]:
        path = logs / f"bench-{shape_name}.txt"
        if not path.exists():
            continue
        text = path.read_text()
        if re.search(r"hit config\.(recompile|cache_size)_limit", text):  # a model's forward ran uncompiled
            results.setdefault("bench_past_recompile_limit", []).append(shape_name)
        try:  # bench.py's JSON, "[\n {...},\n ...\n]", among the compiler's warnings
            results["bench"][shape_name] = json.loads(text[text.index("[\n"):text.index("\n]") + 2])
        except ValueError:
            results["bench"][shape_name] = f"no result (exit {commands(text)[-1][1]}; see {path.name})"
    results["not_compiled"] = sorted(p.stem[len("warm-"):] for p in logs.glob("warm-*.txt")
                                     if commands(p.read_text())[-1][1] != "0")
    results["profiles"] = sorted(str(p.relative_to(logs)) for p in logs.glob("profile-*/*.txt"))
    return results


def summarize(results):
    lines = [f"GPU check: {results['device']}", ""]
    eq = results.get("equivalence")
    if eq:
        lines.append(f"equivalence suite on the device: {eq['passed']} passed, {eq['failed']} failed"
                     + (f" ({', '.join(eq['failures'][:5])})" if eq["failures"] else ""))
    mark = {True: "yes", False: "**NO**", None: "-"}
    if results["train"]:
        lines += ["", "| model | graphs / breaks | train: val at the end (best) | loss falls | no recompile | resume | sample | ms/step |",
                  "|---|---:|---:|:-:|:-:|:-:|:-:|---:|"]
    for spec, t in results["train"].items():
        e = results["explain"].get(spec, {})
        graphs = f"{e.get('graphs', '?')} / {e.get('graph_breaks', '?')}"
        if "val" not in t:
            lines.append(f"| `{spec}` | {graphs} | failed: {t.get('error', '')} | | | | | |")
            continue
        lines.append(f"| `{spec}` | {graphs} | {t['val']:.4f} ({t['best_val']:.4f}) | {mark[t['loss_falls']]} "
                     f"| {mark[t.get('no_recompile')]} | {mark[t.get('resumed')]} | {mark[t.get('sampled')]} | {t['ms']:.1f} |")
    if any(t.get("trained_only") for t in results["train"].values()):
        lines += ["", "trained only, for their losses (not checks): "
                  + ", ".join(f"`{spec}`" for spec, t in results["train"].items() if t.get("trained_only"))]
    for shape_name, rows in results["bench"].items():
        lines += ["", f"bench `{shape_name}` ({results.get('bench_how', 'compiled, bf16 autocast on CUDA')}): "
                  + ", ".join(f"{k}={v}" for k, v in results["shapes"][shape_name].items()), ""]
        if not isinstance(rows, list):
            lines.append(rows)
            continue
        lines += ["| model | params | ms/step | tokens/s | MFU (approx.) | peak mem MB | × gpt time | × gpt mem |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
            lines.append(f"| `{row['model']}` | {row['params']:,} | {row['ms_per_step']:.1f} | {row['tokens_per_s']:,} | {mfu} "
                         f"| {row['peak_mem_mb']:.0f} | {row['ratio_to_gpt']:.2f} | {row['mem_ratio_to_gpt']:.2f} |")
        if all("kernel_ms" in row for row in rows):
            lines += kernel_lines(rows)
    if results["not_compiled"]:
        lines += ["", f"did not compile in time (left out of the bench): {', '.join(results['not_compiled'])}"]
    for shape_name in results.get("bench_past_recompile_limit", []):
        lines += ["", f"**bench `{shape_name}` hit dynamo's recompile_limit**: a model's forward ran uncompiled "
                      f"(the warning in bench-{shape_name}.txt names the class of the model before it); its row is no compiled time"]
    return "\n".join(lines)


def kernel_lines(rows):
    """The bench's profile: each model's kernel time per step by kind, and its excess over gpt's."""
    kinds = [kind for kind in rows[0]["kernel_ms"] if kind != "total"]
    base = rows[0]["kernel_ms"]
    lines = ["", "where the time goes: kernel ms per step (in brackets: minus gpt's)", "",
             f"| model | {' | '.join(kinds)} | total |", f"|---|{'---:|' * (len(kinds) + 1)}"]
    for row in rows:
        ms = row["kernel_ms"]
        lines.append(f"| `{row['model']}` | " + " | ".join(f"{ms[k]:.1f} ({ms[k] - base[k]:+.1f})" for k in kinds + ["total"]) + " |")
    return lines


def checks_passed(results):
    eq = results.get("equivalence", {"exit": "0", "passed": 1})
    ok = eq["exit"] == "0" and eq["passed"] > 0
    for t in results["train"].values():
        if t.get("trained_only"):  # its losses are a finding (dcmha's bf16 attention may blow up): it must run
            ok &= t["exit"] == "0"
            continue
        ok &= bool(t.get("loss_falls") and t.get("resumed") and t.get("sampled") and t.get("no_recompile", True))
    ok &= all(isinstance(e, dict) and e.get("graphs", 0) >= 1 for e in results["explain"].values())
    ok &= all(isinstance(rows, list) for rows in results["bench"].values())
    ok &= not results.get("bench_past_recompile_limit")
    return ok


def report(out, logs):
    """table.md and summary.json from the logs; returns (table, passed)."""
    results = collect(logs)
    results["passed"] = checks_passed(results)
    table = summarize(results) + f"\n\n{'ALL CHECKS PASSED' if results['passed'] else 'SOME CHECKS FAILED'}\n"
    (out / "table.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    return table, results["passed"]


def run_steps(args, specs, mode, logs, work):
    import torch
    budget = mode["budget"] if args.budget is None else args.budget
    r = Runner(logs, budget, args.device)
    steps = args.only.split(",") if args.only else ["equivalence", "explain", "train", "bench"]
    shapes = args.shapes.split(",") if args.shapes else list(mode["shapes"])
    if budget and "bench" in steps:  # phase 1 must leave phase 2 its share of the budget
        r.phase_deadline = r.deadline - budget * (mode["phase_2"] / mode["budget"] if mode["budget"] else 0.4)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    device_line = f"{where} | torch {torch.__version__} | python {sys.version.split()[0]}"
    print(f"GPU check: {device_line} | models: {', '.join(specs)}", flush=True)
    train_also = [spec for spec in mode["train_also"] if spec.partition(":")[0] in specs]
    (logs / "run.json").write_text(json.dumps({"device": device_line, "models": specs, "train_also": train_also,
                                               "argv": sys.argv[1:], "bench_how": "compiled, bf16 autocast on CUDA"
                                               if mode["bench_compile"] else "eager, float32 on the CPU",
                                               "shapes": {name: mode["shapes"][name] for name in shapes},
                                               "loss_drop": mode["loss_drop"]}, indent=1))
    t0 = time.time()
    data_dir = work / "data"  # the offline corpus, capped: the runs are short
    r.run("prepare_data", [sys.executable, "prepare_data.py", f"--data_dir={data_dir}", "--max_tokens=3000000"])

    # phase 1, side by side: equivalence, explain, train, and bench's compilation into the cache
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "4"  # many processes compile at once
    # two pools: the largest shape's compile-and-runs, a few at a time and the slowest first, in
    # one; in the other from the start, the suite, explain, the training runs, then the other compiles
    # (one pool would hold a worker for each compile that waits its turn, and start the training late)
    compiles = sorted(((shape_name, spec) for shape_name in shapes for spec in specs) if "bench" in steps else [],
                      key=lambda job: compile_order(job[1]))
    big_workers = mode["big_workers"] if any(shape_name == BIG_SHAPE for shape_name, _ in compiles) else 0
    with ThreadPoolExecutor(big_workers or 1) as big_pool, ThreadPoolExecutor(mode["workers"] - big_workers) as pool:
        jobs = []
        if "equivalence" in steps:
            jobs.append(pool.submit(equivalence, r, mode))
        if "explain" in steps:
            jobs.append(pool.submit(explain, r, specs))
        if "train" in steps:
            jobs += [pool.submit(train, r, mode, spec, data_dir, work) for spec in training_order(specs)]
            jobs += [pool.submit(train, r, mode, spec, data_dir, work, checks=False) for spec in train_also]
        warms = {}
        for shape_name, spec in compiles:  # each pool takes its own in compile_order
            warms[shape_name, spec] = (big_pool if shape_name == BIG_SHAPE else pool).submit(
                bench, r, mode, shape_name, [bench_spec(mode, shape_name, spec)], True)
        [job.result() for job in jobs]
        warmed = {key: w.result() for key, w in warms.items()}
    print(f"phase 1 done in {time.time() - t0:.0f} s", flush=True)

    # phase 2, alone on the device: the timed and profiled benches (of the models that compiled)
    r.phase_deadline = float("inf")
    for shape_name in reversed(shapes) if "bench" in steps else []:
        ready = [bench_spec(mode, shape_name, spec) for spec in specs if warmed[shape_name, spec] == 0]
        if "gpt" in ready:
            bench(r, mode, shape_name, ready, warm=False)
    print(f"all steps done in {time.time() - t0:.0f} s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("out", help="folder for summary.json, table.md and logs.tar.gz")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default: cuda 500, cpu none)")
    parser.add_argument("--models", default="", help="comma-separated specs (default: every model and dca:dca_k=2)")
    parser.add_argument("--only", default="", help="comma-separated steps to run (default: all): "
                        "equivalence, explain, train, bench")
    parser.add_argument("--shapes", default="", help="comma-separated bench shapes (default: all; cuda: dca_paper, gpt2_small)")
    parser.add_argument("--report", default="", help="make table.md and summary.json from this folder of logs; run nothing")
    parser.add_argument("--explain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    specs = args.models.split(",") if args.models else model_specs()
    unknown = set(filter(None, args.shapes.split(","))) - set(MODES[args.device]["shapes"])
    if unknown:
        sys.exit(f"error: --shapes: no shape {', '.join(sorted(unknown))} on {args.device}; "
                 f"choose from {', '.join(MODES[args.device]['shapes'])}")
    if args.explain:
        return explain_models(args.device, specs, args.out)
    out = Path(args.out)
    if args.report:
        out.mkdir(parents=True, exist_ok=True)
        table, passed = report(out, Path(args.report))
        print(table)
        sys.exit(0 if passed else 1)

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; run with --device=cpu to test the script on the CPU")
    logs, work = out / "logs", out / "work"
    for folder in (logs, work):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    run_steps(args, specs, MODES[args.device], logs, work)
    table, passed = report(out, logs)
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:  # one file to carry back
        tar.add(logs, arcname="logs")
    shutil.rmtree(work, ignore_errors=True)
    print(table)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()

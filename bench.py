"""
Speed and memory of every model at one shape, side by side, as ratios to the baseline "gpt".

    python bench.py                                    # all registered models, CPU or CUDA
    python bench.py --models=gpt,dca,dca:dca_k=2 --n_layer=12
    python bench.py --json                             # machine-readable
    python bench.py --markdown                         # the README's tables

Timing: forward + backward of one batch, all models in ONE process, interleaved (model A,
B, C, A, B, C, ...) so that a slow moment of the machine hits every model alike; ms/step is the
median over the repeats, and "× gpt" the median of the per-round ratios (each model's step over
gpt's step of the same round), which cancels a slowness of the machine that lasts a round.
Memory: on CUDA the peak allocated memory of a step; on CPU the peak RSS a fresh process gains
over its start while it builds the model and runs two steps (each model in its own process,
since RSS never goes down).

Where the time goes (--profile=DIR): torch.profiler over two more steps of each model, its
kernels' time per step summed into matmuls, attention, fused (the kernels inductor generates
under --compile: the elementwise work, norms, reductions) and the rest; the top kernels of each
model into DIR/<model>.txt.
"""

import argparse
import importlib
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import fields

import torch

import gpt
from train import ArgumentParser, UserError, run_cli, cpu_name, device_name, peak_flops, resolve_device, resolve_dtype
from train import str2bool  # the flag parser's reading of true / false


def parse_spec(spec):
    """'dca:dca_k=2;grn=v2' -> ('dca', {'dca_k': 2, 'grn': 'v2'}) typed by the config's fields."""
    name, _, rest = spec.partition(":")
    models = gpt.all_models()
    if name not in models:
        sys.exit(f"error: unknown model {name!r} in --models; known: {', '.join(models)}")
    types = {f.name: f.type for f in fields(models[name][0])}
    overrides = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        if key not in types:
            sys.exit(f"error: {spec}: model {name} has no option {key!r}")
        kind = types[key]
        try:
            overrides[key] = (str2bool if kind is bool else kind)(value)
        except (ValueError, argparse.ArgumentTypeError):
            sys.exit(f"error: {spec}: {key}={value!r} is not a valid {kind.__name__}")
    return name, overrides


def build(spec, args, device):
    name, overrides = parse_spec(spec)
    shape = dict(block_size=args.block_size, vocab_size=args.vocab_size, n_layer=args.n_layer,
                 n_head=args.n_head, n_embd=args.n_embd)
    config_class, model_class = gpt.all_models()[name]
    torch.manual_seed(0)
    try:
        model = model_class(config_class(**{**shape, "model": name, **overrides})).to(device)
    except ValueError as e:
        sys.exit(f"error: {spec}: {e}")
    return torch.compile(model) if args.compile else model, model.num_params(), model.flops_per_token()


def allow_a_compile_per_model(n_models):
    """torch.compile keeps its compiled graphs per code object, and every model runs gpt.py's
    GPT.forward: past dynamo's recompile_limit (8 graphs) the next model's forward would run
    uncompiled, with only a warning (the GPU benches' ninth model did, 2026-11-26/27). Room for
    8 graphs per model. (cache_size_limit: its name before torch 2.7, an alias since.)"""
    config = torch._dynamo.config
    config.cache_size_limit = max(config.cache_size_limit, 8 * n_models)


def step_dtype(device, name="auto"):
    """What a step computes in: --dtype, auto as train.py picks it (bf16 autocast on recent GPUs, else float32)."""
    return getattr(torch, resolve_dtype(name, device))


def make_step(model, args, device):
    idx = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size), device=device)
    dtype = step_dtype(device, args.dtype)
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with amp:
            _, loss = model(idx, targets=idx)
        loss.backward()
        for p in model.parameters():
            p.grad = None
    return step


def rss_mb(field):
    """VmRSS (now) or VmHWM (peak) of this process, from Linux's /proc, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def memory_probe(spec, args):
    """Run in a fresh process: peak RSS gained by building the model and running two steps."""
    device = torch.device("cpu")
    # code a kernel model's first step imports (Triton; torch.library's custom ops load dynamo, sympy,
    # ...) is ~140 MB of RSS that no model's tensors hold: every probe loads it before measuring
    for module in ("dca_kernels", "dcmha_kernels", "torch._dynamo"):
        importlib.import_module(module)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (high-water mark) to the current RSS
    before = rss_mb("VmRSS")
    model, _, _ = build(spec, args, device)
    step = make_step(model, args, device)
    step()
    step()
    print(rss_mb("VmHWM") - before)


def parse_args():
    parser = ArgumentParser(prog="bench.py", description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    parser.add_argument("--models", default="", help="comma-separated model[:key=value;key=value] specs; default: all")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_head", type=int, default=6)
    parser.add_argument("--n_embd", type=int, default=384)
    parser.add_argument("--vocab_size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="autocast dtype of a step; auto as train.py: bf16 on recent GPUs (fp16 on older), else float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--peak_flops", type=float, default=0.0, help="peak FLOP/s for MFU (default: by device name)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown (for the README)")
    parser.add_argument("--profile", default="", metavar="DIR",
                        help="also profile two steps of each model: kernel time per step by kind in the output, "
                             "each model's top kernels in DIR/<model>.txt")
    parser.add_argument("--memory_probe", default="", help=argparse.SUPPRESS)
    parser.add_argument("--warm_cache", action="store_true",
                        help="only compile the given models and run their warm-up steps, timing nothing: fills "
                             "inductor's on-disk cache, so that a later timed run (alone) compiles in seconds")
    args = parser.parse_args()
    for key in ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "vocab_size", "repeats"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key}={getattr(args, key)} must be >= 1")
    for key in ("warmup", "peak_flops"):
        if not getattr(args, key) >= 0:
            raise UserError(f"--{key}={getattr(args, key)} must be >= 0")
    if args.models and not all(args.models.split(",")):
        raise UserError(f"--models={args.models} has an empty spec; give comma-separated model[:key=value] specs")
    return args


def warm_cache(specs, args, device):
    """Compile each model and run its warm-up steps, timing nothing (--warm_cache)."""
    if args.compile:
        allow_a_compile_per_model(len(specs))
    for spec in specs:
        model, _, _ = build(spec, args, device)
        step = make_step(model, args, device)
        for _ in range(max(args.warmup, 1)):
            step()


def time_steps(specs, args, device):
    """Build every model, warm it up (and compile it), then time its steps interleaved with the
    others': {spec: {"params", "flops_per_token", "kv_bytes_per_token", "step", "times"}}."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.compile:
        allow_a_compile_per_model(len(specs))
    runs = {}
    for spec in specs:
        model, n_params, flops = build(spec, args, device)
        kv = gpt.kv_cache_bytes_per_token(getattr(model, "_orig_mod", model), args.block_size)  # float32
        runs[spec] = {"params": n_params, "flops_per_token": flops, "kv_bytes_per_token": kv,
                      "step": make_step(model, args, device), "times": []}
        for _ in range(args.warmup):  # also compiles, with --compile
            runs[spec]["step"]()
    for _ in range(args.repeats):  # interleaved: every model sees the same machine state
        for run in runs.values():
            sync()
            t0 = time.perf_counter()
            run["step"]()
            sync()
            run["times"].append(time.perf_counter() - t0)
    return runs


def measure_memory(runs, args, device):
    """run["mem"], MiB: CUDA's peak allocated memory of one step, or (CPU) a fresh process's RSS gain."""
    for spec, run in runs.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            run["step"]()
            run["mem"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            probe = [sys.executable, __file__, f"--memory_probe={spec}"] + [
                f"--{k}={getattr(args, k)}" for k in ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "vocab_size", "dtype")]
            run["mem"] = float(subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split()[-1])


# a kernel's kind, from its name (CUDA kernels, or aten ops on the CPU), tried in this order
KERNEL_KINDS = [("attention", r"flash|fmha|attention|sdpa|scaled_dot_product"),
                ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|triton_tem|^aten::(mm|addmm|bmm|baddbmm|_addmm_activation)$"),
                ("fused", r"^triton_|cpp_fused")]


def kernel_kind(name):
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, name.lower())), "other")


def file_name(spec):
    """A model spec as a file name: 'dca:dca_k=2;grn_kernel=true' -> 'dca-dca_k-2-grn_kernel-true'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", spec)


def profile_steps(runs, args, device, folder, steps=2):
    """run["kernel_ms"]: the device's kernel time per step by kind (on the CPU: the ops' self CPU
    time); each model's top kernels into folder/<spec>.txt."""
    from pathlib import Path
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    for spec, run in runs.items():
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                run["step"]()
            if cuda:
                torch.cuda.synchronize()
        events = prof.key_averages()
        if cuda:
            kernels = [(e.key, e.self_device_time_total) for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        else:
            kernels = [(e.key, e.self_cpu_time_total) for e in events]
        kinds = {kind: 0.0 for kind, _ in KERNEL_KINDS + [("other", "")]}
        for name, us in kernels:
            kinds[kernel_kind(name)] += us / 1000 / steps
        kinds["total"] = sum(kinds.values())
        run["kernel_ms"] = {kind: round(ms, 2) for kind, ms in kinds.items()}
        top = events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25,
                           max_name_column_width=90)
        summary = ", ".join(f"{kind} {ms:.2f}" for kind, ms in run["kernel_ms"].items())
        (folder / f"{file_name(spec)}.txt").write_text(
            f"{spec}: ms per step of {'CUDA kernels' if cuda else 'CPU ops (self time)'}: {summary}\n\n{top}\n")


def paired_ratio(times, base_times):
    """The median over rounds of times[i] / base_times[i]: the step-time ratio of two models timed
    interleaved, each round's slowness of the machine cancelled (unlike median(times) / median(base))."""
    return statistics.median(t / b for t, b in zip(times, base_times, strict=True))


def result_rows(runs, args, peak):
    """One row per model: speed, MFU (None without a known peak), memory and KV cache, and their ratios to gpt."""
    base_mem = runs["gpt"]["mem"]
    rows = []
    for spec, run in runs.items():
        ms = statistics.median(run["times"]) * 1000
        tokens_per_s = args.batch_size * args.block_size / (ms / 1000)
        rows.append({"model": spec, "params": run["params"], "ms_per_step": round(ms, 2),
                     "tokens_per_s": round(tokens_per_s), "flops_per_token": run["flops_per_token"],
                     "mfu": None if peak is None else round(run["flops_per_token"] * tokens_per_s / peak, 4),
                     "peak_mem_mb": round(run["mem"], 1),
                     "ratio_to_gpt": round(paired_ratio(run["times"], runs["gpt"]["times"]), 3),
                     "step_ms": [round(t * 1000, 2) for t in run["times"]],  # every round's, in order
                     "mem_ratio_to_gpt": round(run["mem"] / base_mem, 3),
                     "kv_bytes_per_token": run["kv_bytes_per_token"],  # float32, after block_size tokens
                     "kv_ratio_to_gpt": round(run["kv_bytes_per_token"] / runs["gpt"]["kv_bytes_per_token"], 3)})
        if "kernel_ms" in run:
            rows[-1]["kernel_ms"] = run["kernel_ms"]
    return rows


def print_table(rows, args, device, dtype):
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU ({cpu_name()}), {torch.get_num_threads()} threads")
    title = (f"{where} | {dtype} | batch {args.batch_size} x {args.block_size} tokens | n_layer {args.n_layer} "
             f"n_head {args.n_head} n_embd {args.n_embd} vocab {args.vocab_size} | fwd+bwd, median of {args.repeats} "
             f"interleaved rounds (× gpt: of the per-round ratios)"
             f"{' | compiled' if args.compile else ''} | torch {torch.__version__}")
    mfu = lambda r: "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"  # noqa: E731
    if args.markdown:
        print(f"{title}\n\n| model | params | ms/step | tokens/s | MFU (approx.) | peak mem MB | × gpt time | × gpt mem | "
              f"KV cache × gpt |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| `{r['model']}` | {r['params']:,} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,} | {mfu(r)} | "
                  f"{r['peak_mem_mb']:.0f} | {r['ratio_to_gpt']:.2f} | {r['mem_ratio_to_gpt']:.2f} | {r['kv_ratio_to_gpt']:.2f} |")
        return
    print(title)
    print(f"{'model':<28} {'params':>11} {'ms/step':>9} {'tok/s':>9} {'MFU':>6} {'mem MB':>8} {'× gpt':>7} {'mem × gpt':>9} "
          f"{'KV × gpt':>8}")
    for r in rows:
        print(f"{r['model']:<28} {r['params']:>11,} {r['ms_per_step']:>9.1f} {r['tokens_per_s']:>9,} {mfu(r):>6} "
              f"{r['peak_mem_mb']:>8.0f} {r['ratio_to_gpt']:>7.3f} {r['mem_ratio_to_gpt']:>9.3f} {r['kv_ratio_to_gpt']:>8.3f}")


def print_kernel_times(rows, markdown):
    """--profile's table: each model's kernel time per step by kind, in ms and as a share of its total."""
    kinds = list(rows[0]["kernel_ms"])
    cells = lambda r: [f"{r['kernel_ms'][k]:.1f} ({100 * r['kernel_ms'][k] / max(r['kernel_ms']['total'], 1e-9):.0f}%)"  # noqa: E731
                       if k != "total" else f"{r['kernel_ms'][k]:.1f}" for k in kinds]
    print("\nwhere the time goes: kernel ms per step (share of the model's total)")
    if markdown:
        print(f"\n| model | {' | '.join(kinds)} | × gpt's total |\n|---|{'---:|' * (len(kinds) + 1)}")
        for r in rows:
            print(f"| `{r['model']}` | {' | '.join(cells(r))} | {r['kernel_ms']['total'] / rows[0]['kernel_ms']['total']:.2f} |")
        return
    print(f"{'model':<28} " + " ".join(f"{k:>14}" for k in kinds) + f" {'× gpt':>7}")
    for r in rows:
        print(f"{r['model']:<28} " + " ".join(f"{c:>14}" for c in cells(r))
              + f" {r['kernel_ms']['total'] / rows[0]['kernel_ms']['total']:>7.2f}")


def main():
    args = parse_args()
    if args.memory_probe:
        return memory_probe(args.memory_probe, args)
    specs = args.models.split(",") if args.models else list(gpt.all_models())
    device = resolve_device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                            "cpu" if args.device == "auto" else args.device)
    if args.warm_cache:
        return warm_cache(specs, args, device)
    if "gpt" not in specs:
        specs.insert(0, "gpt")
    runs = time_steps(specs, args, device)
    measure_memory(runs, args, device)
    if args.profile:
        profile_steps(runs, args, device, args.profile)
    dtype = str(step_dtype(device, args.dtype)).removeprefix("torch.")
    rows = result_rows(runs, args, peak_flops(device_name(device), dtype, args.peak_flops))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows, args, device, dtype)
        if args.profile:
            print_kernel_times(rows, args.markdown)


if __name__ == "__main__":
    run_cli(main)

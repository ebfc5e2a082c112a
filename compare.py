"""
Compare models the way the papers do: several seeds each, the same data order and schedule,
and the baseline's loss-vs-compute curve to turn a loss difference into a compute multiplier.

    python compare.py --name=deep8 --models=gpt,resformer,dca,dca:dca_k=2 --seeds=1,2,3 \
                      --lengths=0.5,2 --n_layer=8 --max_iters=1000     # any train.py flag
    python compare.py --name=deep8 --summary                           # table + plots from the logs
    python compare.py --name=deep8 --speed                             # every model's ms/step, one process
    python compare.py --name=deep8 --summary --against=gpt:learning_rate=2e-3  # another of its baselines
    python compare.py --name=depth --across=deep8,deep16               # the same models across grids
    python compare.py --name=own --across=deep8-xeon,deep16-xeon --own_rates  # each at the rate it has there

Every (model, seed) trains with train.py into out_dir/NAME/<model>-s<seed>/; a finished run is
skipped and an interrupted one resumes (--init_from=resume), so a grid fills up over several
sittings, or machines. Each finished run's log.jsonl and run.json (command, hardware, versions,
git commit) are copied to results/NAME/runs/, and the summary is made from those files alone:

    table.md, summary.json    per model: params, training FLOPs, final val loss (mean ± std over
                              seeds, nats/token and bits/byte), Δ vs gpt with Welch's and the
                              paired (same seeds = same batches) t-test, the compute multiplier,
                              the steps and the time to reach gpt's final loss, ms/step; under
                              it, seed by seed, each model's Δ vs gpt on the same seed and on
                              how many seeds it ended below gpt
    loss_vs_step.png, loss_vs_flops.png, loss_vs_time.png, delta_vs_gpt.png (and with --speed,
    steps_vs_step_time.png: the steps each model saves against the step time it pays)

Times from a grid's logs compare only if its runs shared one machine alike; --speed times every
model in one process instead (bench.py at the grid's shape, interleaved, each model's time as
gpt's times the median of its per-round ratios to gpt's: speed.json), and the table's time
columns and loss_vs_time.png then use those.

--across puts grids side by side (their summary.json files, made by --summary): each model's
Δ vs the baseline with both p-values and its compute multiplier in every grid, one table and
delta_across.png, in results/NAME/ — e.g. the same models at 8 and 16 layers. It matches rows by
spec; with --own_rates by model, whatever learning rate each grid trained it at (each cell names
it): dcmha:learning_rate=2e-3 at 8 layers next to dcmha:learning_rate=1e-3 at 16. A grid that
trained a model at two rates needs --models to say which row to take (its spec with the rate:
--models=dcmha,muddformer:learning_rate=2e-3).

--against=MODEL (with --summary) makes the table again with another of the grid's models as the
baseline, into results/NAME/against-<MODEL>.md: e.g. each variant against gpt at its own rate.

Model specs are bench.py's: name[:key=value;key=value]. --lengths runs the baseline (the first
model) again at those multiples of max_iters (each with its own full cosine schedule); a power
law plus a constant, L(C) = a·C^-b + c, fitted to the baseline's final losses over training FLOPs
C, says how much compute the baseline needs to reach each model's loss: the multiplier is that
compute over the model's own.
"""

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------
# the grid

def slug(spec):
    """'dca:dca_k=2' -> 'dca-dca_k-2': a folder name."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", spec).strip("-")


def spec_flags(spec):
    """'dca:dca_k=2;grn=v2' -> ['--model=dca', '--dca_k=2', '--grn=v2'] for train.py."""
    name, _, rest = spec.partition(":")
    return [f"--model={name}"] + [f"--{item}" for item in filter(None, rest.split(";"))]


def plan(args, train_flags):
    """Every run of the grid: (run name, model spec, seed, length multiple, train.py flags)."""
    max_iters = int(train_value(train_flags, "max_iters"))
    runs = []
    for seed in args.seeds:  # seed-major: an early stop leaves whole seeds, comparable across models
        for spec in args.models:
            runs.append((f"{slug(spec)}-s{seed}", spec, seed, 1.0, []))
        for length in args.lengths:
            iters = round(max_iters * length)
            runs.append((f"{slug(args.models[0])}-x{length:g}-s{seed}", args.models[0], seed, length,
                         [f"--max_iters={iters}", f"--lr_decay_iters={iters}"]))
    return runs


def train_value(train_flags, key):
    """The value train.py will use for a TrainConfig field: the last --key=value, else the default."""
    import train
    for flag in reversed(train_flags):
        if flag.startswith(f"--{key}="):
            return flag.split("=", 1)[1]
    return getattr(train.TrainConfig(), key)


def check_flags(argv):
    """Parse a run's flags as train.py will, so a typo fails now, not hours into the grid."""
    import train
    try:
        return train.parse_args(argv)
    except train.UserError as e:
        sys.exit(f"error: {e}")


def model_facts(argv):
    """Parameters, FLOPs per token, tokens per step and bytes per token of a run's model."""
    import gpt
    import train
    c, model_values, _ = check_flags(argv)
    folder, meta = train.load_dataset(c)
    model = gpt.build_model(gpt.config_from_dict({**model_values, "vocab_size": meta["vocab_size"]}))
    block_size = model.config.block_size
    bytes_per_token = 1.0 if meta["tokenizer"] == "byte" else meta.get("val_bytes", 0) / max(meta["val_tokens"], 1) or None
    return {"params": model.num_params(), "flops_per_token": model.flops_per_token(),
            "tokens_per_step": c.batch_size * c.gradient_accumulation_steps * block_size,
            "max_iters": c.max_iters, "bytes_per_token": bytes_per_token, "dataset": folder, "tokenizer": meta["tokenizer"],
            **{key: meta.get(key) for key in train.DATA_IDENTITY}}  # what data_of reads back


def environment(env=None):
    """Where and with what a run ran (env: the environment it ran in, for its CPU threads): for run.json."""
    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "", False
    import train
    cpu = train.cpu_name()
    return {"hostname_cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels torch chose
            "cpu_count": os.cpu_count(), "threads": threads(env or os.environ),
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "git_commit": commit + ("+uncommitted changes" if dirty else "")}


def threads(env):
    """The CPU threads a run in env gets: OMP_NUM_THREADS, else torch's default."""
    import torch
    try:
        return int(env.get("OMP_NUM_THREADS") or 0) or torch.get_num_threads()
    except ValueError:  # e.g. "4,2", per nesting level
        return torch.get_num_threads()


def read_records(path):
    """Every record of a log.jsonl, in order; [] where there is none."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def starts_of(records):
    """The {"event": "start"} records: one per sitting of the run (train.py's command, machine and versions)."""
    return [r for r in records if r.get("event") == "start"]


def steps_of(records):
    """The records of the steps, one per step: a resumed run re-logs the steps after its last
    checkpoint, and the later record of a step wins."""
    by_step = {r["step"]: r for r in records if "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def read_log(path):
    return steps_of(read_records(path))


def finished(log, max_iters):
    return bool(log) and log[-1]["step"] == max_iters and "val" in log[-1]


def run_grid(args, train_flags, results):
    """Train every run that is not finished; copy each finished run into results/NAME/runs/."""
    out_root = Path(train_value(train_flags, "out_dir")) / args.name
    runs = plan(args, train_flags)
    todo = []
    for name, spec, seed, length, extra in runs:
        argv = [*train_flags, *spec_flags(spec), f"--seed={seed}", *extra, f"--out_dir={out_root / name}"]
        facts = model_facts(argv)  # also checks the flags, for every run, before anything trains
        kept = results / "runs" / name
        if finished(read_log(kept / "log.jsonl"), facts["max_iters"]) and (kept / "run.json").exists():
            continue
        todo.append((name, spec, seed, length, argv, facts))
    env = run_environment(args.jobs)
    print(f"compare {args.name}: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to train"
          + (f", {args.jobs} at a time, {env['OMP_NUM_THREADS']} CPU thread(s) each" if args.jobs > 1 else ""), flush=True)
    progress = {"started": 0, "seconds": [], "t_start": time.time(), "lock": threading.Lock(), "jobs": args.jobs,
                "env": env}
    with ThreadPoolExecutor(args.jobs) as pool:
        failures = [f for f in pool.map(lambda item: train_run(item, out_root, results, len(todo), progress), todo) if f]
    if failures:
        sys.exit("\n".join(failures) + "\n  rerun this command to resume the grid (finished runs are kept)")
    print(f"grid done in {format_time(time.time() - progress['t_start'])}")


def run_environment(jobs):
    """The runs' environment: with several runs at a time, each gets its share of the CPU's cores as
    threads (unless OMP_NUM_THREADS says otherwise): two runs of two threads each on two cores ran
    DCMHA's steps 7x slower than two of one thread each."""
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def remove_unfinished(out_dir):
    """Remove a run's folder that holds no checkpoint, to train it again from scratch, unless a live
    train.py holds its lock (another compare.py's, or one left going by a compare.py killed with
    SIGKILL: a new run into the removed folder would take a new lock): -> None, or why not."""
    import train
    try:
        with train.locked(str(out_dir / "train.lock")):
            shutil.rmtree(out_dir)
    except train.UserError as e:
        return str(e)


def train_run(item, out_root, results, total, progress):
    """Train (or resume) one run of the grid and copy its files into results; -> an error line or None."""
    name, spec, seed, length, argv, facts = item
    if GRID["stopping"]:  # (the runs not begun when the grid was stopped)
        return None
    out_dir = out_root / name
    log = read_log(out_dir / "log.jsonl")
    t0 = time.time()
    if not finished(log, facts["max_iters"]):  # (a finished one was only not copied yet)
        resume = (out_dir / "ckpt.pt").exists()
        if not resume and out_dir.exists():  # a run that never saved a checkpoint starts again, from scratch
            busy = remove_unfinished(out_dir)
            if busy:
                return f"error: {name}: {busy}"
        with progress["lock"]:
            progress["started"] += 1
            done = progress["seconds"]
            left = total - progress["started"] + 1
            eta = f" | grid ETA {format_time(sum(done) / len(done) * left / progress['jobs'])}" if done else ""
            print(f"[{progress['started']}/{total}] {name}: "
                  f"{'resuming at step ' + str(log[-1]['step']) if resume and log else 'training'}{eta}", flush=True)
        command = [sys.executable, "train.py", *argv] + (["--init_from=resume"] if resume else [])
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "train.log", "a") as f:
            code = train_process(command, stdout=f, stderr=subprocess.STDOUT, env=progress["env"])
        if code is None:  # the grid was stopped before it began
            return None
        if code != 0:
            tail = (out_dir / "train.log").read_text().strip().splitlines()[-1:]
            return f"error: {name} failed (exit {code}): {tail[0] if tail else ''} (its output: {out_dir / 'train.log'})"
        with progress["lock"]:
            progress["seconds"].append(time.time() - t0)
    records = read_records(out_dir / "log.jsonl")
    log, starts = steps_of(records), starts_of(records)  # starts: where and how each sitting ran
    keep = results / "runs" / name
    keep.mkdir(parents=True, exist_ok=True)
    run_info = {"run": name, "model": spec, "seed": seed, "length": length,
                "command": shown_command("train.py", argv), **facts, **environment(progress["env"]),
                "seconds_this_sitting": round(time.time() - t0, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    (keep / "run.json").write_text(json.dumps(run_info, indent=1) + "\n")  # first: a copied log means a whole run
    (keep / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in starts + log))
    print(f"    {name}: val {log[-1]['val']:.4f} after {log[-1]['step']} steps ({format_time(time.time() - t0)})", flush=True)
    return None


# the grid's live train.py processes; once stopping, no new one starts
GRID = {"processes": set(), "stopping": False, "lock": threading.Lock()}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def train_process(command, **popen_args):
    """Run one train.py to its end -> its exit code, or None if the grid is stopping. It stays in
    compare.py's process group: what stops the group (Ctrl-C, a closed terminal, kill -- -PGID) stops it too."""
    with GRID["lock"]:
        if GRID["stopping"]:
            return None
        process = subprocess.Popen(command, cwd=ROOT, **popen_args)
        GRID["processes"].add(process)
    try:
        return process.wait()
    finally:
        with GRID["lock"]:
            GRID["processes"].discard(process)


def stop_grid(name, signum):
    """SIGTERM (kill PID) or SIGINT (Ctrl-C): stop every running train.py as a crash would (SIGTERM,
    SIGKILL 5 s later), so that each resumes from its last checkpoint, then exit 128+signum."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)  # one stop is enough
    with GRID["lock"]:
        GRID["stopping"] = True
        running = list(GRID["processes"])
    for process in running:
        process.terminate()
    deadline = time.time() + 5
    for process in running:
        try:
            process.wait(max(deadline - time.time(), 0))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    print(f"compare {name}: stopped by {signal.Signals(signum).name} with {len(running)} run(s) training; rerun this "
          f"command to resume the grid (finished runs are kept, stopped ones go on from their last checkpoint, if any)",
          file=sys.stderr, flush=True)
    sys.exit(128 + signum)


@contextlib.contextmanager
def stopped_by_signals(name):
    """While the grid trains, SIGTERM and SIGINT stop it (stop_grid); an ignored one (a background
    job's SIGINT) stays ignored. Handlers can be set in the main thread only: elsewhere, none."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s, handler in before.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, lambda signum, frame: stop_grid(name, signum))
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def shown_command(script, argv):
    """The command as the results record it, run from the repo: paths inside the repo relative
    to it (--data_dir=data, not this machine's /home/.../data); others as they were; quoted where
    a shell would split them ('--models=dca:dca_k=2;learning_rate=2e-3')."""
    def shown(arg):
        flag, eq, value = arg.partition("=")
        path = Path(value)
        if eq and path.is_absolute() and path.resolve().is_relative_to(ROOT):
            return f"{flag}={path.resolve().relative_to(ROOT) or '.'}"
        return arg
    return " ".join(["python", script, *(shlex.quote(shown(arg)) for arg in argv)])


def format_time(seconds):
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m" if seconds >= 3600 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


# -----------------------------------------------------------------------------
# speed: every model of the grid timed in one process, so that its times compare

SHAPE = ("n_layer", "n_head", "n_embd", "block_size")  # bench.py's flags; the other model options go in its specs
SAME_FOR_ALL = ("batch_size", "gradient_accumulation_steps", "block_size", "device", "dtype", "compile")


def speed_specs(train_flags, models):
    """The grid's model specs as bench.py specs at the grid's shape: {spec: bench spec}, the shape
    (the baseline's) and its TrainConfig. A spec's training options (learning_rate, ...) do not
    change a step's time and are dropped; one that changes the step's shape or dtype cannot be
    timed beside the others and is refused."""
    import gpt
    parsed = {spec: check_flags([*train_flags, *spec_flags(spec)]) for spec in models}
    base_c, base_values, _ = parsed[models[0]]
    base_config = gpt.config_from_dict({**base_values, "vocab_size": 256})
    shape = {key: getattr(base_config, key) for key in SHAPE}
    mapping = {}
    for spec, (c, values, _) in parsed.items():
        config = gpt.config_from_dict({**values, "vocab_size": 256})
        differs = [key for key in SAME_FOR_ALL
                   if getattr(config if key == "block_size" else c, key) != getattr(base_config if key == "block_size" else base_c, key)]
        if differs:
            sys.exit(f"error: --speed times every model at one shape, but {spec} sets {', '.join(differs)} "
                     f"unlike {models[0]}; time it on its own with bench.py")
        options = {k: v for k, v in values.items() if k not in ("model", *SHAPE)}
        options.update({k: getattr(config, k) for k in SHAPE if getattr(config, k) != shape[k]})  # its own depth, ...
        mapping[spec] = values["model"] + ("" if not options else ":" + ";".join(
            f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sorted(options.items())))
    return mapping, shape, base_c


SPEED_REPEATS = 30  # bench.py's median over 10 steps moved a ratio by up to 0.2 between two runs on a shared
                   # 2-core VM (resformer 1.12x, then 0.92x); over 30, by up to 0.06, but AttnRes's by 0.17
                   # (1.38x, then 1.55x) (2026-11-28)


def measure_speed(results, models):
    """Run bench.py once for all the grid's models at its shape, in its dtype, on its kind of device;
    write results/NAME/speed.json."""
    import torch
    import train
    info = json.loads((results / "compare.json").read_text())
    models = models or info["models"]
    mapping, shape, c = speed_specs(info["train_flags"], models)
    if c.device == "xla":
        sys.exit("error: --speed times with bench.py, which runs on cpu, cuda or mps, not xla: time the grid's "
                 "models on one of those, or compare the runs' logged ms/step, which came from one kind of chip")
    try:
        device = train.resolve_device(c.device)  # auto: as train.py picks it
        _, meta = train.load_dataset(c)
    except train.UserError as e:
        sys.exit(f"error: {e} (--speed needs the grid's device and, for the vocabulary size, its data)")
    use_compile = train.str2bool(c.compile) if c.compile != "auto" else device.type == "cuda"
    bench_specs = list(dict.fromkeys(mapping.values()))
    argv = ["--json", f"--models={','.join(bench_specs)}", f"--batch_size={c.batch_size}",
            *[f"--{k}={v}" for k, v in shape.items()], f"--vocab_size={meta['vocab_size']}",
            f"--device={device.type}", f"--dtype={c.dtype}", f"--repeats={SPEED_REPEATS}",
            *(["--compile"] if use_compile else [])]
    print(f"timing {len(bench_specs)} model(s) in one process: {shown_command('bench.py', argv)}", flush=True)
    done = subprocess.run([sys.executable, "bench.py", *argv], cwd=ROOT, capture_output=True, text=True)
    try:
        rows = {r["model"]: r for r in json.loads(done.stdout)} if done.returncode == 0 else None
    except json.JSONDecodeError:
        rows = None
    if rows is None:
        sys.exit(f"error: bench.py failed (exit {done.returncode}): {(done.stderr.strip().splitlines() or [''])[-1]}")
    for run in load_runs(results):  # the same models as the runs trained, or the times say nothing
        timed = rows.get(mapping.get(run["model"]))
        if timed and timed["params"] != run["params"]:
            sys.exit(f"error: bench.py built {run['model']} with {timed['params']:,} parameters, its runs have "
                     f"{run['params']:,}: not the same model")
    # bench times one micro-batch's forward and backward: an optimizer step is gradient_accumulation_steps of them.
    # Each model's ms/step is gpt's times the model's paired ratio to it (bench's ratio_to_gpt: the median of
    # per-round ratios), so that the table's and the plots' time ratios are those paired ratios
    gpt_ms = rows["gpt"]["ms_per_step"] * c.gradient_accumulation_steps
    speed = {"command": shown_command("bench.py", argv), "models": mapping, "paired": True,
             "ms_per_step": {spec: gpt_ms * rows[bench]["ratio_to_gpt"] for spec, bench in mapping.items()},
             "params": {spec: rows[bench]["params"] for spec, bench in mapping.items()},
             "bench": list(rows.values()), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
             else device.type, **environment(),
             "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    (results / "speed.json").write_text(json.dumps(speed, indent=1) + "\n")
    if set(models) != set(info["models"]):
        print(f"speed.json now times {len(models)} of the grid's {len(info['models'])} models: a table of others "
              f"takes its times from the training logs", flush=True)
    return speed


# -----------------------------------------------------------------------------
# statistics, from the runs' files alone

def load_runs(results):
    """results/NAME/runs/* -> list of dicts: run.json plus its log and derived curves."""
    runs = []
    for folder in sorted((results / "runs").glob("*")):
        if not (folder / "run.json").exists():
            continue
        run = json.loads((folder / "run.json").read_text())
        records = read_records(folder / "log.jsonl")
        log = steps_of(records)
        if not finished(log, run["max_iters"]):
            continue
        evals = [r for r in log if "val" in r]
        run["steps"] = [r["step"] for r in evals]
        run["val"] = [r["val"] for r in evals]
        run["flops"] = [r["step"] * run["tokens_per_step"] * run["flops_per_token"] for r in evals]
        run["time"] = [r.get("time", float("nan")) for r in evals]
        run["final"] = evals[-1]["val"]
        run["total_flops"] = run["flops"][-1]
        run["ms_per_step"] = median([r["ms"] for r in log[1:]] or [log[0]["ms"]])  # the first interval compiles/warms up
        run["sittings"] = starts_of(records)
        runs.append(run)
    return runs


def machine(record):
    """(where, the kernels torch chose there, or None) from a start record of a run's log, or from its
    run.json for runs from before those said: the GPU (or TPU), or the CPU's name. CPUs and kernels
    round differently, and the first steps can amplify that."""
    if "cpu" in record:  # a start record
        return (record["cpu"], record.get("cpu_capability")) if record["device"] == "cpu" else (record["device"], None)
    if record.get("cuda"):
        return record["cuda"], None
    return record.get("hostname_cpu") or "an unrecorded machine", record.get("cpu_capability")


def machines(runs):
    """{machine: the names of its runs}, the most runs first. A run resumed on another machine is
    'A + B'; a run.json from before compare.py recorded torch's kernels counts as its CPU's other
    runs when these all recorded the same kernels."""
    where = {run["run"]: sorted({machine(s) for s in run.get("sittings", []) if "cpu" in s} or {machine(run)},
                                key=str) for run in runs}
    kernels = {}
    for places in where.values():
        for name, kernel in places:
            if kernel:
                kernels.setdefault(name, set()).add(kernel)

    def label(name, kernel):
        kernel = kernel or (min(kernels[name]) if len(kernels.get(name, ())) == 1 else None)
        return f"{name} ({kernel})" if kernel else name
    return group_runs(runs, lambda run: " + ".join(dict.fromkeys(label(*place) for place in where[run["run"]])))


UNRECORDED = "not recorded (a run.json from before compare.py recorded the data)"


def data_of(run):
    """The data a run trained and was evaluated on, as its run.json says (train.DATA_IDENTITY, as
    model_facts recorded it): another split is another fixed set of val windows, and moves the logged
    val loss."""
    if run.get("val_tokens") is None:
        return UNRECORDED
    return (f"{Path(run['dataset']).name}: {run['train_tokens']:,} train + {run['val_tokens']:,} val tokens, "
            f"val split by {run['val_split']}")


def refuse_other_data(results, train_flags):
    """A grid's runs are compared on one data: refuse to train more of them on other data than its
    finished runs had. A data folder made again with other prepare_data.py flags (another
    --val_split) keeps its name and its --data_dir, and moves every val loss."""
    import train
    was = {data_of(json.loads(p.read_text())) for p in (results / "runs").glob("*/run.json")} - {UNRECORDED}
    if not was:
        return
    c, _, _ = check_flags(train_flags)
    folder, meta = train.load_dataset(c)
    now = data_of({"dataset": folder, **meta})
    if now not in was:
        sys.exit(f"error: {results}'s runs trained on {' and on '.join(sorted(was))}, but {folder} now holds "
                 f"{now}: make their data again there (python prepare_data.py --force with the flags that made "
                 f"it), or give --data_dir a folder that holds it; nothing was trained or changed")


def group_runs(runs, key):
    """{key(run): the names of its runs}, the largest group first."""
    groups = {}
    for run in sorted(runs, key=lambda r: r["run"]):
        groups.setdefault(key(run), []).append(run["run"])
    return dict(sorted(groups.items(), key=lambda item: -len(item[1])))


def median(xs):
    xs = sorted(xs)
    return 0.5 * (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2])


def mean_std(xs):
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan"))


def welch(a, b, level=0.95):
    """Welch's t-test of mean(a) - mean(b): (the two-sided p-value, (low, high) of its confidence
    interval); nan with fewer than 2 each."""
    from scipy import stats
    if len(a) < 2 or len(b) < 2:
        return float("nan"), (float("nan"), float("nan"))
    test = stats.ttest_ind(a, b, equal_var=False)
    interval = test.confidence_interval(level)
    return float(test.pvalue), (float(interval.low), float(interval.high))


def paired_p(differences):
    """Two-sided paired t-test: are the per-seed differences (model - baseline, same seed = same
    batches) centred on 0? nan with fewer than 2."""
    from scipy import stats
    if len(differences) < 2:
        return float("nan")
    return float(stats.ttest_1samp(differences, 0.0).pvalue)


def fit_power_law(flops, losses, start=None):
    """L(C) = a (C/C0)^-b + c through the baseline's (FLOPs, final loss) points, C0 = their
    geometric mean (for conditioning). -> dict(a, b, c, c0) or None with fewer than 3 lengths.
    start: an earlier fit of nearby points, the only start tried (the bootstrap's refits)."""
    import numpy as np
    from scipy.optimize import OptimizeWarning, curve_fit
    if len(set(flops)) < 3:
        return None
    c0 = float(np.exp(np.mean(np.log(flops))))
    x, y = np.array(flops) / c0, np.array(losses)
    law = lambda x, a, b, c: a * x ** -b + c  # noqa: E731
    starts = [(max(y.max() - y.min(), 1e-3), b0, y.min() * 0.9) for b0 in (0.1, 0.3, 1.0)]  # the fit is not convex
    if start is not None:
        starts = [(start["a"] * (start["c0"] / c0) ** start["b"], start["b"], min(start["c"], y.min() * (1 - 1e-9)))]
    best = None
    for p0 in starts:
        try:
            with warnings.catch_warnings():  # 3 lengths fit 3 parameters exactly: no covariance, and none is used
                warnings.simplefilter("ignore", OptimizeWarning)
                (a, b, c), _ = curve_fit(law, x, y, p0=p0, bounds=([0, 1e-3, 0], [np.inf, 5, y.min()]), maxfev=20000)
        except (RuntimeError, ValueError):
            continue
        err = float(((law(x, a, b, c) - y) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, dict(a=float(a), b=float(b), c=float(c), c0=c0))
    return best[1] if best else None


def flops_to_reach(fit, loss):
    """The training FLOPs at which the fitted baseline reaches loss (inf below its asymptote)."""
    if loss <= fit["c"]:
        return float("inf")
    return fit["c0"] * ((loss - fit["c"]) / fit["a"]) ** (-1 / fit["b"])


def multiplier_intervals(by_length, main, base, fit, n_boot=1000, level=0.95, seed=0):
    """Each model's compute multiplier with a bootstrap interval over seeds: every model's finals
    and every baseline length's are resampled with replacement (the baseline's 1x runs once, as its
    fit point and its mean), the power law refitted, n_boot times. The baseline's resamples come
    from one fixed-seed stream and each model's from its own, seeded by its spec, so a model's
    interval does not move when other models join or leave the table.
    by_length {baseline FLOPs: [finals]}, main {spec: runs at 1x}. -> {spec: (low, high)}, (nan, nan)
    where a model or a fit point has fewer than 2 seeds (a resample of one value has no spread)."""
    import zlib
    import numpy as np
    no_interval = (float("nan"), float("nan"))
    if any(len(v) < 2 for v in by_length.values()):  # a fit point of one seed: no interval for anyone
        return {spec: no_interval for spec in main}
    points = sorted(by_length)
    base_at = points.index(main[base][0]["total_flops"])
    rng = np.random.default_rng(seed)
    refits, base_means = [], []  # the baseline's resampled fit points and their refitted law
    for _ in range(n_boot):
        point_means = [float(rng.choice(by_length[c], len(by_length[c])).mean()) for c in points]
        refits.append(fit_power_law(points, point_means, start=fit))
        base_means.append(point_means[base_at])
    intervals = {}
    for spec, rs in main.items():
        finals = [r["final"] for r in rs]
        if spec == base:
            means = base_means
        else:
            spec_rng = np.random.default_rng([seed, zlib.crc32(spec.encode())])  # the spec's own stream
            means = [float(spec_rng.choice(finals, len(finals)).mean()) for _ in range(n_boot)]
        xs = sorted(flops_to_reach(refit, mean) / rs[0]["total_flops"]  # inf (below the asymptote) sorts last
                    for refit, mean in zip(refits, means) if refit is not None)
        if len(finals) < 2 or len(xs) < 0.9 * n_boot:  # or too many refits failed
            intervals[spec] = no_interval
            continue
        tail = (1 - level) / 2
        intervals[spec] = (xs[int(math.floor(tail * (len(xs) - 1)))], xs[int(math.ceil((1 - tail) * (len(xs) - 1)))])
    return intervals


def time_to_reach(times, vals, target):
    """First time (or step) the val curve reaches target, interpolated between evals; None if never."""
    for i, (t, v) in enumerate(zip(times, vals)):
        if v <= target:
            if i == 0:
                return t
            t0, v0 = times[i - 1], vals[i - 1]
            return t0 + (t - t0) * (v0 - target) / (v0 - v)
    return None


def steps_to_baseline_loss(runs, base_runs):
    """The steps a model's runs need to reach the baseline's final loss, over the baseline's steps:
    on the seed-mean curves (None if never), and per seed to its baseline seed's final (the
    baseline's own: 1.0; None where never, or for a seed the baseline lacks: left out)."""
    base_final = {r["seed"]: r["final"] for r in base_runs}
    base_steps = base_runs[0]["steps"][-1]
    steps = runs[0]["steps"]
    vals = [sum(r["val"][i] for r in runs) / len(runs) for i in range(len(steps))]
    reached = time_to_reach(steps, vals, sum(base_final.values()) / len(base_final))
    paired = [time_to_reach(r["steps"], r["val"], base_final[r["seed"]]) for r in runs if r["seed"] in base_final]
    return (None if reached is None else reached / base_steps), [None if x is None else x / base_steps for x in paired]


def summarize(runs, models, speed=None):
    """Per model: the numbers of the table. models: the specs in their order; models[0] is the baseline.
    speed: speed.json (compare.py --speed), whose one-process ms/step, when it has every model, replaces
    the training logs' (which may come from different sittings or machines) in the time columns."""
    base = models[0]
    main = {spec: [r for r in runs if r["model"] == spec and r["length"] == 1.0] for spec in models}
    main = {spec: sorted(rs, key=lambda r: r["seed"]) for spec, rs in main.items() if rs}
    if base not in main:
        sys.exit(f"error: no finished run of the baseline {base} yet; nothing to compare against")
    lengths = [r for r in runs if r["model"] == base]
    by_length = {}
    for r in lengths:
        by_length.setdefault(r["total_flops"], []).append(r["final"])
    fit = fit_power_law(list(by_length), [sum(v) / len(v) for v in by_length.values()]) if len(by_length) >= 3 else None
    base_final = {r["seed"]: r["final"] for r in main[base]}
    base_mean = sum(base_final.values()) / len(base_final)
    timed = speed and all(speed["params"].get(spec) == rs[0]["params"] for spec, rs in main.items())  # and current
    ms_per_step = {spec: speed["ms_per_step"][spec] if timed else sum(r["ms_per_step"] for r in rs) / len(rs)
                   for spec, rs in main.items()}
    ln2 = math.log(2)
    intervals = multiplier_intervals(by_length, main, base, fit) if fit else {}
    rows = []
    for spec, rs in main.items():
        finals = [r["final"] for r in rs]
        mean, std = mean_std(finals)
        bpt = rs[0]["bytes_per_token"]
        row = {"model": spec, "seeds": [r["seed"] for r in rs], "params": rs[0]["params"],
               "flops_per_token": rs[0]["flops_per_token"], "train_flops": rs[0]["total_flops"],
               "val_mean": mean, "val_std": std, "val_finals": finals,
               "bpb_mean": mean / ln2 / bpt if bpt else None, "bpb_std": std / ln2 / bpt if bpt else None,
               "delta": mean - base_mean, "delta_ci95": None, "welch_p": None,
               "paired_seeds": None, "paired_deltas": None, "paired_p": None,
               "compute_multiplier": None, "compute_multiplier_ci95": None,
               "steps_to_gpt_loss": None, "time_to_gpt_loss": None, "ms_per_step": ms_per_step[spec]}
        if spec != base:
            row["welch_p"], row["delta_ci95"] = welch(finals, list(base_final.values()))
            paired = [r for r in rs if r["seed"] in base_final]  # the seeds the baseline has too
            row["paired_seeds"] = [r["seed"] for r in paired]
            row["paired_deltas"] = [r["final"] - base_final[r["seed"]] for r in paired]
            row["paired_p"] = paired_p(row["paired_deltas"])
        if fit:
            needed = flops_to_reach(fit, mean)
            row["compute_multiplier"] = needed / rs[0]["total_flops"]
            row["compute_multiplier_ci95"] = intervals[spec]
            covered = [min(by_length), max(by_length)]
            row["multiplier_extrapolated"] = not covered[0] <= needed <= covered[1]
        row["steps_to_gpt_loss"], row["steps_to_gpt_loss_paired"] = steps_to_baseline_loss(rs, main[base])
        if row["steps_to_gpt_loss"] is not None:  # and the time those steps take, over the baseline's
            row["time_to_gpt_loss"] = row["steps_to_gpt_loss"] * ms_per_step[spec] / ms_per_step[base]
        rows.append(row)
    source = ({key: speed[key] for key in ("command", "device", "threads", "hostname_cpu", "torch", "measured", "paired")
               if key in speed} if timed else "the training logs")
    used = [r for rs in main.values() for r in rs] + [r for r in lengths if r["length"] != 1.0]
    fit_points = {str(length): machines([r for r in lengths if r["length"] == length])
                  for length in sorted({r["length"] for r in lengths})} if fit else {}
    return {"baseline": base, "fit": fit, "lengths": {str(k): v for k, v in sorted(by_length.items())},
            "ms_per_step_from": source, "machines": machines(used), "fit_machines": fit_points,
            "datasets": group_runs(used, data_of), "rows": rows}


# -----------------------------------------------------------------------------
# the report

def fmt_p(p):
    return "-" if p is None or p != p else (f"{p:.3f}" if p >= 0.001 else f"{p:.0e}")


def fmt_multiplier(x):
    return f"{x:.2f}" if x != float("inf") else "∞"


def multiplier_ci95(row):
    """(low, high) of the compute multiplier's bootstrap interval; (nan, nan) where there is none."""
    return row.get("compute_multiplier_ci95") or (float("nan"),) * 2


def multiplier_cell(row, interval=True):
    """'1.08 (1.05–1.12)': the compute multiplier, ~ where extrapolated, with its bootstrap interval."""
    if row["compute_multiplier"] is None:
        return "-"
    cell = ("~" if row.get("multiplier_extrapolated") else "") + fmt_multiplier(row["compute_multiplier"])
    low, high = multiplier_ci95(row)
    return cell + (f" ({fmt_multiplier(low)}–{fmt_multiplier(high)})" if interval and low == low else "")


def table_markdown(summary, info):
    lines = [f"| model | params | train PFLOPs | val loss (nats/token) | bits/byte | Δ vs {summary['baseline']} "
             f"| p (Welch) | p (paired) | compute × | steps to {summary['baseline']}'s loss | time to it | ms/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        bpb = "-" if r["bpb_mean"] is None else f"{r['bpb_mean']:.4f}"
        mult = multiplier_cell(r, interval=r["model"] != summary["baseline"])
        steps, reach = (("never",) * 2 if r["time_to_gpt_loss"] is None else
                        (f"{r['steps_to_gpt_loss']:.2f}", f"{r['time_to_gpt_loss']:.2f}"))
        delta = "" if r["model"] == summary["baseline"] else f"{r['delta']:+.4f}"
        spread = f" ± {r['val_std']:.4f}" if len(r["seeds"]) > 1 else ""
        lines.append(f"| `{r['model']}` | {r['params'] / 1e6:.2f}M | {r['train_flops'] / 1e15:.3f} | "
                     f"{r['val_mean']:.4f}{spread} (n={len(r['seeds'])}) | {bpb} | {delta} | {fmt_p(r['welch_p'])} | "
                     f"{fmt_p(r['paired_p'])} | {mult} | {steps} | {reach} | {r['ms_per_step']:.0f} |")
    fit = summary["fit"]
    notes = [f"Final val loss (the last eval, at the end of training), mean ± std over the n seeds each model has "
             f"finished (of {info['seeds']}); "
             f"Δ and p against `{summary['baseline']}` (paired: the same seed gives both models the same batches). ",
             "compute ×: the baseline's training FLOPs needed to reach the model's mean loss (from the power law "
             "fitted to its runs at several lengths) over the model's own; ~ = outside the fitted lengths (extrapolated); "
             "in brackets its 95% bootstrap interval over seeds (each model's and each baseline length's final losses "
             "resampled, the power law refitted, 1000 times; none with a single seed). "
             if fit else "compute ×: needs baseline runs at 3 or more lengths (--lengths). ",
             "steps: training steps to reach the baseline's final loss (on the seed-mean curve, between evals), "
             "over the baseline's; time: those steps at the model's ms/step, over the baseline's. ", speed_note(summary)]
    if fit:
        notes.append(f"Fit: L(C) = {fit['a']:.4f}·(C/{fit['c0']:.3g})^-{fit['b']:.3f} + {fit['c']:.4f}.")
    return ("\n".join(lines) + "\n\n" + "".join(notes) + "\n\n" + machines_note(summary) + fit_machines_note(summary)
            + data_note(summary) + "\n" + seeds_markdown(summary))


def seeds_markdown(summary):
    """The paired Δs behind 'p (paired)', seed by seed: on how many seeds each model ended below the
    baseline, and by how much on each; empty where no model shares two seeds with the baseline."""
    base = summary["baseline"]
    rows = [r for r in summary["rows"] if r["model"] != base and len(r["paired_deltas"] or []) >= 2]
    if not rows:
        return ""
    lines = [f"\nSeed by seed: each model's final val loss minus `{base}`'s on the same seed (the same batches).\n",
             f"| model | below {base} on | Δ by seed | from | to |", "|---|---:|---|---:|---:|"]
    for r in rows:
        deltas = r["paired_deltas"]
        by_seed = ", ".join(f"s{seed} {d:+.4f}" for seed, d in zip(r["paired_seeds"], deltas))
        lines.append(f"| `{r['model']}` | {sum(d < 0 for d in deltas)} of {len(deltas)} seeds | {by_seed} | "
                     f"{min(deltas):+.4f} | {max(deltas):+.4f} |")
    return "\n".join(lines) + "\n"


def machines_note(summary):
    """'Trained on: X (all 12 runs).', or, for a grid whose runs trained on several machines, which ran
    where, and a warning."""
    found = summary.get("machines") or {}
    if len(found) <= 1:
        return "".join(f"Trained on: {m} (all {len(names)} runs)." for m, names in found.items())
    return (f"**Trained on {len(found)} machines** ({which_runs(found)}). The kernels' rounding makes the same "
            f"run's curve diverge early (like another seed's), so pair rows from one machine.")


def fit_machines_note(summary):
    """' The power law's points: ...': where the baseline trained at each length, for a grid whose fit
    mixes machines (its 600-step runs on one VM, its 0.5x and 2x on another): every multiplier then
    rests on both machines' rounding."""
    points = summary.get("fit_machines") or {}
    if len({m for where in points.values() for m in where}) <= 1:
        return ""
    return (" The power law's points, the baseline at " + "; ".join(
        f"{float(length):g}× the steps: " + ", ".join(f"{m} ({len(names)} run{'s' * (len(names) > 1)})"
                                                     for m, names in where.items())
        for length, where in points.items()) + ": its compute multipliers mix machines too.")


def recorded_data(summary):
    """({dataset: its runs}, the datasets that runs recorded) of a grid's summary."""
    found = summary.get("datasets") or {}
    return found, [d for d in found if d != UNRECORDED]


def data_note(summary):
    """' Data: X (all 12 runs).', which runs recorded what, or a warning where they saw different data."""
    found, recorded = recorded_data(summary)
    if not recorded:
        return ""
    if len(recorded) > 1:
        return (f" **Trained on {len(recorded)} different datasets** ({which_runs(found)}): another val split is "
                f"another set of val windows, which moves every val loss; rows on different data do not compare.")
    return f" Data: {which_runs(found)}." if len(found) > 1 else f" Data: {recorded[0]} (all {len(found[recorded[0]])} runs)."


def data_in_brief(summary):
    """'; data X' for --across's line of a grid: its one recorded dataset, or a warning."""
    found, recorded = recorded_data(summary)
    if len(recorded) > 1:
        return f"; **on {len(recorded)} datasets** (see its table)"
    return "".join(f"; data {d}" + (" (not recorded by every run)" if len(found) > 1 else "") for d in recorded)


def which_runs(groups):
    """'A: 12 runs; B: run1, run2': the largest group counted, the others named."""
    (first, names), *others = groups.items()
    return "; ".join([f"{first}: {len(names)} runs"] + [f"{key}: {', '.join(runs)}" for key, runs in others])


def speed_note(summary):
    """Where the ms/step column comes from: one process (compare.py --speed), or the training logs."""
    source = summary["ms_per_step_from"]
    if isinstance(source, str):
        return ("ms/step: the median of each run's logged step times, averaged over seeds; runs from different "
                "sittings or machines do not compare (compare.py --speed times all models in one process). ")
    where = source["device"] if source["device"] != "cpu" else f"{source['hostname_cpu']}, {source['threads']} thread(s)"
    paired = (": gpt's median step, and each model's as gpt's times the median of its per-round ratios to gpt's"
              if source.get("paired") else "")  # a speed.json from before 2026-11-28 holds the medians
    return (f"ms/step: every model timed in one process, interleaved, at the grid's shape, by compare.py --speed "
            f"({source['command']}; {where}, torch {source['torch']}, {source['measured']}; forward and backward, "
            f"the optimizer step left out){paired}. ")


# one color per model, the same in every figure (analyze.py's too); a model's second, third, ... variant
# in a grid (another learning rate, k-DCA, ...) gets a lighter shade of it
MODEL_COLORS = {"gpt": "#222222", "resformer": "#1f77b4", "svformer": "#17becf", "dcmha": "#d62728",
                "dca": "#2ca02c", "muddformer": "#9467bd", "attnres": "#ff7f0e"}
OTHER_COLORS = ["#8c564b", "#e377c2", "#bcbd22", "#7f7f7f"]  # models of files not listed above
SHADES = (0.0, 0.5, 0.25, 0.7)  # how far toward white each further variant goes


def model_colors(specs):
    """{spec: color} for specs like "gpt", "gpt:learning_rate=2e-3": each model's own color (its
    plain spec's, where there is one), its further variants (in the order given) lighter shades of it."""
    from matplotlib.colors import to_hex, to_rgb
    colors, others, numbers = {}, {}, variant_numbers(specs)
    for spec in plain_first(specs):
        name = spec.split(":")[0]
        if name not in MODEL_COLORS and name not in others:
            others[name] = OTHER_COLORS[len(others) % len(OTHER_COLORS)]
        white = SHADES[numbers[spec] % len(SHADES)]
        colors[spec] = to_hex([c + white * (1 - c) for c in to_rgb(MODEL_COLORS.get(name) or others[name])])
    return colors


VARIANT_STYLES = (("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."))  # (marker, line style) of variants 0, 1, ...


def plain_first(specs):
    """specs, those without options first: "resformer" before "resformer:value_residual=learnable"."""
    return sorted(specs, key=lambda spec: ":" in spec)


def variant_numbers(specs):
    """{spec: k}: 0 for a model's plain spec (else its first), 1, 2, ... for its further variants in
    the order given; model_colors' shades and variant_styles' markers and lines both count so."""
    numbers, seen = {}, {}
    for spec in plain_first(specs):
        name = spec.split(":")[0]
        numbers[spec] = seen[name] = seen.get(name, -1) + 1
    return numbers


def variant_styles(specs):
    """{spec: (marker, line style)}: a model's variant 0 circles and a solid line, its further
    variants squares dashed, triangles dotted, ...: its shades told apart."""
    return {spec: VARIANT_STYLES[k % len(VARIANT_STYLES)] for spec, k in variant_numbers(specs).items()}


def plots(runs, summary, models, out):
    """loss_vs_{step,flops,time}.png (each model's seed-mean val curve, a min-max band), delta_vs_gpt.png
    and, with one-process times (speed.json), steps_vs_step_time.png."""
    import matplotlib
    matplotlib.use("Agg")
    main = {spec: [r for r in runs if r["model"] == spec and r["length"] == 1.0] for spec in models}
    main = {spec: rs for spec, rs in main.items() if rs}
    color, style = model_colors(models), variant_styles(models)
    # the y range: the second half of training, where the models separate
    late = [v for rs in main.values() for r in rs for s, v in zip(r["steps"], r["val"]) if s >= r["steps"][-1] * 0.3]
    ylim = (min(late) - 0.01, max(late) + 0.01) if late else None
    timed = isinstance(summary["ms_per_step_from"], dict)  # one-process times (speed.json), not the logs'
    if timed:  # the steps at the one-process speed: times that compare
        ms = {r["model"]: r["ms_per_step"] for r in summary["rows"]}
        main = {spec: [{**r, "time": [step * ms[spec] / 1000 for step in r["steps"]]} for r in rs]
                for spec, rs in main.items()}
        time_label = "training time at each model's one-process ms/step (s; compare.py --speed)"
    else:
        time_label = "training wall-clock as logged (s, evals excluded; sittings may differ)"
    for axis, xlabel, fname in (("steps", "training step", "loss_vs_step.png"),
                                ("flops", "training FLOPs", "loss_vs_flops.png"),
                                ("time", time_label, "loss_vs_time.png")):
        loss_plot(main, summary, color, style, axis, xlabel, ylim, out / fname)
    delta_plot(summary, color, out / "delta_vs_gpt.png")
    if timed:
        cost_plot(summary, color, style, out / "steps_vs_step_time.png")
    else:  # (one from an earlier speed.json would no longer match the table)
        (out / "steps_vs_step_time.png").unlink(missing_ok=True)


def loss_plot(main, summary, color, style, axis, xlabel, ylim, path):
    """Val loss against steps, FLOPs or time: per model the mean over seeds, the band min to max;
    a model's variants in its shades, dashed, dotted, ..."""
    import matplotlib.pyplot as plt
    import numpy as np
    base = summary["baseline"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=130)
    for spec, rs in main.items():
        x = np.mean([r[axis] for r in rs], axis=0)
        vals = np.array([r["val"] for r in rs])
        ax.plot(x, vals.mean(0), color=color[spec], ls=style[spec][1], lw=2.2 if spec == base else 1.6,
                label=f"{spec} (n={len(rs)})")
        if len(rs) > 1:
            ax.fill_between(x, vals.min(0), vals.max(0), color=color[spec], alpha=0.15, lw=0)
    if axis == "flops" and summary["fit"]:
        lowest = power_law_overlay(ax, summary, color[base])
        if ylim:  # show every length the fit stands on, the longest included
            ylim = (min(ylim[0], lowest - 0.01), ylim[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val loss (nats/token)")
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.set_title(f"{path.parent.name}: val loss, mean over seeds (band: min-max)", fontsize=10)
    fig.tight_layout()
    many = len(main) > 12  # a sweep's many curves: their legend below the axes (and the x label), not over them
    ax.legend(fontsize=7 if many else 8, frameon=False,
              **dict(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2) if many else {})
    fig.savefig(path, bbox_inches="tight" if many else None)
    plt.close(fig)


def power_law_overlay(ax, summary, color):
    """The baseline's lengths and the power law fitted through them, on a log FLOPs axis; -> the lowest loss."""
    import numpy as np
    fit, base = summary["fit"], summary["baseline"]
    points = sorted((float(k), sum(v) / len(v)) for k, v in summary["lengths"].items())
    xs = np.geomspace(points[0][0] * 0.7, points[-1][0] * 1.4, 100)
    ax.plot(xs, fit["a"] * (xs / fit["c0"]) ** -fit["b"] + fit["c"], ls="--", color=color, lw=1,
            label=f"{base} at {len(points)} lengths: power-law fit")
    ax.scatter(*zip(*points), color=color, zorder=5, s=25)
    ax.set_xscale("log")
    return min(y for _, y in points)


def cost_plot(summary, color, style, path):
    """What each idea saves and what it costs: steps to the baseline's final loss against step time,
    both over the baseline's (one-process times). On the curve steps x time = t, reaching the
    baseline's loss takes t times its wall-clock: below t = 1 a model gets there first."""
    import matplotlib.pyplot as plt
    import numpy as np
    base = summary["baseline"]
    base_ms = next(r["ms_per_step"] for r in summary["rows"] if r["model"] == base)
    points = [(r, r["ms_per_step"] / base_ms) for r in summary["rows"] if r["steps_to_gpt_loss"] is not None]
    never = [r["model"] for r in summary["rows"] if r["steps_to_gpt_loss"] is None]
    xs = [x for _, x in points] + [1.0]
    ys = [v for r, _ in points for v in [r["steps_to_gpt_loss"], *r["steps_to_gpt_loss_paired"]] if v is not None] + [1.0]
    x_range = np.linspace(min(xs) - 0.1, max(xs) + 0.1, 200)
    y_low, y_high = min(ys) - 0.05, max(ys) + 0.05
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=130)
    ax.fill_between(x_range, 0, 1 / x_range, color="#2ca02c", alpha=0.07, lw=0)
    for t in (0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0):
        ax.plot(x_range, t / x_range, color="gray", lw=1.2 if t == 1 else 0.6, ls="-" if t == 1 else ":")
        if x_range[0] <= t / y_high <= x_range[-1]:  # its label where it leaves the top of the plot
            ax.annotate(f"{t:g}×", (t / y_high, y_high), xytext=(2, -10), textcoords="offset points", fontsize=7, color="gray")
    for r, x in points:
        paired = [v for v in r["steps_to_gpt_loss_paired"] if v is not None]
        if r["model"] != base and len(paired) > 1:
            ax.plot([x, x], [min(paired), max(paired)], color=color[r["model"]], lw=1.5, alpha=0.5)
        missing = len(r["steps_to_gpt_loss_paired"]) - len(paired)
        ax.scatter([x], [r["steps_to_gpt_loss"]], s=70 if r["model"] == base else 45, color=color[r["model"]], zorder=3,
                   marker=style[r["model"]][0],
                   edgecolors="white", lw=0.8, label=r["model"] + (
                       f" ({missing} of {len(r['steps_to_gpt_loss_paired'])} seeds miss their {base} seed's loss)"
                       if missing and r["model"] != base else ""))
    ax.set_xlim(x_range[0], x_range[-1])
    ax.set_ylim(y_low, y_high)
    ax.set_xlabel(f"step time ÷ {base}'s (one process: compare.py --speed)")
    ax.set_ylabel(f"steps to {base}'s final loss ÷ {base}'s")
    ax.grid(alpha=0.25)
    ax.legend(fontsize=7, frameon=False, loc="upper right")
    source = summary["ms_per_step_from"]
    ax.set_title(f"{path.parent.name}: steps saved vs step time paid · curves: time to {base}'s loss ÷ {base}'s "
                 f"(green: less)\ndot: seed-mean curve · bar: each seed to its {base} seed's final loss, min-max · "
                 f"{source['device']}, {source['threads']} thread(s)" + (f" · never: {', '.join(never)}" if never else ""),
                 fontsize=8.5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def delta_plot(summary, color, path):
    """Each model's Δ final val loss vs the baseline, with Welch's 95% confidence interval, and
    each seed's difference to the baseline's same seed (the paired test's data) as a dot."""
    import matplotlib.pyplot as plt
    base = summary["baseline"]
    rows = [r for r in summary["rows"] if r["model"] != base]
    fig, ax = plt.subplots(figsize=(10, 0.8 + 0.45 * max(len(rows), 1)), dpi=130)
    for i, r in enumerate(rows):
        low, high = r["delta_ci95"]
        half = (high - low) / 2 if high == high else 0  # no bar with fewer than 2 seeds
        ax.barh(i, r["delta"], xerr=half, color=color[r["model"]], alpha=0.8, capsize=4)
        paired = r["paired_deltas"]
        spread = [0.28 * (2 * j / (len(paired) - 1) - 1) if len(paired) > 1 else 0 for j in range(len(paired))]
        ax.scatter(paired, [i + d for d in spread], s=16, color="black", edgecolors="white", lw=0.6, zorder=3)
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(range(len(rows)), [f"{r['model']}  (n={len(r['val_finals'])}, p={fmt_p(r['welch_p'])})"
                                     for r in rows])  # in the label: never under a bar or an error bar
    ax.invert_yaxis()
    ax.set_xlabel(f"final val loss − {base}'s (nats/token; < 0 is better)")
    ax.set_title(f"{path.parent.name}: final val loss vs {base}'s\nbars: mean Δ, Welch's 95% CI · dots: each seed − "
                 f"{base}'s same seed, in seed order", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def grid_summary(results, models=None, baseline=None):
    """The grid's compare.json, runs, models (given, or the grid's; baseline, if given, moved first)
    and their summary from its logs (models[0] the baseline)."""
    info = json.loads((results / "compare.json").read_text())
    models = models or info["models"]
    if baseline:
        if baseline not in models:
            sys.exit(f"error: --against={baseline} is not a model of {results.name}: use one of {', '.join(models)}")
        models = [baseline] + [m for m in models if m != baseline]
    runs = load_runs(results)
    speed = json.loads((results / "speed.json").read_text()) if (results / "speed.json").exists() else None
    return info, runs, models, summarize(runs, models, speed)


def report(results, models=None):
    info, runs, models, summary = grid_summary(results, models)
    summary["compare"] = info
    (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = table_markdown(summary, info)
    commands = "\n".join(f"    {c}" for c in info["commands"])
    again = f"python compare.py --name={results.name} --summary" + (
        f" --models={','.join(models)}" if models != info["models"] else "")  # a subset of the grid's models
    (results / "table.md").write_text(f"# {results.name}\n\nMade by ({again} makes it again from the logs):\n\n"
                                      f"{commands}\n\n" + table)
    plots(runs, summary, models, results)
    return table


def report_against(results, against):
    """results/NAME/against-<model>.md: the grid's table with another of its models as the baseline
    (e.g. gpt at the variants' learning rate); table.md, summary.json and the plots stay as they are."""
    info, _, _, summary = grid_summary(results, baseline=against)
    again = f"python compare.py --name={results.name} --summary --against={shlex.quote(against)}"
    table = table_markdown(summary, info)
    (results / f"against-{slug(against)}.md").write_text(
        f"# {results.name}, against {against}\n\nMade by `{again}` from the logs (the grid's commands: table.md).\n\n"
        + table)
    return table


# -----------------------------------------------------------------------------
# grids side by side (--across)

def load_grids(root, grids):
    """{grid: its summary.json}, every grid with the same baseline; a clear error otherwise."""
    summaries = {}
    for grid in grids:
        path = root / grid / "summary.json"
        again = f"make it with python compare.py --name={grid} --summary"
        if not path.exists():
            sys.exit(f"error: {path} not found: {again}")
        try:
            summaries[grid] = json.loads(path.read_text())
            summaries[grid]["compare"]["train_flags"]
        except (ValueError, KeyError, TypeError):
            sys.exit(f"error: {path} is unreadable or older than --across: {again} again")
    baselines = {s["baseline"] for s in summaries.values()}
    if len(baselines) > 1:
        sys.exit(f"error: the grids have different baselines ({', '.join(sorted(baselines))}): their Δs do not compare")
    return summaries


def seed_list(seeds):
    """[1, 2, 3, 5] -> 'seeds 1-3, 5': which seeds, so that two grids' overlap shows."""
    spans = []
    for seed in sorted(seeds):
        if spans and seed == spans[-1][1] + 1:
            spans[-1][1] = seed
        else:
            spans.append([seed, seed])
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(
        str(a) if a == b else f"{a}-{b}" for a, b in spans)


def model_row(summary, spec):
    """The row of one model in a grid's summary.json; None if the grid did not train it."""
    return next((r for r in summary["rows"] if r["model"] == spec), None)


def learning_rate_of(spec, train_flags):
    """'dca:dca_k=2;learning_rate=2e-3' -> ('dca:dca_k=2', '2e-3'): the spec without its learning
    rate, and the rate it trained at (its own, else the grid's --learning_rate, else train.py's default)."""
    name, _, rest = spec.partition(":")
    items = [i for i in rest.split(";") if i]
    own = [i.partition("=")[2] for i in items if i.startswith("learning_rate=")]
    others = [i for i in items if not i.startswith("learning_rate=")]
    mantissa, exponent = f"{float(own[-1] if own else train_value(train_flags, 'learning_rate')):e}".split("e")
    rate = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"  # 0.002 -> '2e-3', as the specs write it
    return name + (":" + ";".join(others) if others else ""), rate


def own_rates_name(spec, base):
    """--own_rates' row name: the spec without its learning rate, but for the baseline's own variants
    (gpt:learning_rate=2e-3), which keep their names: they are not the baseline."""
    name = learning_rate_of(spec, [])[0]
    return spec if name == base else name


def by_model(summaries, base, named=()):
    """--own_rates: each grid's rows renamed by model (the spec without its learning rate), the rate
    kept in "learning_rate". A grid with one model at two rates keeps the row whose spec --models
    names (named: muddformer:learning_rate=2e-3), and is refused if it names none (which row would it
    be?). The baseline's own variants (gpt:learning_rate=2e-3) keep their names: they are not the
    baseline. Returns the summaries and the specs that picked a row."""
    picked = set()
    for grid, s in summaries.items():
        train_flags = s["compare"]["train_flags"]
        by_name = {}
        for r in s["rows"]:
            by_name.setdefault(own_rates_name(r["model"], base), []).append(r)
        rows = []
        for model, candidates in by_name.items():
            if len(candidates) > 1:
                chosen = [r for r in candidates if r["model"] in named]
                if len(chosen) != 1:
                    sys.exit(f"error: --own_rates: {grid} trained {model} at more than one learning rate "
                             f"({', '.join(r['model'] for r in candidates)}): name the one to take in --models "
                             f"(e.g. --models={candidates[-1]['model']}), or compare by spec (without --own_rates)")
                picked.add(chosen[0]["model"])
                candidates = chosen
            r = candidates[0]
            r["learning_rate"] = learning_rate_of(r["model"], train_flags)[1]
            r["model"] = model
            rows.append(r)
        kept = {id(r) for r in rows}
        s["rows"] = [r for r in s["rows"] if id(r) in kept]  # in the grid's order
    return summaries, picked


def grid_differences(summaries):
    """{grid: the train.py flags it does not share with every other grid}: what the grids vary."""
    flags = {grid: [f for f in s["compare"]["train_flags"] if not f.startswith(("--data_dir=", "--out_dir="))]
             for grid, s in summaries.items()}  # where the files were is no difference (the data is --dataset)
    shared = set.intersection(*(set(f) for f in flags.values()))
    return {grid: [f for f in f_list if f not in shared] for grid, f_list in flags.items()}


def across_markdown(name, again, summaries, base, differs, models, own_rates):
    """One row per model: in each grid its Δ vs the baseline (n), p (Welch / paired), compute ×;
    with own_rates, the learning rate the model trained at there."""
    grids = list(summaries)
    lines = [f"# {name}", "",
             f"Made by `{again}`, from each grid's summary.json (`python compare.py --name=GRID --summary`):", ""]
    for grid, s in summaries.items():
        b = model_row(s, base)
        found = list(s.get("machines") or {})
        on = ("" if not found else f"; on {found[0]}" if len(found) == 1
              else f"; **on {len(found)} machines** (see its table)") + data_in_brief(s)
        rate = f" at lr {b['learning_rate']}" if own_rates else ""
        lines.append(f"- {grid} ({' '.join(differs[grid]) or 'no flag of its own'}): `{base}`{rate} "
                     f"{b['val_mean']:.4f} ± {b['val_std']:.4f} (n={len(b['seeds'])}, {seed_list(b['seeds'])}){on}")
    fitted = any(r["compute_multiplier"] is not None for s in summaries.values() for r in s["rows"] if r["model"] in models)
    compute = " | compute ×" if fitted else ""  # (no grid with --lengths: no column of dashes)
    lines += ["", "| model | " + " | ".join(f"{g}: Δ vs {base} | p (Welch / paired){compute}" for g in grids) + " |",
              "|---|" + ("---:|---:|---:|" if fitted else "---:|---:|") * len(grids)]
    for spec in models:
        cells = []
        for s in summaries.values():
            r = model_row(s, spec)
            if r is None:
                cells += ["", "", ""][:3 if fitted else 2]
                continue
            rate = f", lr {r['learning_rate']}" if own_rates else ""
            cells += [f"{r['delta']:+.4f} (n={len(r['seeds'])}{rate})", f"{fmt_p(r['welch_p'])} / {fmt_p(r['paired_p'])}"]
            cells += [multiplier_cell(r)] if fitted else []
        lines.append(f"| `{spec}` | " + " | ".join(cells) + " |")
    lines += ["", "Δ: the model's mean final val loss − the baseline's in the same grid (nats/token; < 0 is better)"
              + ("; lr: the learning rate the model trained at in that grid (--own_rates)" if own_rates else "")
              + "; p: Welch's and the paired t-test (same seed = same batches)"
              + ("; compute ×: as in each grid's table, with its 95% bootstrap interval." if fitted
                 else ". No grid ran its baseline at several lengths (--lengths): no compute multipliers.")]
    return "\n".join(lines) + "\n"


def across_plot(summaries, base, differs, models, own_rates, path):
    """Per model, its Δ vs the baseline in each grid (Welch's 95% CI, each seed's paired Δ as a dot)
    and its compute multiplier (95% bootstrap interval), the grids along x; the models left to right
    in the order given (across's: by the last grid's Δ, best first), as the legend lists them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grids = list(summaries)
    fitted = any(r["compute_multiplier"] is not None and math.isfinite(r["compute_multiplier"])
                 for s in summaries.values() for r in s["rows"] if r["model"] in models)
    fig, axes = plt.subplots(1, 2 if fitted else 1, figsize=(11 if fitted else 6.5, 4.8), dpi=130, squeeze=False)
    ax_delta, ax_mult = axes[0][0], axes[0][-1] if fitted else None  # (no grid with --lengths: no multipliers)
    colors = model_colors([base, *models])  # (the baseline's own variants shade off its color)
    styles = variant_styles([base, *models])  # and variants of one model differ in marker and line too

    width = 0.5 / max(len(models), 1)
    for i, spec in enumerate(models):
        color = colors[spec]
        offset = (i - (len(models) - 1) / 2) * width
        for ax, key in ((ax_delta, "delta"), (ax_mult, "compute_multiplier")) if fitted else ((ax_delta, "delta"),):
            xs, ys, lows, highs = [], [], [], []
            for g, s in enumerate(summaries.values()):
                r = model_row(s, spec)
                if r is None or r[key] is None or not math.isfinite(r[key]):  # ∞ (table.md): not drawn
                    continue
                interval = r["delta_ci95"] if key == "delta" else multiplier_ci95(r)
                xs.append(g + offset)
                ys.append(r[key])
                lows.append(r[key] - interval[0] if math.isfinite(interval[0]) else 0)  # nan: no bar
                highs.append(interval[1] - r[key] if math.isfinite(interval[1]) else 0)  # (∞: in table.md)
                if key == "delta":
                    ax.scatter([g + offset] * len(r["paired_deltas"]), r["paired_deltas"], s=9, color=color, alpha=0.45, lw=0)
            marker, line = styles[spec]
            ax.errorbar(xs, ys, yerr=[lows, highs], color=color, marker=marker, ls=line, ms=5, capsize=3, lw=1.6,
                        label=(spec + rates_label(summaries, spec) if own_rates and "learning_rate=" not in spec else spec)
                        if key == "delta" else None)
    labels = [grid_label(g, differs[g], columns=(60 if fitted else 70) // len(grids)) for g in grids]
    ax_delta.axhline(0, color="black", lw=1)
    ax_delta.set_ylabel(f"final val loss − {base}'s (nats/token; < 0 is better)")
    ax_delta.set_title("Δ vs the baseline: mean, Welch's 95% CI;\ndots: each seed − the baseline's same seed"
                       + ("\n(in the legend: the learning rate in each grid)" if own_rates else ""), fontsize=9)
    if fitted:
        ax_mult.axhline(1, color="black", lw=1)
        ax_mult.set_ylabel(f"compute multiplier (× {base}'s training FLOPs)")
        ax_mult.set_title("the baseline's compute the gain is worth\n(95% bootstrap interval over seeds; ∞ in table.md only)",
                          fontsize=9)
        for g, s in enumerate(summaries.values()):
            if s.get("fit") is None:  # say why the column is empty, where it is empty
                ax_mult.text(g, 0.5, f"no multipliers:\n{base} ran at\none length here\n(no --lengths)", ha="center",
                             va="center", fontsize=8, color="0.45", transform=ax_mult.get_xaxis_transform())
    for ax in axes[0]:
        ax.set_xticks(range(len(grids)), labels)
        ax.set_xlim(-0.5, len(grids) - 0.5)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.canvas.draw()  # to place the legend under the tick labels, however many lines they took
    labels_bottom = min(t.get_window_extent().y0 for t in ax_delta.get_xticklabels())
    below = ax_delta.transAxes.inverted().transform((0, labels_bottom))[1] - 0.03
    ax_delta.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, below), ncol=2,
                    frameon=False)  # below the axes: over them it hides the points
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def grid_label(grid, flags, columns):
    """'wide8\n--n_head=8 --n_embd=256\n--learning_rate=1e-3': a grid's name over the flags it varies,
    broken between flags into lines of at most `columns` characters (a longer flag keeps a line of its
    own), so that the labels of neighbouring grids do not run into each other."""
    return "\n".join([grid, *textwrap.wrap(" ".join(flags), max(columns, 1), break_long_words=False,
                                            break_on_hyphens=False)])


def by_last_delta(summaries, models):
    """models, best first by their Δ in the last grid (those without one last)."""
    def last_delta(spec):
        r = model_row(list(summaries.values())[-1], spec)
        return r["delta"] if r and r["delta"] is not None else math.inf
    return sorted(models, key=last_delta)


def rates_label(summaries, spec):
    """' (lr 2e-3 → 1e-3)': the learning rate the model trained at in each grid (once if the same)."""
    rates = [r["learning_rate"] for r in (model_row(s, spec) for s in summaries.values()) if r is not None]
    return f" (lr {' → '.join(rates) if len(set(rates)) > 1 else rates[0]})" if rates else ""


def across(root, name, grids, models=None, own_rates=False):
    """results/NAME/table.md and delta_across.png: the models of every grid (or those given), side by
    side; matched by spec, or with own_rates by model at whatever learning rate each grid has it."""
    summaries = load_grids(root, grids)
    base = next(iter(summaries.values()))["baseline"]
    given, picked = models, set()
    if own_rates:
        summaries, picked = by_model(summaries, base, models or ())
        if models:  # by model too: muddformer:learning_rate=2e-3 -> muddformer (its rate picked a row, or none)
            models = [own_rates_name(m, base) for m in models]
    in_all = [r["model"] for r in summaries[grids[0]]["rows"]
              if r["model"] != base and all(model_row(s, r["model"]) for s in summaries.values())]
    named = bool(models)
    if named:
        unknown = [m for m in models if not any(model_row(s, m) for s in summaries.values())]
        if unknown:
            sys.exit(f"error: --models: {', '.join(unknown)} in none of the grids ({', '.join(grids)}); check the spelling")
        models = [m for m in models if m != base]
    else:
        models = in_all
    if not models:
        sys.exit(f"error: no model besides the baseline {base} to compare" + ("" if named else
                 f" in every grid ({', '.join(grids)}); name some with --models"))
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    again = f"python compare.py --name={name} --across={','.join(grids)}" + (" --own_rates" if own_rates else "") + (
        f" --models={','.join(given if named else models)}" if models != in_all or picked else "")
    differs = grid_differences(summaries)
    models = by_last_delta(summaries, models)  # the table's rows and the figure's points and legend alike
    table = across_markdown(name, again, summaries, base, differs, models, own_rates)
    (out / "table.md").write_text(table)
    across_plot(summaries, base, differs, models, own_rates, out / "delta_across.png")
    return table


# -----------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False,  # --seed is not --seeds
                                     epilog="Every other --key=value flag goes to train.py, for every run.")
    parser.add_argument("--name", required=True, help="the experiment: out_dir/NAME/ and results/NAME/")
    parser.add_argument("--models", default="", help="comma-separated specs, the baseline first (default: gpt and every model)")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds, the same for every model")
    parser.add_argument("--lengths", default="", help="extra lengths of the baseline, as multiples of max_iters, e.g. 0.5,2")
    parser.add_argument("--results", default="results", help="folder of the committed results")
    parser.add_argument("--summary", action="store_true", help="only make table.md, summary.json and the plots from the logs")
    parser.add_argument("--speed", action="store_true",
                        help="time every model of the grid in one process (bench.py at the grid's shape) into "
                             "speed.json, then make the table again with those times")
    parser.add_argument("--across", default="", help="comma-separated grids (with their summary.json): their "
                                                     "models side by side in results/NAME/, no training")
    parser.add_argument("--own_rates", action="store_true", help="with --across: match each model's rows by model, "
                                                                    "whatever learning rate each grid trained it at "
                                                                    "(--models=SPEC:learning_rate=R picks the row "
                                                                    "of a grid that has the model at two)")
    parser.add_argument("--against", default="", help="with --summary: another of the grid's models as the baseline, "
                                                      "into results/NAME/against-<model>.md (table.md stays)")
    parser.add_argument("--markdown", action="store_true", help="print table.md when done")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time (e.g. 2 on a 2-core CPU); each gets cores/jobs CPU threads unless OMP_NUM_THREADS is set")
    args, train_flags = parser.parse_known_args(argv)
    bad = [f for f in train_flags if not re.match(r"--\w+=", f)]
    if bad:
        parser.error(f"train.py flags must be --key=value: {' '.join(bad)}")
    if any(f.startswith(("--model=", "--seed=", "--init_from=")) for f in train_flags):
        parser.error("--model, --seed and --init_from are set per run: use --models and --seeds")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
        args.lengths = [float(x) for x in args.lengths.split(",") if x]
    except ValueError:
        parser.error("--seeds are integers and --lengths numbers, comma-separated")
    if any(x <= 0 for x in args.lengths):
        parser.error("--lengths must be > 0")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    args.across = [g for g in args.across.split(",") if g]
    given = {a.split("=")[0] for a in argv}
    if args.across and (train_flags or args.summary or args.speed or given & {"--seeds", "--lengths", "--jobs"}):
        parser.error("--across reads the grids' summaries: no train.py flags, --seeds, --lengths, --jobs, --summary "
                     "or --speed with it")
    if args.own_rates and not args.across:
        parser.error("--own_rates matches the rows of grids put side by side: use it with --across")
    if args.against and not args.summary:
        parser.error("--against makes a table from the logs: use it with --summary")
    if args.across and (len(set(args.across)) < 2 or len(set(args.across)) < len(args.across)):
        parser.error(f"--across={','.join(args.across)}: name two or more different grids")
    if args.across and (args.name in args.across or (Path(args.results) / args.name / "compare.json").exists()):
        parser.error(f"--name={args.name} is a grid: give the comparison a name of its own")
    return args, train_flags


def main(argv=None):
    args, train_flags = parse_args(sys.argv[1:] if argv is None else argv)
    results = Path(args.results) / args.name
    if args.across:
        table = across(Path(args.results), args.name, args.across, args.models.split(",") if args.models else None,
                       args.own_rates)
        print(table if args.markdown else f"wrote {results}/table.md and delta_across.png")
        return
    if args.summary or args.speed:
        if not (results / "compare.json").exists():
            sys.exit(f"error: {results}/compare.json not found: run the grid first (without --summary or --speed)")
        if args.speed:
            measure_speed(results, args.models.split(",") if args.models else None)
        if args.against:
            print(report_against(results, args.against))
            return
        print(report(results, args.models.split(",") if args.models else None))
        return
    import gpt
    args.models = args.models.split(",") if args.models else list(gpt.all_models())
    command = shown_command("compare.py", sys.argv[1:] if argv is None else argv)
    info = {"commands": [command], "models": args.models, "seeds": args.seeds, "lengths": args.lengths,
            "train_flags": train_flags}
    results.mkdir(parents=True, exist_ok=True)
    old = results / "compare.json"
    if old.exists():
        before = json.loads(old.read_text())
        if shown_command("train.py", before["train_flags"]) != shown_command("train.py", train_flags):  # as recorded
            sys.exit(f"error: {results} holds a grid made with other train.py flags ({' '.join(before['train_flags'])}); "
                     f"use another --name")
        info["models"] = before["models"] + [m for m in args.models if m not in before["models"]]
        info["seeds"] = sorted(set(before["seeds"]) | set(args.seeds))
        info["lengths"] = sorted(set(before["lengths"]) | set(args.lengths))
        info["commands"] = before["commands"] + ([command] if command not in before["commands"] else [])
        refuse_other_data(results, train_flags)
    old.write_text(json.dumps(info, indent=1) + "\n")
    with stopped_by_signals(args.name):
        run_grid(args, train_flags, results)
    table = report(results, info["models"])
    print(table if args.markdown else f"wrote {results}/table.md, summary.json and the plots")


if __name__ == "__main__":
    main()

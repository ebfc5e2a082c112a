"""
Train any model of the registry. One loop for CPU, CUDA, MPS, TPU (torch_xla) and DDP.

    python train.py                                  # byte-level gpt on the offline corpus
    python train.py --model=dca --dca_k=2 --n_layer=6
    python train.py --config=my.toml --max_iters=5000
    torchrun --standalone --nproc_per_node=4 train.py --model=dcmha
    python train.py -h                               # every flag (add --model=X for X's own)

Flags are the fields of TrainConfig below and of the chosen model's config dataclass.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields, asdict

import numpy as np
import torch

import gpt


@dataclass
class TrainConfig:
    # data and output
    dataset: str = "pystdlib"     # data/<dataset>/{train,val}.bin made by prepare_data.py
    data_dir: str = "data"
    out_dir: str = "out"
    init_from: str = "scratch"    # "scratch" or "resume" (from out_dir/ckpt.pt)
    config: str = ""              # optional .json or .toml file of flag values
    # batch: one optimizer step sees batch_size * gradient_accumulation_steps sequences in all
    batch_size: int = 16
    gradient_accumulation_steps: int = 1  # across all processes; divided among DDP ranks
    # schedule
    max_iters: int = 1500
    lr_decay_iters: int = 0       # length of the decay; 0 = max_iters
    learning_rate: float = 2e-3
    min_lr: float = 2e-4
    warmup_iters: int = 100
    lr_schedule: str = "cosine"   # "cosine" or "inverse_sqrt" (the DCA paper's)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0        # 0 = off
    # evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 50
    always_save_checkpoint: bool = True  # else only when val improves
    # system
    device: str = "auto"          # auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps, xla
    dtype: str = "auto"           # auto, float32, bfloat16, float16
    compile: str = "auto"         # auto (on for CUDA), true, false
    peak_flops: float = 0.0       # the device's peak FLOP/s for MFU; 0 = from PEAK_FLOPS by name
    seed: int = 1337


# Peak dense (no sparsity) matmul FLOP/s by device name and dtype, from the vendors' datasheets.
# MFU against them is approximate: clocks, power limits and board variants differ. The first
# entry whose name is in the device's name wins; a device that matches none gets no MFU at all,
# rather than a wrong one (give --peak_flops instead).
PEAK_FLOPS = [
    ("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12}),
    ("H100 NVL", {"bfloat16": 835e12, "float16": 835e12, "float32": 60e12}),
    ("H100", {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}),      # SXM
    ("H200 NVL", {"bfloat16": 835e12, "float16": 835e12, "float32": 60e12}),
    ("H200", {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}),      # SXM
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12}),
    ("L40S", {"bfloat16": 362e12, "float16": 362e12, "float32": 91.6e12}),
    ("L40", {"bfloat16": 181e12, "float16": 181e12, "float32": 90.5e12}),
    ("L4", {"bfloat16": 121e12, "float16": 121e12, "float32": 30.3e12}),
    ("A10G", {"bfloat16": 70e12, "float16": 70e12, "float32": 31.2e12}),
    ("T4", {"float16": 65e12, "float32": 8.1e12}),
    ("V100", {"float16": 125e12, "float32": 15.7e12}),
    ("RTX 4090", {"bfloat16": 165e12, "float16": 165e12, "float32": 82.6e12}),
    ("RTX 3090", {"bfloat16": 71e12, "float16": 71e12, "float32": 35.6e12}),
    ("TPU v5e", {"bfloat16": 197e12}),
    ("TPU v5 lite", {"bfloat16": 197e12}),
    ("TPU v6e", {"bfloat16": 918e12}),
    ("TPU v6 lite", {"bfloat16": 918e12}),
]


def device_name(device):
    """A name to look up in PEAK_FLOPS: the CUDA device's, or the TPU's type (TPU VMs, Colab
    included, set TPU_ACCELERATOR_TYPE, e.g. v5litepod-1, v6e-1); else the device type."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "xla":
        kind = os.environ.get("TPU_ACCELERATOR_TYPE", "")
        return {"v5litepod": "TPU v5e", "v5e": "TPU v5e", "v6e": "TPU v6e"}.get(kind.split("-")[0], f"xla {kind}")
    return device.type


def peak_flops(name, dtype, override=0.0):
    """FLOP/s to divide by for MFU, or None when the device is unknown."""
    if override:
        return override
    for key, peaks in PEAK_FLOPS:
        if key in name:
            return peaks.get(dtype)
    return None


class UserError(Exception):
    """A mistake in the flags or the files: reported in one line, never as a traceback."""


# -----------------------------------------------------------------------------
# flags: argparse built from the dataclasses

def str2bool(s):
    if isinstance(s, bool):
        return s
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def add_fields(parser, dataclass_type, skip=()):
    group = parser.add_argument_group(dataclass_type.__name__)
    for f in fields(dataclass_type):
        if f.name in skip:
            continue
        kind = f.type
        if kind is bool:
            group.add_argument(f"--{f.name}", type=str2bool, nargs="?", const=True, metavar="BOOL",
                               help=f"(default {f.default})")
        else:
            group.add_argument(f"--{f.name}", type=kind, metavar=kind.__name__.upper(),
                               help=f"(default {f.default})")


def read_config_file(path):
    if not os.path.exists(path):
        raise UserError(f"--config={path}: no such file")
    with open(path, "rb") as f:
        if path.endswith(".toml"):
            import tomllib
            return tomllib.load(f)
        if path.endswith(".json"):
            return json.load(f)
    raise UserError(f"--config={path}: use a .json or .toml file")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of the whole usage
        raise UserError(f"{message} (python train.py -h lists the flags)")


def parse_args(argv):
    """-> (TrainConfig, model config overrides, the set of model flags given explicitly)."""
    models = gpt.all_models()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=None)
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    file_values = read_config_file(known.config) if known.config else {}
    model = known.model or file_values.get("model", "gpt")
    if model not in models:
        raise UserError(f"unknown --model={model}; choose one of: {', '.join(models)}")
    config_class = models[model][0]

    parser = ArgumentParser(
        description=f"Train a model (registered: {', '.join(models)}). Flags are --key=value.",
        argument_default=argparse.SUPPRESS, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=list(models), help="(default gpt)")
    add_fields(parser, TrainConfig)
    add_fields(parser, config_class, skip=("model", "vocab_size"))
    args, unknown = parser.parse_known_args(argv)
    for token in unknown:
        key = token.split("=")[0].lstrip("-")
        owners = [name for name, (cc, _) in models.items() if key in {f.name for f in fields(cc)}]
        if owners and token.startswith("--"):
            raise UserError(f"--{key} is an option of model {'/'.join(owners)}; add --model={owners[0]}")
        parser.error(f"unknown option {token!r}")

    values = {**file_values, **vars(args)}
    train_keys = {f.name for f in fields(TrainConfig)}
    model_keys = {f.name for f in fields(config_class)} - {"vocab_size"}
    bad = [k for k in values if k not in train_keys | model_keys]
    if bad:
        raise UserError(f"--config={known.config}: unknown key(s) {', '.join(bad)} for model {model}")
    train_config = TrainConfig(**{k: v for k, v in values.items() if k in train_keys})
    model_values = {k: v for k, v in values.items() if k in model_keys}
    model_values["model"] = model
    explicit = set(model_values) - {"model"} | ({"model"} if "model" in vars(args) else set())
    return train_config, model_values, explicit


# -----------------------------------------------------------------------------
# data

class Batches:
    """Random windows of a token file. One generator, shared by every DDP rank, draws the
    whole step's offsets; each rank takes its own slice, so ranks read disjoint data and a
    run on N processes sees exactly the batches of a run on one. Its state is the data
    position saved in checkpoints."""

    def __init__(self, path, block_size, seed):
        self.data = np.memmap(path, dtype=np.uint16, mode="r")
        self.block_size = block_size
        if len(self.data) < block_size + 2:
            raise UserError(f"{path} has {len(self.data)} tokens, fewer than block_size+2={block_size + 2}; "
                            f"use a smaller --block_size or more data")
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, n):
        return torch.randint(len(self.data) - self.block_size - 1, (n,), generator=self.generator)

    def get(self, offsets, device):
        T = self.block_size
        xy = torch.from_numpy(np.stack([self.data[o:o + T + 1].astype(np.int64) for o in offsets.tolist()]))
        x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


def load_dataset(train_config):
    folder = os.path.join(train_config.data_dir, train_config.dataset)
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
        hint = ("python prepare_data.py" if train_config.dataset == "pystdlib"
                else f"python prepare_data.py --name={train_config.dataset} (with the --source you want)")
        raise UserError(f"no prepared data in {folder}/ (meta.json missing); make it with: {hint}")
    with open(meta_path) as f:
        return folder, json.load(f)


# -----------------------------------------------------------------------------
# schedule

def learning_rate_at(step, c):
    """Linear warmup, then cosine to min_lr over lr_decay_iters, or inverse square root."""
    if step < c.warmup_iters:
        return c.learning_rate * (step + 1) / (c.warmup_iters + 1)
    if c.lr_schedule == "inverse_sqrt":
        return c.learning_rate * math.sqrt(max(c.warmup_iters, 1) / (step + 1))
    decay_iters = c.lr_decay_iters or c.max_iters
    if step >= decay_iters:
        return c.min_lr
    ratio = (step - c.warmup_iters) / max(decay_iters - c.warmup_iters, 1)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.learning_rate - c.min_lr)


# -----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(path, state):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def to_cpu(obj):
    """Checkpoint state with every tensor on the CPU (needed for XLA, harmless elsewhere)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def to_device(model, device):
    """model.to(device), keeping shared parameters (tied embeddings) shared: moving to XLA
    makes a new Parameter in every module that holds one, which would untie them."""
    holders = [(module, name, p) for module in model.modules() for name, p in module.named_parameters(recurse=False)]
    model.to(device)
    moved = {}
    for module, name, p in holders:
        if id(p) in moved:
            setattr(module, name, moved[id(p)])
        else:
            moved[id(p)] = getattr(module, name)


def format_time(seconds):
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m" if seconds >= 3600 \
        else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


# -----------------------------------------------------------------------------
# the run

def setup_device(c):
    """-> (device, dtype, ddp rank, world size, local rank, is_xla)."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world, local = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                          int(os.environ.get("LOCAL_RANK", 0))) if ddp else (0, 1, 0)
    name = c.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "xla":
        try:
            import torch_xla
        except ImportError:
            raise UserError("--device=xla needs torch_xla (on Colab TPU it is preinstalled; "
                            "else pip install torch_xla matching your torch version)")
        device = torch_xla.device()
    else:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device={name} but CUDA is not available here; use --device=cpu")
        device = torch.device("cuda", local) if name == "cuda" else torch.device(name)  # set_device needs an index
        if device.type == "cuda":
            torch.cuda.set_device(device)
    if ddp:
        if name == "xla":
            raise UserError("DDP via torchrun is for CUDA and CPU; on TPU run one process per host")
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    dtype = c.dtype
    if dtype == "auto":
        if device.type == "cuda":
            dtype = "bfloat16" if torch.cuda.get_device_capability(device)[0] >= 8 else "float16"
        else:
            dtype = "bfloat16" if name == "xla" else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype={dtype}: choose auto, float32, bfloat16 or float16")
    return device, dtype, rank, world, local, name == "xla"


def main(argv=None):
    c, model_values, explicit = parse_args(sys.argv[1:] if argv is None else argv)
    if c.init_from not in ("scratch", "resume"):
        raise UserError(f"--init_from={c.init_from}: choose scratch or resume")
    if c.lr_schedule not in ("cosine", "inverse_sqrt"):
        raise UserError(f"--lr_schedule={c.lr_schedule}: choose cosine or inverse_sqrt")
    for key in ("batch_size", "max_iters", "eval_iters", "log_interval", "eval_interval",
                "gradient_accumulation_steps"):
        if getattr(c, key) < 1:
            raise UserError(f"--{key}={getattr(c, key)} must be >= 1")
    device, dtype, rank, world, local, is_xla = setup_device(c)
    master = rank == 0
    if c.gradient_accumulation_steps % world:
        raise UserError(f"--gradient_accumulation_steps={c.gradient_accumulation_steps} must be a "
                        f"multiple of the number of processes ({world})")
    accum = c.gradient_accumulation_steps // world  # micro-steps per process
    torch.manual_seed(c.seed)

    # data, and the model config (from the checkpoint when resuming)
    data_folder, meta = load_dataset(c)
    ckpt_path = os.path.join(c.out_dir, "ckpt.pt")
    checkpoint = None
    if c.init_from == "resume":
        if not os.path.exists(ckpt_path):
            raise UserError(f"--init_from=resume but {ckpt_path} does not exist; train with --init_from=scratch first")
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = checkpoint["model_config"]
        changed = [k for k in explicit if model_values[k] != saved.get(k)]
        if changed:
            raise UserError(f"cannot change {', '.join('--' + k for k in changed)} when resuming; "
                            f"the checkpoint has {', '.join(f'{k}={saved.get(k)}' for k in changed)}")
        model_values = saved
        if (checkpoint["meta"]["tokenizer"], checkpoint["meta"]["vocab_size"]) != (meta["tokenizer"], meta["vocab_size"]):
            raise UserError(f"checkpoint was trained with tokenizer {checkpoint['meta']['tokenizer']} "
                            f"(vocab {checkpoint['meta']['vocab_size']}) but --dataset={c.dataset} uses "
                            f"{meta['tokenizer']} (vocab {meta['vocab_size']}); pick the matching --dataset")
    model_values["vocab_size"] = meta["vocab_size"]
    try:
        model_config = gpt.config_from_dict(model_values)
        model = gpt.build_model(model_config)
    except (ValueError, TypeError) as e:
        raise UserError(f"invalid model config: {e}")
    train_data = Batches(os.path.join(data_folder, "train.bin"), model_config.block_size, c.seed)
    val_data = Batches(os.path.join(data_folder, "val.bin"), model_config.block_size, 0)
    val_offsets = val_data.draw(c.eval_iters * c.batch_size).view(c.eval_iters, c.batch_size)

    to_device(model, device)
    optimizer = model.configure_optimizers(c.weight_decay, c.learning_rate, (c.beta1, c.beta2), device.type)
    step, best_val, train_time = 0, float("inf"), 0.0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, best_val = checkpoint["step"], checkpoint["best_val_loss"]
        train_time = checkpoint.get("train_time", 0.0)
        train_data.generator.set_state(checkpoint["rng"]["data"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if master:
            print(f"resuming from {ckpt_path} at step {step}")
        del checkpoint
    raw_model = model
    if is_xla:
        # lr goes in as a tensor (below); Adam takes one only with capturable=True (its step
        # count on the device too), else it reads lr back to the host inside the step
        for group in optimizer.param_groups:
            group["capturable"] = True
        for state in optimizer.state.values():
            state["step"] = state["step"].to(device)

    use_compile = (str2bool(c.compile) if c.compile != "auto" else device.type == "cuda") and not is_xla
    if use_compile:
        model = torch.compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None)
    amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = (torch.autocast(device_type="xla" if is_xla else device.type, dtype=amp_dtype)
                if amp_dtype is not None else contextlib.nullcontext())
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16" and device.type == "cuda")

    def train_step(xs, ys, lr):
        """One optimizer step over this process's micro-batches; returns the mean loss (a tensor)."""
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for micro in range(accum):
            if world > 1:  # all-reduce gradients only on the last micro-step
                model.require_backward_grad_sync = micro == accum - 1
            with autocast:
                _, loss = model(xs[micro], ys[micro])
            scaler.scale(loss / accum).backward()
            total = total + loss.detach() / accum
        if c.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return total

    if is_xla:
        import torch_xla
        import torch_xla.debug.metrics
        # The whole step is one graph, traced and compiled once: no host sync inside it
        # (full_graph), and 2 graphs in all (the first step also creates Adam's state); the
        # loop below fails if a later step compiles again, rather than crawl.
        # lr comes in as data, a (1,) tensor viewed as a scalar in the graph: as a Python float
        # or a 0-dim tensor, the values 0 (--min_lr=0) and 1 become constants of the graph.
        xla_step = torch_xla.compile(lambda xs, ys, lr: train_step(xs, ys, lr.view(())),
                                     full_graph=True, max_different_graphs=2, name="train_step")

        def graphs_compiled():
            return int(torch_xla.debug.metrics.counter_value("UncachedCompile") or 0)

    @torch.no_grad()
    def evaluate():
        model.eval()
        losses = torch.zeros(1).to(device)  # data, not a constant (as 0-dim would be): one XLA graph
        for i in range(rank, c.eval_iters, world):
            x, y = val_data.get(val_offsets[i], device)
            with autocast:
                _, loss = model(x, y)
            losses += loss.float()
            if is_xla:
                torch_xla.sync()  # one small graph per batch, the same every time
        if world > 1:
            torch.distributed.all_reduce(losses)
        model.train()
        return losses.item() / c.eval_iters

    def checkpoint_state():
        state = to_cpu({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                        "model_config": gpt.config_to_dict(model_config), "train_config": asdict(c),
                        "meta": meta, "step": step, "best_val_loss": best_val, "train_time": train_time,
                        "rng": {"data": train_data.generator.get_state(), "torch": torch.get_rng_state()}})
        for group in state["optimizer"]["param_groups"] if is_xla else []:  # resumable anywhere
            group["lr"], group["capturable"] = float(group["lr"]), False
        return state

    tokens_per_step = c.batch_size * c.gradient_accumulation_steps * model_config.block_size
    flops_per_token = raw_model.flops_per_token()
    peak = peak_flops(device_name(device), dtype, c.peak_flops)  # all processes together: x world
    if master:
        os.makedirs(c.out_dir, exist_ok=True)
        print(f"model {model_config.model}: {raw_model.num_params() / 1e6:.2f}M parameters, "
              f"{flops_per_token / 1e6:.1f} MFLOPs/token | device {device_name(device)} {dtype}"
              f"{' compiled' if use_compile else ''} | {world} process(es) | {tokens_per_step} tokens/step "
              f"| data {data_folder} ({meta['tokenizer']}, {len(train_data.data):,} train tokens)")

    def graphs_compiled_by_dynamo():
        return torch._dynamo.utils.counters["stats"]["unique_graphs"]
    log_file = open(os.path.join(c.out_dir, "log.jsonl"), "a") if master else None
    model.train()
    t_start, t_last, steps_since = time.time(), time.time(), 0
    first_step = step
    while step < c.max_iters:
        # the whole step's offsets come from one generator; this process takes its share
        offsets = train_data.draw(accum * world * c.batch_size).view(accum, world, c.batch_size)[:, rank]
        xs, ys = zip(*(train_data.get(o, device) for o in offsets))
        lr = learning_rate_at(step, c)
        try:
            if is_xla:
                graphs = graphs_compiled()
                loss = xla_step(xs, ys, torch.tensor([lr]).to(device))
                if step >= first_step + 2 and graphs_compiled() > graphs:
                    raise UserError(f"the XLA training step compiled a new graph at step {step + 1}: it must be "
                                    f"the same graph every step (PT_XLA_DEBUG_LEVEL=1 shows why it changed)")
            else:
                loss = train_step(xs, ys, lr)
        except Exception as e:
            if use_compile and step == first_step:
                raise UserError(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                f"rerun with --compile=false")
            raise
        step += 1
        steps_since += 1
        last = step == c.max_iters
        if step % c.log_interval == 0 or step % c.eval_interval == 0 or last:
            if world > 1:
                torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG)
            loss_value = loss.item()  # the only host sync, at log intervals
            if not math.isfinite(loss_value):
                raise UserError(f"loss became {loss_value} at step {step}; stopped. The last good checkpoint "
                                f"(if any) is {ckpt_path}; try a lower --learning_rate or --dtype=float32")
            now = time.time()
            ms = (now - t_last) * 1000 / steps_since
            train_time += now - t_last  # seconds spent in training steps (evals and saves excluded)
            record = {"step": step, "loss": loss_value, "lr": lr, "ms": ms,
                      "tok_per_s": tokens_per_step / (ms / 1000), "time": train_time}
            if peak:
                record["mfu"] = flops_per_token * record["tok_per_s"] / (peak * world)
            if step % c.eval_interval == 0 or last:
                record["val"] = evaluate()
                if not math.isfinite(record["val"]):
                    raise UserError(f"val loss became {record['val']} at step {step}; stopped without saving. "
                                    f"Try a lower --learning_rate")
            if is_xla or use_compile:  # graphs compiled so far: constant after the first steps and eval
                record["graphs"] = graphs_compiled() if is_xla else graphs_compiled_by_dynamo()
            if master:
                eta = (now - t_start) / (step - first_step) * (c.max_iters - step)
                print(f"step {step} | loss {loss_value:.4f}" + (f" | val {record['val']:.4f}" if "val" in record else "")
                      + f" | lr {lr:.1e} | {ms:.0f} ms | {record['tok_per_s'] / 1000:.1f}k tok/s"
                      + (f" | mfu {100 * record['mfu']:.1f}% (approx.)" if "mfu" in record else "")
                      + f" | eta {format_time(eta)}" + (f" | {record['graphs']} graphs" if "graphs" in record else ""),
                      flush=True)
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                if "val" in record:
                    improved = record["val"] < best_val
                    best_val = min(best_val, record["val"])
                    if improved or c.always_save_checkpoint:
                        save_checkpoint(ckpt_path, checkpoint_state())
            t_last, steps_since = time.time(), 0  # the next interval starts after this eval and save
    if master:
        print(f"done: {step} steps in {format_time(time.time() - t_start)}, best val {best_val:.4f}, "
              f"checkpoint {ckpt_path}")
        log_file.close()
    if world > 1:
        # wait for rank 0's last checkpoint before tearing down: a rank that destroys its gloo
        # group while a peer is still busy can abort ("terminate called without an active exception")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is what was saved at the last eval", file=sys.stderr)
        sys.exit(130)

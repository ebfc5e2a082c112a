"""
Train any model of the registry. One loop for CPU, CUDA, MPS, TPU (torch_xla) and DDP.

    python train.py                                  # byte-level gpt on the offline corpus, into out-gpt/
    python train.py --model=dca --dca_k=2 --n_layer=6
    python train.py --config=my.toml --max_iters=5000
    python train.py --init_from=resume --max_iters=3000   # continue out-gpt/ with its own flags
    torchrun --standalone --nproc_per_node=4 train.py --model=dcmha
    python train.py -h                               # every flag (add --model=X for X's own)

Flags are the fields of TrainConfig below and of the chosen model's config dataclass.
"""

import argparse
import contextlib
import gc
import inspect
import json
import math
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, fields, asdict, replace, is_dataclass

import numpy as np
import torch

import gpt
import prepare_data

try:
    import fcntl  # the out_dir lock; absent on Windows, where runs are not locked
except ImportError:
    fcntl = None


@dataclass
class TrainConfig:
    # data and output
    dataset: str = "pystdlib"     # data/<dataset>/{train,val}.bin made by prepare_data.py
    data_dir: str = "data"        # the folder that holds the datasets
    out_dir: str = "out"          # the run's ckpt.pt and log.jsonl (not given: out-<model>, e.g. out-dca)
    init_from: str = "scratch"    # scratch, or resume out_dir/ckpt.pt (with its flags, unless given again)
    overwrite: bool = False       # let a scratch run replace the checkpoint and log already in out_dir
    config: str = ""              # a .json or .toml file of flag values (the command line wins)
    # batch: one optimizer step sees batch_size * gradient_accumulation_steps sequences in all
    batch_size: int = 16          # sequences per micro-batch and process
    gradient_accumulation_steps: int = 1  # across all processes; divided among DDP ranks
    # schedule
    max_iters: int = 1500         # optimizer steps in all (resume: raise it to train on)
    lr_decay_iters: int = 0       # length of the decay; 0 = max_iters
    learning_rate: float = 2e-3   # the peak, after warmup
    min_lr: float = 2e-4          # the end of the cosine decay (<= learning_rate)
    warmup_iters: int = 100       # linear warmup steps
    lr_schedule: str = "cosine"   # cosine, or inverse_sqrt (the DCA paper's)
    weight_decay: float = 0.1     # AdamW's, on matmul weights and embeddings only
    beta1: float = 0.9            # AdamW
    beta2: float = 0.95           # AdamW
    grad_clip: float = 1.0        # max gradient norm; 0 = off
    # evaluation, logging, checkpoints
    eval_interval: int = 250      # steps between evals (each saves a checkpoint)
    eval_iters: int = 20          # val batches per eval (a fixed set)
    log_interval: int = 50        # steps between log lines
    always_save_checkpoint: bool = True  # else only when val improves
    # system
    device: str = "auto"          # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps, xla
    dtype: str = "auto"           # auto: bf16 autocast on recent GPUs and TPU (fp16 on older GPUs), else float32
    compile: str = "auto"         # torch.compile: auto (on for CUDA), true, false
    tf32: bool = True             # CUDA: float32 matmuls (what autocast leaves in float32) on TF32 tensor cores, as nanoGPT; false: full float32
    peak_flops: float = 0.0       # the device's peak FLOP/s for MFU; 0 = from PEAK_FLOPS by name
    seed: int = 1337              # model init and the order of the training batches

    def validate(self, relations=True):
        """Raise UserError (one line) for a value no run can use, before anything is built or loaded.
        relations: also the checks between flags (a resume makes them once the checkpoint's are in)."""
        for key, choices in CHOICES.items():
            if getattr(self, key) not in choices:
                raise UserError(f"--{key}={getattr(self, key)}: choose one of {', '.join(choices)}")
        if self.device == "tpu":
            raise UserError(TORCH_TPU_UNSUPPORTED)
        if not re.fullmatch(r"auto|cpu|mps|xla|cuda(:\d+)?", self.device):
            raise UserError(f"--device={self.device}: choose auto, cpu, cuda, cuda:N, mps or xla")
        for key in ("batch_size", "gradient_accumulation_steps", "max_iters", "eval_interval", "eval_iters",
                    "log_interval"):
            if getattr(self, key) < 1:
                raise UserError(f"--{key}={getattr(self, key)} must be >= 1")
        for key in ("lr_decay_iters", "warmup_iters", "min_lr", "weight_decay", "grad_clip", "peak_flops"):
            if getattr(self, key) < 0:
                raise UserError(f"--{key}={getattr(self, key)} must be >= 0")
        if self.learning_rate <= 0:
            raise UserError(f"--learning_rate={self.learning_rate} must be > 0")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise UserError(f"--{key}={getattr(self, key)} must be in [0, 1)")
        if not relations:
            return
        if self.min_lr > self.learning_rate:
            raise UserError(f"--min_lr={self.min_lr} is above --learning_rate={self.learning_rate}: the decay "
                            f"would raise the lr; give a min_lr <= learning_rate")
        if self.lr_schedule == "cosine" and 0 < self.lr_decay_iters <= self.warmup_iters:
            raise UserError(f"--lr_decay_iters={self.lr_decay_iters} must be > --warmup_iters={self.warmup_iters} "
                            f"(or 0: decay over max_iters)")


CHOICES = {"init_from": ("scratch", "resume"), "lr_schedule": ("cosine", "inverse_sqrt"),
           "dtype": ("auto", "float32", "bfloat16", "float16"), "compile": ("auto", "true", "false")}
NOT_RESTORED = ("out_dir", "init_from", "overwrite", "config", "device", "compile", "peak_flops")  # this start's
FIXED_ON_RESUME = ("batch_size", "gradient_accumulation_steps")  # the data position counts in these batches


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
# flags: argparse built from the dataclasses; command line and --config file typed alike

def str2bool(s):
    if isinstance(s, bool):
        return s
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def field_type(f):
    return {"bool": bool, "int": int, "float": float, "str": str}.get(f.type, f.type)  # string annotations too


def typed(f, value, where):
    """value (a string from the command line, any JSON/TOML value from a config file) as the
    dataclass field f's type, its choices checked; where names it in the error."""
    choices = CHOICES.get(f.name) or f.metadata.get("choices")
    kind = field_type(f)
    if kind is bool and isinstance(value, str):
        with contextlib.suppress(argparse.ArgumentTypeError):
            value = str2bool(value)
    elif kind is int and isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        value = int(value)
    elif kind is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    elif kind is str and isinstance(value, bool) and choices and "true" in choices:
        value = str(value).lower()  # compile = true in a TOML file
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), int: number and isinstance(value, int),
          float: number and math.isfinite(value), str: isinstance(value, str)}[kind]
    if not ok:
        raise UserError(f"{where}: expected {TYPE_NAMES[kind]}")
    if choices and value not in choices:
        raise UserError(f"{where}: choose one of {', '.join(choices)}")
    return float(value) if kind is float else value


def field_comments(cls):
    """{field: the comment on its line} from the dataclasses' source: -h shows each flag's meaning
    from where the field is defined."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if is_dataclass(klass):
            with contextlib.suppress(OSError, TypeError):
                for line in inspect.getsource(klass).splitlines():
                    m = re.match(r"\s+(\w+)\s*:[^=]+=[^#]*#\s*(.+)$", line)
                    if m:
                        comments[m.group(1)] = m.group(2)
    return comments


def add_fields(parser, dataclass_type, skip=()):
    group = parser.add_argument_group(dataclass_type.__name__)
    comments = field_comments(dataclass_type)
    for f in fields(dataclass_type):
        if f.name in skip:
            continue
        choices = CHOICES.get(f.name) or f.metadata.get("choices")
        metavar = "{" + ",".join(choices) + "}" if choices else TYPE_NAMES[field_type(f)].split()[-1].upper()
        default = str(f.default).lower() if isinstance(f.default, bool) else f.default if f.default != "" else "none"
        if dataclass_type is TrainConfig and f.name == "out_dir":
            default = "out-<model>"
        help = f"{comments.get(f.name, '')} (default: {default})".strip().replace("%", "%%")
        if field_type(f) is bool:
            group.add_argument(f"--{f.name}", nargs="?", const="true", metavar="BOOL", help=help)
        else:
            group.add_argument(f"--{f.name}", metavar=metavar, help=help)


def read_config_file(path):
    """A --config file's {key: value}, or a one-line error."""
    if not path.endswith((".toml", ".json")):
        raise UserError(f"--config={path}: use a .json or .toml file")
    try:
        with open(path, "rb") as f:
            if path.endswith(".toml"):
                import tomllib
                values = tomllib.load(f)
            else:
                values = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"--config={path}: no such file")
    except OSError as e:
        raise UserError(f"--config={path}: cannot read it ({e.strerror})")
    except (ValueError, UnicodeDecodeError) as e:  # JSON and TOML syntax errors are ValueErrors
        raise UserError(f"--config={path} is not valid {path[-4:].upper()}: {str(e).splitlines()[0]}")
    if not isinstance(values, dict):
        raise UserError(f"--config={path} must hold key = value pairs, not a {type(values).__name__}")
    return values


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of the whole usage
        raise UserError(f"{message} (python {self.prog} -h lists the flags)")


def parse_args(argv):
    """-> (TrainConfig, model config values, the names of the flags given on the command line or in
    the --config file). Both go through typed(); the result is validated before anything is loaded."""
    models = gpt.all_models()
    pre = ArgumentParser(prog="train.py", add_help=False, allow_abbrev=False)
    pre.add_argument("--model", default=None)
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    file_values = read_config_file(known.config) if known.config else {}
    model = known.model or file_values.get("model", "gpt")
    if not isinstance(model, str) or model not in models:
        raise UserError(f"unknown --model={model}; choose one of: {', '.join(models)}")
    config_class = models[model][0]

    parser = ArgumentParser(
        prog="train.py", description=f"Train a model (registered: {', '.join(models)}). Flags are --key=value; "
        f"bools also --flag alone. python train.py -h --model=X lists X's own flags.",
        argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("--model", metavar="{" + ",".join(models) + "}", help="the model to train (default: gpt)")
    add_fields(parser, TrainConfig)
    add_fields(parser, config_class, skip=("model", "vocab_size"))
    args, unknown = parser.parse_known_args(argv)
    for token in unknown:
        key = token.split("=")[0].lstrip("-")
        owners = [name for name, (cc, _) in models.items() if key in {f.name for f in fields(cc)}]
        if owners and token.startswith("--"):
            raise UserError(f"--{key} is an option of model {'/'.join(owners)}; add --model={owners[0]}")
        parser.error(f"unknown option {token!r}")

    train_fields = {f.name: f for f in fields(TrainConfig)}
    model_fields = {f.name: f for f in fields(config_class) if f.name not in ("model", "vocab_size")}
    flag = {**train_fields, **model_fields}
    bad = [k for k in file_values if k not in flag and k != "model" or k == "config"]
    if bad:
        raise UserError(f"--config={known.config}: unknown key(s) {', '.join(bad)} for model {model}")
    values = {k: typed(flag[k], v, f"--config={known.config}: {k} = {json.dumps(v, default=str)}")
              for k, v in file_values.items() if k != "model"}
    values.update({k: typed(flag[k], v, f"--{k}={v}") for k, v in vars(args).items() if k != "model"})
    train_config = TrainConfig(**{k: v for k, v in values.items() if k in train_fields})
    if "out_dir" not in values:
        train_config.out_dir = f"out-{model}"
    train_config.validate(relations=train_config.init_from != "resume")
    model_values = {k: v for k, v in values.items() if k in model_fields}
    model_values["model"] = model
    if train_config.init_from != "resume":  # (a resume checks the checkpoint's: its flags may not be restated)
        model_config(model_values, vocab_size=256)  # its own validate(), now rather than after loading the data
    explicit = set(values) | ({"model"} if known.model or "model" in file_values else set())
    return train_config, model_values, explicit


def model_config(values, vocab_size):
    try:
        config = gpt.config_from_dict({**values, "vocab_size": vocab_size})
        config.validate()
    except (ValueError, TypeError) as e:
        raise UserError(f"invalid model config: {e}")
    return config


# -----------------------------------------------------------------------------
# data

class Batches:
    """Random windows of a token file. One generator, shared by every DDP rank, draws the
    whole step's offsets; each rank takes its own slice, so ranks read disjoint data and a
    run on N processes sees exactly the batches of a run on one. Its state is the data
    position saved in checkpoints."""

    def __init__(self, path, block_size, seed, vocab_size):
        self.path, self.vocab_size = path, vocab_size
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
        if xy.max() >= self.vocab_size:  # the files were checked in samples only (prepare_data.check_tokens)
            raise UserError(f"{self.path} holds token id {int(xy.max())} >= vocab_size {self.vocab_size}: "
                            f"it is damaged; rebuild it with prepare_data.py --force")
        x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


def load_dataset(train_config):
    """-> (folder, meta) of a prepared dataset whose files are checked: meta.json readable, token
    files of whole uint16s, ids < vocab_size."""
    folder = os.path.join(train_config.data_dir, train_config.dataset)
    if not os.path.exists(os.path.join(folder, "meta.json")):
        hint = ("python prepare_data.py" if train_config.dataset == "pystdlib"
                else f"python prepare_data.py --name={train_config.dataset} (with the --source you want)")
        raise UserError(f"no prepared data in {folder}/ (meta.json missing); make it with: {hint}")
    try:
        meta = prepare_data.read_meta(folder)
        for split in ("train", "val"):
            prepare_data.check_tokens(os.path.join(folder, f"{split}.bin"), meta["vocab_size"])
    except ValueError as e:
        raise UserError(f"{e}; rebuild it with python prepare_data.py --force (and the flags that made it)")
    return folder, meta


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
# checkpoints and out_dir

RESUME_KEYS = ("model", "optimizer", "model_config", "train_config", "meta", "step", "best_val_loss", "rng")


def checksum(obj, crc=0):
    """crc32 of a checkpoint's content: every tensor's dtype, shape and bytes, every other value's repr."""
    if torch.is_tensor(obj):
        crc = zlib.crc32(f"{obj.dtype}{tuple(obj.shape)}".encode(), crc)
        return zlib.crc32(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    if isinstance(obj, dict):
        for key, value in obj.items():
            crc = checksum(value, zlib.crc32(repr(key).encode(), crc))
        return crc
    if isinstance(obj, (list, tuple)):
        for value in obj:
            crc = checksum(value, crc)
        return zlib.crc32(type(obj).__name__.encode(), crc)
    return zlib.crc32(repr(obj).encode(), crc)


def save_checkpoint(path, state):
    """Write atomically, with the content's checksum: a crash or a full disk mid-write leaves the
    previous checkpoint intact and no temporary file."""
    state = {**state, "checksum": checksum(state)}
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = e if isinstance(e, OSError) else e.__context__  # torch.save wraps the OSError of a write
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(e).splitlines()[0][:200]
        raise UserError(f"could not write the checkpoint {path} ({reason}); the previous checkpoint is kept. "
                        f"Free some disk space or give another --out_dir, then --init_from=resume")


def load_checkpoint(path, keys=("model", "model_config", "meta")):
    """torch.load with weights_only=True (tensors and plain containers only: loading runs no code),
    the checksum verified; anything wrong is one line naming the file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist")
    except Exception as e:  # truncated, corrupted, not a checkpoint, or objects other than tensors and plain data
        reason = re.sub(r"\x1b\[[0-9;]*m", "", (str(e).strip().splitlines() or ["empty or cut short"])[0])[:200]
        raise UserError(f"cannot read the checkpoint {path}: {type(e).__name__}: {reason}")
    missing = [k for k in keys if k not in checkpoint] if isinstance(checkpoint, dict) else ["a dict"]
    if missing:
        raise UserError(f"{path} is not a train.py checkpoint (no {', '.join(missing)})")
    expected = checkpoint.pop("checksum", None)  # (checkpoints of older train.py versions have none)
    if expected is not None and checksum(checkpoint) != expected:
        raise UserError(f"{path} is corrupted: its content does not match the checksum saved with it")
    return checkpoint


@contextlib.contextmanager
def locked(path):
    """Hold a lock on path for the run; a second run stops at once, naming this one's pid. The lock is
    the OS's (flock), so a killed run's leftover lock file blocks nobody."""
    while fcntl is not None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{os.path.dirname(path)} is in use by another run (pid {holder}); wait for it "
                            f"to finish, or give another --out_dir")
        except OSError:  # a filesystem without locks: run unlocked
            os.close(fd)
            break
        try:
            ours = os.stat(path).st_ino == os.fstat(fd).st_ino  # not removed by its last holder meanwhile
        except FileNotFoundError:
            ours = False
        if not ours:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)  # before the unlock: a run waiting on this file retries with a new one
            os.close(fd)
        return
    yield


@contextlib.contextmanager
def claim_out_dir(c, master):
    """out_dir for this run: never a checkpoint replaced by a scratch run (unless --overwrite), and
    one run at a time writes into it (rank 0 holds out_dir/train.lock)."""
    ckpt_path = os.path.join(c.out_dir, "ckpt.pt")
    if os.path.exists(c.out_dir) and not os.path.isdir(c.out_dir):
        raise UserError(f"--out_dir={c.out_dir} is a file; give a folder")
    if c.init_from == "resume" and not os.path.exists(ckpt_path):
        raise UserError(f"--init_from=resume but {ckpt_path} does not exist; train with --init_from=scratch first")
    created = master and not os.path.exists(c.out_dir)
    if master:
        try:
            os.makedirs(c.out_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --out_dir={c.out_dir} ({e.strerror}); give another --out_dir")
        if not os.access(c.out_dir, os.W_OK | os.X_OK):
            raise UserError(f"cannot write into --out_dir={c.out_dir} (no permission); give another --out_dir")
    try:
        with locked(os.path.join(c.out_dir, "train.lock")) if master else contextlib.nullcontext():
            if c.init_from == "scratch" and os.path.exists(ckpt_path) and not c.overwrite:
                raise UserError(f"{c.out_dir} already holds a checkpoint; continue that run with --init_from=resume, "
                                f"replace it with --overwrite, or give another --out_dir")
            if master:
                overwritten = ["ckpt.pt", "log.jsonl"] if c.init_from == "scratch" and os.path.exists(ckpt_path) else []
                for name in overwritten + ["ckpt.pt.tmp"]:  # (.tmp: a killed save's leftover)
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(c.out_dir, name))
            yield ckpt_path
    except BaseException:
        if created:  # a run that failed before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                os.rmdir(c.out_dir)
        raise


def restore_flags(c, model_values, explicit, checkpoint):
    """Resume: the checkpoint's flags are the defaults and the flags given now override them, except
    those that would break the run: the model, and the batch that the data position counts in."""
    saved_model, saved = checkpoint["model_config"], checkpoint["train_config"]
    changed = [k for k in sorted(explicit) if k in model_values and model_values[k] != saved_model.get(k)]
    changed += [k for k in FIXED_ON_RESUME if k in explicit and getattr(c, k) != saved.get(k, getattr(c, k))]
    if changed:
        was = {**saved_model, **saved}
        raise UserError(f"cannot change {', '.join('--' + k for k in changed)} when resuming; the checkpoint has "
                        f"{', '.join(f'{k}={was.get(k)}' for k in changed)} (a new run needs another --out_dir)")
    names = {f.name for f in fields(TrainConfig)}
    c = replace(c, **{k: v for k, v in saved.items() if k in names and k not in explicit and k not in NOT_RESTORED})
    c.validate()
    overrides = [f"--{k}={getattr(c, k)}" for k in sorted(explicit & names)
                 if k not in NOT_RESTORED and getattr(c, k) != saved.get(k)]
    return c, dict(saved_model), overrides


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


def append_record(path, record):
    """Append one JSON line to log.jsonl; a full disk leaves no half line behind."""
    line = memoryview((json.dumps(record) + "\n").encode())
    with open(path, "ab", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            while line:
                line = line[f.write(line):]
        except OSError as e:
            f.truncate(size)
            raise UserError(f"could not write {path} ({e.strerror}); the log up to here is kept. Free some disk "
                            f"space or give another --out_dir, then --init_from=resume")


def cpu_name():
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform says."""
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return platform.processor() or platform.machine()


def start_record(argv, c, model_config, system, resumed_from):
    """The first log.jsonl record of every start: what ran, where, with what (no "step": readers of
    the step records skip it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True, timeout=10,  # noqa: E731
                                        env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
        head = git("rev-parse", "HEAD")
        if head.returncode == 0:
            dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
            commit = head.stdout.strip() + ("+uncommitted changes" if dirty else "")
    # the CUDA matmuls' reduced-precision settings change the numbers (TF32; bf16 sums in bf16)
    cuda_matmul = {"allow_tf32": torch.backends.cuda.matmul.allow_tf32, "allow_bf16_reduced_precision_reduction":
                   torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction} if system.device.type == "cuda" else None
    return {"event": "start", "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": "python train.py " + shlex.join(argv), "git_commit": commit, "resumed_from": resumed_from, "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "device": device_name(system.device),
            "dtype": system.dtype, "world_size": system.world, "host": socket.gethostname(), "cpu": cpu_name(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "cuda_matmul": cuda_matmul, "train_config": asdict(c), "model_config": gpt.config_to_dict(model_config)}


# -----------------------------------------------------------------------------
# the run

@dataclass
class System:
    device: torch.device
    dtype: str
    rank: int
    world: int
    local: int
    is_xla: bool


def ddp_ranks():
    """-> (rank, world size, local rank): from torchrun's environment, else one process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


# TorchTPU (torch_tpu 0.2.0) needs a real TPU for any tensor op (no CPU mode), so it is untested here
TORCH_TPU_UNSUPPORTED = ("--device=tpu (TorchTPU) is not supported: on a TPU use --device=xla (torch_xla), "
                         "see the README's Colab TPU section")


def resolve_device(name, local=0, tf32=True):
    """'auto', 'cpu', 'cuda', 'cuda:1', 'mps' -> a torch.device this machine has, else a one-line error.
    tf32: on CUDA, let float32 matmuls and convolutions use the TF32 tensor cores."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "tpu":
        raise UserError(TORCH_TPU_UNSUPPORTED)
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise UserError(f"--device={name}: choose auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device={name} but CUDA is not available here; use --device=cpu")
        device = torch.device("cuda", local) if name == "cuda" else torch.device(name)  # set_device needs an index
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.backends.cuda.matmul.allow_tf32 = tf32  # float32 matmuls on the tensor cores, as nanoGPT
        torch.backends.cudnn.allow_tf32 = tf32        # (what autocast leaves in float32: DCMHA's attention)
        return device
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps but MPS is not available here; use --device=cpu")
    return torch.device(name)


def resolve_dtype(dtype, device, is_xla=False):
    """--dtype's name; auto: bf16 on recent GPUs (fp16 before compute capability 8) and TPU, else float32."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.get_device_capability(device)[0] >= 8 else "float16"
    return "bfloat16" if is_xla else "float32"


def setup_device(c, rank, world, local):
    """-> System: the device (DDP's process group joined when under torchrun) and the dtype."""
    name = c.device
    if name == "xla":
        try:
            import torch_xla
        except ImportError:
            raise UserError("--device=xla needs torch_xla (on Colab TPU it is preinstalled; "
                            "else pip install torch_xla matching your torch version)")
        device = torch_xla.device()
    else:
        device = resolve_device(name, local, c.tf32)
        if device.type == "cuda":
            torch.cuda.set_device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if name == "xla":
            raise UserError("DDP via torchrun is for CUDA and CPU; on TPU run one process per host")
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    dtype = resolve_dtype(c.dtype, device, is_xla=name == "xla")
    if c.gradient_accumulation_steps % world:
        raise UserError(f"--gradient_accumulation_steps={c.gradient_accumulation_steps} must be a "
                        f"multiple of the number of processes ({world})")
    return System(device, dtype, rank, world, local, name == "xla")


# what tells one prepared dataset from another of the same name (meta.json's fields): made again with
# another --val_split (or from another corpus), a data folder holds other train and val tokens
DATA_IDENTITY = ("train_tokens", "val_tokens", "val_split")


def warn_if_data_changed(before, now, folder):
    """A resume on data made again since the checkpoint (another --val_split, another corpus) trains
    on and is evaluated on other tokens than the run so far: allowed (it may be meant), but said."""
    keys = DATA_IDENTITY
    if any(k in before and before[k] != now.get(k) for k in keys):  # (a key the checkpoint lacks: unrecorded, not changed)
        print(f"warning: {folder} has changed since the checkpoint (train/val tokens, val split: "
              f"{', '.join(str(before.get(k)) for k in keys)} then, {', '.join(str(now.get(k)) for k in keys)} now): "
              f"the resumed run trains and evaluates on other data than before", file=sys.stderr)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    c, model_values, explicit = parse_args(argv)
    rank, world, local = ddp_ranks()
    with claim_out_dir(c, master=rank == 0) as ckpt_path:
        checkpoint, overrides = None, []
        if c.init_from == "resume":
            checkpoint = load_checkpoint(ckpt_path, RESUME_KEYS)
            c, model_values, overrides = restore_flags(c, model_values, explicit, checkpoint)
            if checkpoint["step"] >= c.max_iters:
                raise UserError(f"{ckpt_path} is at step {checkpoint['step']}, the run's end (max_iters="
                                f"{c.max_iters}); give a larger --max_iters (and --lr_decay_iters) to train on")
        data_folder, meta = load_dataset(c)
        if checkpoint is not None and (checkpoint["meta"]["tokenizer"], checkpoint["meta"]["vocab_size"]) \
                != (meta["tokenizer"], meta["vocab_size"]):
            raise UserError(f"checkpoint was trained with tokenizer {checkpoint['meta']['tokenizer']} "
                            f"(vocab {checkpoint['meta']['vocab_size']}) but --dataset={c.dataset} uses "
                            f"{meta['tokenizer']} (vocab {meta['vocab_size']}); pick the matching --dataset")
        if checkpoint is not None and rank == 0:
            warn_if_data_changed(checkpoint["meta"], meta, data_folder)
        config = model_config(model_values, meta["vocab_size"])
        system = setup_device(c, rank, world, local)
        trainer = Trainer(c, config, meta, data_folder, system, checkpoint, ckpt_path)
        del checkpoint
        if rank == 0 and trainer.step:
            print(f"resuming from {ckpt_path} at step {trainer.step}"
                  + (f", with {' '.join(overrides)}" if overrides else " with its flags"))
        trainer.run(start_record(argv, c, config, system, trainer.step if c.init_from == "resume" else None))
        del trainer  # its DDP wrapper holds the process group: freed here, not at interpreter exit
    if world > 1:
        gc.collect()  # (with any reference cycle through it), before the group is destroyed
        # wait for rank 0's last checkpoint before tearing down: a rank that destroys its gloo
        # group while a peer is still busy can abort ("terminate called without an active exception")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class Trainer:
    """One run on this process: the model, optimizer and data, the training step, evals, checkpoints
    and the log."""

    def __init__(self, c, model_config, meta, data_folder, system, checkpoint, ckpt_path):
        self.c, self.model_config, self.meta, self.data_folder = c, model_config, meta, data_folder
        self.system, self.ckpt_path = system, ckpt_path
        device, is_xla = system.device, system.is_xla
        self.master = system.rank == 0
        self.accum = c.gradient_accumulation_steps // system.world  # micro-steps per process
        torch.manual_seed(c.seed)
        self.raw_model = model = gpt.build_model(model_config)
        vocab = meta["vocab_size"]
        self.train_data = Batches(os.path.join(data_folder, "train.bin"), model_config.block_size, c.seed, vocab)
        self.val_data = Batches(os.path.join(data_folder, "val.bin"), model_config.block_size, 0, vocab)
        self.val_offsets = self.val_data.draw(c.eval_iters * c.batch_size).view(c.eval_iters, c.batch_size)

        to_device(model, device)
        self.optimizer = model.configure_optimizers(c.weight_decay, c.learning_rate, (c.beta1, c.beta2), device.type)
        self.step, self.best_val, self.train_time = 0, float("inf"), 0.0
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.step, self.best_val = checkpoint["step"], checkpoint["best_val_loss"]
            self.train_time = checkpoint.get("train_time", 0.0)
            self.train_data.generator.set_state(checkpoint["rng"]["data"])
            torch.set_rng_state(checkpoint["rng"]["torch"])
        if is_xla:
            # lr goes in as a tensor (below); Adam takes one only with capturable=True (its step
            # count on the device too), else it reads lr back to the host inside the step
            for group in self.optimizer.param_groups:
                group["capturable"] = True
            for state in self.optimizer.state.values():
                state["step"] = state["step"].to(device)

        self.use_compile = (str2bool(c.compile) if c.compile != "auto" else device.type == "cuda") and not is_xla
        if self.use_compile:
            model = torch.compile(model)
        self.eval_model = model  # no DDP in evals: a rank with no val batch must not wait in DDP's buffer sync
        if system.world > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[system.local] if device.type == "cuda" else None)
        self.model = model
        amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[system.dtype]
        self.autocast = (torch.autocast(device_type="xla" if is_xla else device.type, dtype=amp_dtype)
                         if amp_dtype is not None else contextlib.nullcontext())
        self.scaler = torch.amp.GradScaler("cuda", enabled=system.dtype == "float16" and device.type == "cuda")
        if is_xla:
            import torch_xla
            # The whole step is one graph, traced and compiled once: no host sync inside it
            # (full_graph), and 2 graphs in all (the first step also creates Adam's state); the
            # loop below fails if a later step compiles again, rather than crawl.
            # lr comes in as data, a (1,) tensor viewed as a scalar in the graph: as a Python float
            # or a 0-dim tensor, the values 0 (--min_lr=0) and 1 become constants of the graph.
            self.xla_step = torch_xla.compile(lambda xs, ys, lr: self.train_step(xs, ys, lr.view(())),
                                              full_graph=True, max_different_graphs=2, name="train_step")

    def train_step(self, xs, ys, lr):
        """One optimizer step over this process's micro-batches; returns the mean loss (a tensor)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for micro in range(self.accum):
            if self.system.world > 1:  # all-reduce gradients only on the last micro-step
                self.model.require_backward_grad_sync = micro == self.accum - 1
            with self.autocast:
                _, loss = self.model(xs[micro], ys[micro])
            self.scaler.scale(loss / self.accum).backward()
            total = total + loss.detach() / self.accum
        if self.c.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.c.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    @torch.no_grad()
    def evaluate(self):
        """Mean loss over the fixed val batches; each rank takes every world-th batch (maybe none)."""
        s = self.system
        self.eval_model.eval()
        losses = torch.zeros(1).to(s.device)  # data, not a constant (as 0-dim would be): one XLA graph
        for i in range(s.rank, self.c.eval_iters, s.world):
            x, y = self.val_data.get(self.val_offsets[i], s.device)
            with self.autocast:
                _, loss = self.eval_model(x, y)
            losses += loss.float()
            if s.is_xla:
                import torch_xla
                torch_xla.sync()  # one small graph per batch, the same every time
        if s.world > 1:
            torch.distributed.all_reduce(losses)
        self.eval_model.train()
        return losses.item() / self.c.eval_iters

    def save(self):
        state = to_cpu({"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "model_config": gpt.config_to_dict(self.model_config), "train_config": asdict(self.c),
                        "meta": self.meta, "step": self.step, "best_val_loss": self.best_val,
                        "train_time": self.train_time,
                        "rng": {"data": self.train_data.generator.get_state(), "torch": torch.get_rng_state()}})
        for group in state["optimizer"]["param_groups"] if self.system.is_xla else []:  # resumable anywhere
            group["lr"], group["capturable"] = float(group["lr"]), False
        save_checkpoint(self.ckpt_path, state)

    def graphs_compiled(self):
        """Graphs compiled so far (XLA's or Dynamo's): constant after the first steps and eval."""
        if self.system.is_xla:
            import torch_xla.debug.metrics
            return int(torch_xla.debug.metrics.counter_value("UncachedCompile") or 0)
        return torch._dynamo.utils.counters["stats"]["unique_graphs"]

    def run(self, start):
        """Train from self.step to max_iters: every log_interval a record (loss, speed, MFU) on the
        console and in log.jsonl; every eval_interval also the val loss, and a checkpoint if it improved."""
        c = self.c
        meter = {"start": time.time(), "last": time.time(), "steps": 0, "first_step": self.step,
                 "flops_per_token": self.raw_model.flops_per_token(),
                 "peak": peak_flops(device_name(self.system.device), self.system.dtype, c.peak_flops)}  # one device's
        self.announce(start, meter["flops_per_token"])
        self.model.train()
        while self.step < c.max_iters:
            lr = learning_rate_at(self.step, c)
            loss = self.train_step_checked(*self.next_batch(), lr, meter["first_step"])
            self.step += 1
            meter["steps"] += 1
            if self.step % c.log_interval == 0 or self.step % c.eval_interval == 0 or self.step == c.max_iters:
                record, eta = self.interval_record(loss, lr, meter)
                if self.master:
                    self.report(record, eta)
                meter["last"], meter["steps"] = time.time(), 0  # the next interval starts after this eval and save
        if self.master:
            print(f"done: {self.step} steps in {format_time(time.time() - meter['start'])}, best val {self.best_val:.4f}, "
                  f"checkpoint {self.ckpt_path}")

    def announce(self, start, flops_per_token):
        """The run's first console line, and its start record in log.jsonl (the first process only)."""
        c, s = self.c, self.system
        if not self.master:
            return
        print(f"model {self.model_config.model}: {self.raw_model.num_params() / 1e6:.2f}M parameters, "
              f"{flops_per_token / 1e6:.1f} MFLOPs/token | device {device_name(s.device)} {s.dtype}"
              f"{' compiled' if self.use_compile else ''} | {s.world} process(es) | {self.tokens_per_step()} tokens/step "
              f"| data {self.data_folder} ({self.meta['tokenizer']}, {len(self.train_data.data):,} train tokens)"
              f" | out_dir {c.out_dir}")
        append_record(os.path.join(c.out_dir, "log.jsonl"), start)

    def tokens_per_step(self):
        return self.c.batch_size * self.c.gradient_accumulation_steps * self.model_config.block_size

    def next_batch(self):
        """This process's micro-batches of the step: (xs, ys), accum of each. The whole step's offsets
        come from one generator, the same in every process; each process takes its share."""
        c, s = self.c, self.system
        offsets = self.train_data.draw(self.accum * s.world * c.batch_size)
        offsets = offsets.view(self.accum, s.world, c.batch_size)[:, s.rank]
        return tuple(zip(*(self.train_data.get(o, s.device) for o in offsets)))

    def interval_record(self, loss, lr, meter):
        """The log record at the end of an interval: loss (averaged over processes), speed since the
        last record, MFU if the device's peak is known, the val loss at eval steps, graph counts;
        -> (record, seconds left)."""
        c, s = self.c, self.system
        if s.world > 1:
            torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG)
        loss_value = loss.item()  # the only host sync, at log intervals
        if not math.isfinite(loss_value):
            raise UserError(f"loss became {loss_value} at step {self.step}; stopped. The last good checkpoint "
                            f"(if any) is {self.ckpt_path}; try a lower --learning_rate or --dtype=float32")
        now = time.time()
        ms = (now - meter["last"]) * 1000 / meter["steps"]
        self.train_time += now - meter["last"]  # seconds spent in training steps (evals and saves excluded)
        record = {"step": self.step, "loss": loss_value, "lr": lr, "ms": ms,
                  "tok_per_s": self.tokens_per_step() / (ms / 1000), "time": self.train_time}
        if meter["peak"]:
            record["mfu"] = meter["flops_per_token"] * record["tok_per_s"] / (meter["peak"] * s.world)
        if self.step % c.eval_interval == 0 or self.step == c.max_iters:
            record["val"] = self.evaluate()
            if not math.isfinite(record["val"]):
                raise UserError(f"val loss became {record['val']} at step {self.step}; stopped without saving. "
                                f"Try a lower --learning_rate")
        if s.is_xla or self.use_compile:
            record["graphs"] = self.graphs_compiled()
        eta = (now - meter["start"]) / (self.step - meter["first_step"]) * (c.max_iters - self.step)
        return record, eta

    def report(self, record, eta):
        """Print the record, append it to log.jsonl, and save a checkpoint when the val loss improved."""
        c = self.c
        print(f"step {self.step} | loss {record['loss']:.4f}" + (f" | val {record['val']:.4f}" if "val" in record else "")
              + f" | lr {record['lr']:.1e} | {record['ms']:.0f} ms | {record['tok_per_s'] / 1000:.1f}k tok/s"
              + (f" | mfu {100 * record['mfu']:.1f}% (approx.)" if "mfu" in record else "")
              + f" | eta {format_time(eta)}" + (f" | {record['graphs']} graphs" if "graphs" in record else ""),
              flush=True)
        append_record(os.path.join(c.out_dir, "log.jsonl"), record)
        if "val" in record:
            improved = record["val"] < self.best_val
            self.best_val = min(self.best_val, record["val"])
            if improved or c.always_save_checkpoint:
                self.save()

    def train_step_checked(self, xs, ys, lr, first_step):
        """train_step (XLA: the compiled graph, which must not change after the first steps); a failing
        torch.compile says how to run without it."""
        try:
            if not self.system.is_xla:
                return self.train_step(xs, ys, lr)
            graphs = self.graphs_compiled()
            loss = self.xla_step(xs, ys, torch.tensor([lr]).to(self.system.device))
            if self.step >= first_step + 2 and self.graphs_compiled() > graphs:
                raise UserError(f"the XLA training step compiled a new graph at step {self.step + 1}: it must be "
                                f"the same graph every step (PT_XLA_DEBUG_LEVEL=1 shows why it changed)")
            return loss
        except UserError:
            raise
        except Exception as e:
            if self.use_compile and self.step == first_step:
                raise UserError(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                f"rerun with --compile=false")
            raise


def run_cli(main, disk_hint="", interrupted=""):
    """A script's entry point: a UserError, or an OSError from the disk (full, read-only, no
    permission), is one line on stderr and exit 2; a closed pipe (| head) ends quietly; Ctrl-C
    exits 130 after the line `interrupted`."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # | head: the reader has what it wanted
        sys.stderr.close()
    except OSError as e:
        print(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else "") + disk_hint, file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if interrupted:
            print(interrupted, file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main, disk_hint=" (free some disk space or give another --out_dir)",  # the checkpoint's own are UserErrors
            interrupted="interrupted; the last checkpoint is what was saved at the last eval")

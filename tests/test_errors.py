"""
Nothing lost, nothing silent. A table of bad inputs and faults across train.py, prepare_data.py,
sample.py and bench.py: each ends with its exit code, exactly one line on stderr and no traceback,
and a fault leaves what was there before as it was (files hashed before and after). Then the
properties behind them: resume restores a run's flags, the out_dir guard and lock, a failed
prepare_data.py --force, DDP evals with fewer val batches than processes, the val split by tokens,
typed config files, streamed samples.

Most cases run in a child forked from one warm interpreter that has imported torch once (Forker):
a real process, with the script's own exit code and stderr, in milliseconds instead of the seconds
a fresh interpreter needs to import torch. ERRORS_SUBPROCESS=1 runs them as plain subprocesses.
"""

import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--log_interval=1", "--warmup_iters=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

SERVER = r"""
import json, os, resource, runpy, signal, sys, traceback
sys.path.insert(0, sys.argv[1])
import torch, numpy, train, sample, bench, prepare_data  # imported once; nothing runs here
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_CREAT),
                                    (2, req["stderr"], os.O_WRONLY | os.O_CREAT)):
                os.dup2(os.open(path, flags, 0o644), fd)
            os.chdir(req["cwd"])
            os.environ.update(req["env"])
            if req["fsize"]:
                resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
            signal.alarm(req["timeout"])
            sys.argv = [req["script"], *req["args"]]
            try:
                runpy.run_path(req["script"], run_name="__main__")
                code = 0
            except SystemExit as e:  # as the interpreter does it
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else print(e.code, file=sys.stderr) or 1
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Forker:
    """Runs a script in a child of a warm interpreter; -> subprocess.CompletedProcess."""

    def __init__(self, tmp):
        self.tmp, self.n = tmp, 0
        self.server = subprocess.Popen([PY, "-c", SERVER, str(ROOT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, env=ENV, cwd=ROOT)

    def __call__(self, script, *args, env=None, fsize=0, timeout=120):
        self.n += 1
        out, err = self.tmp / f"{self.n}.out", self.tmp / f"{self.n}.err"
        request = dict(script=script, args=list(map(str, args)), cwd=str(ROOT), env=env or {}, fsize=fsize,
                       timeout=timeout, stdout=str(out), stderr=str(err))
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        code = json.loads(self.server.stdout.readline())["code"]
        return subprocess.CompletedProcess([script, *args], code, out.read_text(), err.read_text())

    def close(self):
        self.server.stdin.close()
        self.server.wait(timeout=30)


def run_subprocess(script, *args, env=None, fsize=0, timeout=120):
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))) if fsize else None
    return subprocess.run([PY, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**ENV, **(env or {})}, preexec_fn=limit)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if os.environ.get("ERRORS_SUBPROCESS") == "1" or not hasattr(os, "fork"):
        yield run_subprocess
        return
    forker = Forker(tmp_path_factory.mktemp("forker"))
    yield forker
    forker.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One tiny prepared dataset for the module (read-only: a case that breaks data copies it)."""
    d = tmp_path_factory.mktemp("data")
    result = run_subprocess("prepare_data.py", f"--data_dir={d}", "--max_tokens=60000")
    assert result.returncode == 0, result.stderr
    return d


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory, run):
    """A finished 2-step run with a checkpoint (copied by the cases that use it)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = run("train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, "--max_iters=2", "--eval_interval=2")
    assert result.returncode == 0, result.stderr
    return out


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).exists() else None


def one_line_error(result, code, *words):
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


# -----------------------------------------------------------------------------
# what the cases do to their copies before running

def write(name, content):
    def setup(ctx):
        path = ctx.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return setup


def truncate_checkpoint(ctx):
    path = ctx.run / "ckpt.pt"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def empty_checkpoint(ctx):
    (ctx.run / "ckpt.pt").write_bytes(b"")


def text_checkpoint(ctx):
    (ctx.run / "ckpt.pt").write_text("not a checkpoint\n")


def flip_tensor_byte(ctx):
    """A bit rot in the middle of the largest tensor: the file still loads, with wrong weights."""
    path = ctx.run / "ckpt.pt"
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x40]))


def pickled_object_checkpoint(ctx):
    import argparse
    torch.save({"model": {}, "model_config": {}, "meta": {}, "args": argparse.Namespace(x=1)}, ctx.run / "ckpt.pt")


def foreign_checkpoint(ctx):
    torch.save({"weights": torch.zeros(3)}, ctx.run / "ckpt.pt")


def copy_data(mutate):
    def setup(ctx):
        shutil.copytree(ctx.data, ctx.tmp / "data")
        mutate(ctx.tmp / "data" / "pystdlib")
    return setup


def odd_bytes(folder):
    with open(folder / "train.bin", "ab") as f:
        f.write(b"\0")


def empty_val(folder):
    (folder / "val.bin").write_bytes(b"")


def bad_meta_json(folder):
    (folder / "meta.json").write_text('{"tokenizer": "byte", "vocab_size": ')


def meta_without_vocab(folder):
    (folder / "meta.json").write_text('{"tokenizer": "byte"}')


def token_beyond_vocab(folder):
    tokens = np.fromfile(folder / "train.bin", dtype=np.uint16)
    tokens[len(tokens) // 3] = 300
    tokens.tofile(folder / "train.bin")


def no_train_bin(folder):
    (folder / "train.bin").unlink()


def no_text(ctx):
    (ctx.tmp / "empty").mkdir()


def latin1_prompt(ctx):
    (ctx.tmp / "prompt.txt").write_bytes("café".encode("latin-1"))


def a_file(ctx):
    (ctx.tmp / "file").write_text("x")


# -----------------------------------------------------------------------------
# the table: (id, script, args, exit code, words of the message, setup, files that must survive)
# {data} the module's dataset, {run} a copy of the trained run, {tmp} this case's folder

T = ["--data_dir={data}", "--out_dir={tmp}/out", *TINY]  # a scratch run into a fresh folder
R = ["--out_dir={run}", "--init_from=resume", "--max_iters=4"]  # resume the trained run
KEEP = ("{run}/ckpt.pt",)
CUDA, MPS = torch.cuda.is_available(), torch.backends.mps.is_available()

CASES = [
    # train.py: ranges, types and choices, before anything is built or loaded
    ("zero batch", "train.py", [*T, "--batch_size=0"], 2, ["--batch_size=0 must be >= 1"], None, ()),
    ("negative max_iters", "train.py", [*T, "--max_iters=-5"], 2, ["--max_iters=-5 must be >= 1"], None, ()),
    ("zero eval_iters", "train.py", [*T, "--eval_iters=0"], 2, ["--eval_iters=0"], None, ()),
    ("zero lr", "train.py", [*T, "--learning_rate=0"], 2, ["--learning_rate=0.0 must be > 0"], None, ()),
    ("negative lr", "train.py", [*T, "--learning_rate=-1e-3"], 2, ["must be > 0"], None, ()),
    ("nan lr", "train.py", [*T, "--learning_rate=nan"], 2, ["--learning_rate=nan: expected a number"], None, ()),
    ("beta2 above 1", "train.py", [*T, "--beta2=1.5"], 2, ["--beta2=1.5 must be in [0, 1)"], None, ()),
    ("negative beta1", "train.py", [*T, "--beta1=-0.1"], 2, ["--beta1=-0.1"], None, ()),
    ("min_lr above lr", "train.py", [*T, "--learning_rate=1e-3", "--min_lr=1e-2"], 2, ["above --learning_rate"], None, ()),
    ("negative weight decay", "train.py", [*T, "--weight_decay=-1"], 2, ["--weight_decay=-1.0 must be >= 0"], None, ()),
    ("negative grad clip", "train.py", [*T, "--grad_clip=-1"], 2, ["--grad_clip"], None, ()),
    ("fractional max_iters", "train.py", [*T, "--max_iters=2.5"], 2, ["--max_iters=2.5: expected an integer"], None, ()),
    ("bool typo", "train.py", [*T, "--tie_embeddings=flase"], 2, ["expected true or false"], None, ()),
    ("unknown schedule", "train.py", [*T, "--lr_schedule=linear"], 2, ["choose one of cosine, inverse_sqrt"], None, ()),
    ("unknown dtype", "train.py", [*T, "--dtype=fp8"], 2, ["--dtype=fp8: choose one of"], None, ()),
    ("abbreviated flag", "train.py", [*T, "--learning=0.1"], 2, ["unknown option '--learning=0.1'"], None, ()),
    ("device name", "train.py", [*T, "--device=gpu"], 2, ["--device=gpu: choose auto, cpu"], None, ()),
    ("torchtpu device", "train.py", [*T, "--device=tpu"], 2, ["--device=tpu (TorchTPU) is not supported", "--device=xla"], None, ()),
    ("zero layers", "train.py", [*T, "--n_layer=0"], 2, ["n_layer=0 must be >= 1"], None, ()),
    ("negative width", "train.py", [*T, "--n_head=1", "--n_embd=-32"], 2, ["n_embd=-32 must be >= 1"], None, ()),
    ("decay shorter than warmup", "train.py", [*T, "--warmup_iters=10", "--lr_decay_iters=5"], 2,
     ["--lr_decay_iters=5 must be > --warmup_iters=10"], None, ()),
    # train.py: --config files go through the same typing
    ("config fractional int", "train.py", [*T, "--config={tmp}/c.toml"], 2, ["max_iters = 2.5: expected an integer"],
     write("c.toml", "max_iters = 2.5\n"), ()),
    ("config wrong type", "train.py", [*T, "--config={tmp}/c.toml"], 2, ['eval_iters = "four": expected an integer'],
     write("c.toml", 'eval_iters = "four"\n'), ()),
    ("config bool typo", "train.py", [*T, "--config={tmp}/c.json"], 2, ['qk_norm = "nope": expected true or false'],
     write("c.json", '{"qk_norm": "nope"}'), ()),
    ("config toml syntax", "train.py", [*T, "--config={tmp}/c.toml"], 2, ["is not valid TOML"],
     write("c.toml", "max_iters = = 3\n"), ()),
    ("config json syntax", "train.py", [*T, "--config={tmp}/c.json"], 2, ["is not valid JSON"],
     write("c.json", '{"max_iters": 3,}'), ()),
    ("config not a table", "train.py", [*T, "--config={tmp}/c.json"], 2, ["must hold key = value pairs"],
     write("c.json", "[1, 2]"), ()),
    ("config not utf-8", "train.py", [*T, "--config={tmp}/c.toml"], 2, ["is not valid TOML"],
     write("c.toml", b'dataset = "caf\xe9"\n'), ()),
    ("config missing", "train.py", [*T, "--config={tmp}/none.toml"], 2, ["no such file"], None, ()),
    ("config yaml", "train.py", [*T, "--config={tmp}/c.yaml"], 2, ["use a .json or .toml file"], None, ()),
    # train.py: out_dir
    ("out_dir is a file", "train.py", [*T[:1], "--out_dir={tmp}/file", *TINY], 2, ["is a file"], a_file, ()),
    ("out_dir under a file", "train.py", [*T[:1], "--out_dir={tmp}/file/sub", *TINY], 2, ["cannot create --out_dir"],
     a_file, ()),
    ("scratch over a checkpoint", "train.py", ["--data_dir={data}", "--out_dir={run}", *TINY], 2,
     ["already holds a checkpoint", "--init_from=resume", "--overwrite"], None, KEEP),
    ("resume with no checkpoint", "train.py", [*T, "--init_from=resume"], 2, ["does not exist"], None, ()),
    # train.py: checkpoints that cannot be trusted
    ("truncated checkpoint", "train.py", R, 2, ["cannot read the checkpoint", "ckpt.pt"], truncate_checkpoint, KEEP),
    ("empty checkpoint", "train.py", R, 2, ["cannot read the checkpoint", "ckpt.pt"], empty_checkpoint, KEEP),
    ("text as checkpoint", "train.py", R, 2, ["cannot read the checkpoint"], text_checkpoint, KEEP),
    ("bit rot in a checkpoint", "train.py", R, 2, ["ckpt.pt is corrupted", "checksum"], flip_tensor_byte, KEEP),
    ("pickled object in a checkpoint", "train.py", R, 2, ["cannot read the checkpoint", "Weights only load failed"],
     pickled_object_checkpoint, KEEP),
    ("foreign checkpoint", "train.py", R, 2, ["is not a train.py checkpoint"], foreign_checkpoint, KEEP),
    ("resume with another batch", "train.py", [*R, "--batch_size=8"], 2, ["cannot change --batch_size", "batch_size=4"],
     None, KEEP),
    ("resume a finished run", "train.py", ["--out_dir={run}", "--init_from=resume"], 2,
     ["at step 2", "give a larger --max_iters"], None, KEEP),
    # train.py: faults while writing
    ("disk full at the checkpoint", "train.py", R, 2, ["could not write the checkpoint", "previous checkpoint is kept"],
     None, KEEP, 30_000),
    ("disk full at the log", "train.py", R, 2, ["could not write", "log.jsonl"], None, KEEP, 1),
    # train.py: data files
    ("odd byte count", "train.py", [*T[1:], "--data_dir={tmp}/data"], 2, ["train.bin", "not a whole number of uint16"],
     copy_data(odd_bytes), ()),
    ("empty val.bin", "train.py", [*T[1:], "--data_dir={tmp}/data"], 2, ["val.bin has 0 bytes"], copy_data(empty_val), ()),
    ("broken meta.json", "train.py", [*T[1:], "--data_dir={tmp}/data"], 2, ["meta.json is not valid JSON"],
     copy_data(bad_meta_json), ()),
    ("meta.json without vocab", "train.py", [*T[1:], "--data_dir={tmp}/data"], 2, ["integer vocab_size"],
     copy_data(meta_without_vocab), ()),
    ("token id beyond vocab", "train.py", [*T[1:], "--data_dir={tmp}/data"], 2, ["holds token id 300", ">= vocab_size 256"],
     copy_data(token_beyond_vocab), ()),
    ("missing train.bin", "train.py", [*T[1:], "--data_dir={tmp}/data"], 2, ["cannot read", "train.bin"],
     copy_data(no_train_bin), ()),
    # prepare_data.py
    ("name leaves data_dir", "prepare_data.py", ["--data_dir={tmp}/d", "--name=../x", "--max_tokens=1000"], 1,
     ["--name='../x' must be a folder name"], None, ()),
    ("name with a folder", "prepare_data.py", ["--data_dir={tmp}/d", "--name=a/b", "--max_tokens=1000"], 1,
     ["must be a folder name"], None, ()),
    ("zero val fraction", "prepare_data.py", ["--data_dir={tmp}/d", "--val_fraction=0"], 1, ["between 0 and 1"], None, ()),
    ("val fraction above 1", "prepare_data.py", ["--data_dir={tmp}/d", "--val_fraction=1.5"], 1, ["between 0 and 1"],
     None, ()),
    ("zero max_tokens", "prepare_data.py", ["--data_dir={tmp}/d", "--max_tokens=0"], 1, ["--max_tokens=0 is too small"],
     None, ()),
    ("max_tokens not a number", "prepare_data.py", ["--max_tokens=lots"], 1, ["invalid int value: 'lots'"], None, ()),
    ("unknown prepare flag", "prepare_data.py", ["--sauce=stdlib"], 1, ["unrecognized arguments"], None, ()),
    ("data_dir is a file", "prepare_data.py", ["--data_dir={tmp}/file", "--max_tokens=1000"], 1, ["file is a file"],
     a_file, ()),
    ("data_dir under a file", "prepare_data.py", ["--data_dir={tmp}/file/d", "--max_tokens=1000"], 1,
     ["could not write", "Not a directory"], a_file, ()),
    ("force with an empty corpus", "prepare_data.py", ["--data_dir={tmp}/data", "--name=pystdlib", "--text={tmp}/empty",
                                                       "--force"], 1, ["too small"], lambda ctx: (copy_data(lambda f: None)(ctx), no_text(ctx)),
     ("{tmp}/data/pystdlib/train.bin", "{tmp}/data/pystdlib/val.bin", "{tmp}/data/pystdlib/meta.json")),
    ("disk full during force", "prepare_data.py", ["--data_dir={tmp}/data", "--max_tokens=60000", "--force"], 1,
     ["could not write", "nothing was changed"], copy_data(lambda f: None),
     ("{tmp}/data/pystdlib/train.bin", "{tmp}/data/pystdlib/val.bin", "{tmp}/data/pystdlib/meta.json"), 50_000),
    # sample.py
    ("zero samples", "sample.py", ["--out_dir={run}", "--num_samples=0"], 2, ["--num_samples=0 must be >= 1"], None, ()),
    ("zero new tokens", "sample.py", ["--out_dir={run}", "--max_new_tokens=0"], 2, ["--max_new_tokens=0"], None, ()),
    ("negative top-k", "sample.py", ["--out_dir={run}", "--top_k=-1"], 2, ["--top_k=-1 must be >= 0"], None, ()),
    ("negative temperature", "sample.py", ["--out_dir={run}", "--temperature=-0.5"], 2, ["--temperature=-0.5 must be >= 0"],
     None, ()),
    ("nan temperature", "sample.py", ["--out_dir={run}", "--temperature=nan"], 2, ["--temperature=nan"], None, ()),
    ("samples not a number", "sample.py", ["--num_samples=three"], 2, ["invalid int value: 'three'"], None, ()),
    ("non-utf-8 prompt file", "sample.py", ["--out_dir={run}", "--start=FILE:{tmp}/prompt.txt"], 2, ["not utf-8"],
     latin1_prompt, ()),
    ("missing prompt file", "sample.py", ["--out_dir={run}", "--start=FILE:{tmp}/none.txt"], 2, ["no such file"], None, ()),
    ("empty prompt", "sample.py", ["--out_dir={run}", "--start="], 2, ["--start is empty"], None, ()),
    ("sample device name", "sample.py", ["--out_dir={run}", "--device=gpu"], 2, ["--device=gpu: choose"], None, ()),
    ("sample without a checkpoint", "sample.py", ["--out_dir={tmp}/none"], 2, ["not found; train first"], None, ()),
    ("sample a truncated checkpoint", "sample.py", ["--out_dir={run}"], 2, ["cannot read the checkpoint"],
     truncate_checkpoint, ()),
    ("sample a rotten checkpoint", "sample.py", ["--out_dir={run}"], 2, ["is corrupted"], flip_tensor_byte, ()),
    # bench.py
    ("zero repeats", "bench.py", ["--repeats=0"], 2, ["--repeats=0 must be >= 1"], None, ()),
    ("zero bench batch", "bench.py", ["--batch_size=0"], 2, ["--batch_size=0 must be >= 1"], None, ()),
    ("zero heads", "bench.py", ["--n_head=0"], 2, ["--n_head=0 must be >= 1"], None, ()),
    ("negative warmup", "bench.py", ["--warmup=-1"], 2, ["--warmup=-1 must be >= 0"], None, ()),
    ("bench device name", "bench.py", ["--device=gpu"], 2, ["--device=gpu: choose"], None, ()),
    ("empty model spec", "bench.py", ["--models=gpt,,dca"], 2, ["empty spec"], None, ()),
    ("repeats not a number", "bench.py", ["--repeats=many"], 2, ["invalid int value: 'many'"], None, ()),
]
if not CUDA:
    CASES.append(("no cuda here", "train.py", [*T, "--device=cuda:0"], 2, ["CUDA is not available"], None, ()))
if not MPS:
    CASES.append(("no mps here", "sample.py", ["--out_dir={run}", "--device=mps"], 2, ["MPS is not available"], None, ()))


class Ctx:
    def __init__(self, tmp, data, run):
        self.tmp, self.data, self.run = tmp, data, run

    def fill(self, s):
        return s.format(data=self.data, run=self.run, tmp=self.tmp)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_or_fault_is_one_line_and_loses_nothing(case, run, data, trained, tmp_path):
    name, script, args, code, words, setup, keep, *fsize = case
    ctx = Ctx(tmp_path, data, tmp_path / "run")
    shutil.copytree(trained, ctx.run)
    if setup:
        setup(ctx)
    keep = [ctx.fill(k) for k in keep]
    before = {k: sha(k) for k in keep}
    log = (ctx.run / "log.jsonl").read_bytes()
    fsize = fsize[0] if fsize else 0
    if fsize == 1:  # just room for nothing more in the log
        fsize = len(log) + 10
    result = run(script, *[ctx.fill(a) for a in args], fsize=fsize)
    one_line_error(result, code, *[ctx.fill(w) for w in words])
    assert {k: sha(k) for k in keep} == before, "a fault changed what was there before"
    assert all(v is not None for v in before.values())
    assert (ctx.run / "log.jsonl").read_bytes().startswith(log)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or ".building-" in p.name]
    assert not leftovers, leftovers
    assert not (tmp_path / "out").exists(), "a failed run left its out_dir behind"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_dir_is_one_line(run, data, tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    one_line_error(run("train.py", f"--data_dir={data}", f"--out_dir={tmp_path / 'ro'}", *TINY), 2, "no permission")
    one_line_error(run("train.py", f"--data_dir={data}", f"--out_dir={tmp_path / 'ro' / 'x'}", *TINY), 2,
                   "cannot create --out_dir")


def test_the_table_is_big_enough():
    assert len(CASES) >= 40 and {c[1] for c in CASES} == {"train.py", "prepare_data.py", "sample.py", "bench.py"}


# -----------------------------------------------------------------------------
# resume restores the run

def log_records(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def test_resume_restores_the_runs_flags(run, data, tmp_path):
    """A run stopped at step 4 and resumed with nothing but --max_iters goes on exactly like the
    run that was never stopped: batch, lr, schedule, eval and optimizer flags come from the checkpoint."""
    flags = [f"--data_dir={data}", *TINY, "--batch_size=3", "--eval_iters=3", "--learning_rate=3e-3", "--min_lr=1e-4",
             "--warmup_iters=2", "--lr_decay_iters=8", "--beta2=0.9", "--weight_decay=0.05", "--grad_clip=0.5",
             "--seed=5", "--eval_interval=4", "--model=resformer", "--value_residual=learnable"]
    assert run("train.py", *flags, f"--out_dir={tmp_path / 'a'}", "--max_iters=8").returncode == 0
    assert run("train.py", *flags, f"--out_dir={tmp_path / 'b'}", "--max_iters=4").returncode == 0
    resumed = run("train.py", f"--out_dir={tmp_path / 'b'}", "--init_from=resume", "--max_iters=8")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "with --max_iters=8" in resumed.stdout
    a, b = log_records(tmp_path / "a"), log_records(tmp_path / "b")
    keys = ("step", "loss", "val", "lr")
    assert [[r.get(k) for k in keys] for r in a if "step" in r] == [[r.get(k) for k in keys] for r in b if "step" in r]
    starts = [r for r in b if "step" not in r]
    assert [r["event"] for r in starts] == ["start", "start"] and [r["resumed_from"] for r in starts] == [None, 4]
    assert starts[1]["train_config"]["batch_size"] == 3 and starts[1]["command"].endswith("--max_iters=8")
    for key in ("git_commit", "torch", "python", "numpy", "device", "model_config"):
        assert key in starts[0]
    ckpt_a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    ckpt_b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    same = lambda d: {k: v for k, v in d.items() if k not in ("out_dir", "init_from")}  # noqa: E731
    assert same(ckpt_a["train_config"]) == same(ckpt_b["train_config"])


def test_resume_takes_explicit_flags_and_can_extend_the_schedule(run, trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    result = run("train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=4", "--lr_decay_iters=4",
                 "--learning_rate=1e-3", "--eval_interval=4")
    assert result.returncode == 0, result.stderr
    config = torch.load(out / "ckpt.pt", weights_only=True)["train_config"]
    assert (config["max_iters"], config["lr_decay_iters"], config["learning_rate"]) == (4, 4, 1e-3)
    assert config["batch_size"] == 4 and config["eval_iters"] == 2  # the rest: the run's own


# -----------------------------------------------------------------------------
# out_dir: the guard, the default, the lock

def test_scratch_run_is_refused_over_a_checkpoint_unless_overwrite(run, data, trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    old_log = (out / "log.jsonl").read_text()
    result = run("train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, "--max_iters=3", "--eval_interval=3",
                 "--overwrite")
    assert result.returncode == 0, result.stderr
    log = log_records(out)
    assert [r.get("event") for r in log if "step" not in r] == ["start"] and log[-1]["step"] == 3
    assert old_log.splitlines()[0] not in (out / "log.jsonl").read_text()
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3


def test_default_out_dir_names_the_model():
    sys.path.insert(0, str(ROOT))
    import train
    assert train.parse_args([])[0].out_dir == "out-gpt"
    assert train.parse_args(["--model=dca"])[0].out_dir == "out-dca"
    assert train.parse_args(["--model=dca", "--out_dir=mine"])[0].out_dir == "mine"


def test_a_second_run_into_a_busy_out_dir_stops_at_once(run, data, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([PY, "train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, "--max_iters=1000000",
                              "--eval_interval=1000000", "--log_interval=1000"], cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "train.lock").exists() or not (out / "train.lock").read_text().strip():
            assert first.poll() is None and time.time() < deadline, first.stderr and first.stderr.read()
            time.sleep(0.1)
        t0 = time.time()
        second = run("train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, "--max_iters=2")
        one_line_error(second, 2, "is in use by another run", f"pid {first.pid}")
        assert time.time() - t0 < 30
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        first.stderr.close()
    # the killed run's lock file is left behind, naming a dead pid: it blocks nobody
    assert (out / "train.lock").read_text().startswith(f"{first.pid} ")
    third = run("train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, "--max_iters=2", "--eval_interval=2")
    assert third.returncode == 0, third.stderr
    assert not (out / "train.lock").exists() and (out / "ckpt.pt").exists()


# -----------------------------------------------------------------------------
# DDP: a rank with no val batch

def test_ddp_eval_with_fewer_val_batches_than_processes(data, tmp_path):
    out = tmp_path / "ddp"
    result = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                             f"--data_dir={data}", f"--out_dir={out}", *TINY, "--eval_iters=1", "--max_iters=2",
                             "--eval_interval=1", "--gradient_accumulation_steps=2"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    # (once in ~100 runs on a loaded 2-core VM a rank has aborted in gloo's teardown, "terminate called
    # without an active exception": the message says how far the run got, for the next time)
    assert result.returncode == 0, (f"{result.stderr[:2000]}\n...\n{result.stderr[-3000:]}\nstdout:\n{result.stdout[-2000:]}"
                                    f"\ncheckpoint saved: {(out / 'ckpt.pt').exists()}")
    log = [r for r in log_records(out) if "step" in r]
    assert [r["step"] for r in log if "val" in r] == [1, 2] and all(np.isfinite(r["val"]) for r in log)


# -----------------------------------------------------------------------------
# prepare_data.py: --force and the val split

def tree(folder):
    return {str(p.relative_to(folder)): sha(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_force_builds_beside_the_old_dataset_and_swaps_when_done(run, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello world\n" * 200)
    args = [f"--text={corpus}", f"--data_dir={tmp_path / 'data'}", "--name=c"]
    assert run("prepare_data.py", *args).returncode == 0
    before = tree(tmp_path / "data")
    for broken in ([f"--text={tmp_path / 'nothing'}"], ["--tokenizer=nope"]):  # fails before or during the build
        one_line_error(run("prepare_data.py", *args, "--force", *broken), 1)
        assert tree(tmp_path / "data") == before
    one_line_error(run("prepare_data.py", *args, "--force", fsize=1000), 1, "could not write", "nothing was changed")
    assert tree(tmp_path / "data") == before
    (corpus / "a.txt").write_text("changed\n" * 200)
    assert run("prepare_data.py", *args, "--force").returncode == 0
    assert tree(tmp_path / "data") != before and os.listdir(tmp_path / "data") == ["c"]
    assert bytes(np.fromfile(tmp_path / "data" / "c" / "train.bin", dtype=np.uint16)[:8].astype(np.uint8)) == b"changed\n"


@pytest.mark.parametrize("docs, fraction", [
    (["a\n", "b" * 999 + "\n"], 0.1),                 # the last document is most of the data
    (["x" * 5000 + "\n"], 0.05),                       # one document
    ([f"doc {i}\n" for i in range(40)], 0.25),         # many small ones
    (["ab"], 0.05),                                    # two tokens (+ the newline): val gets one
])
def test_val_split_is_by_tokens(tmp_path, docs, fraction):
    sys.path.insert(0, str(ROOT))
    from prepare_data import prepare
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(docs):
        (corpus / f"{i:03d}.txt").write_text(doc)
    out = Path(prepare(text=str(corpus), data_dir=str(tmp_path / "data"), val_fraction=fraction))
    train, val = (np.fromfile(out / f"{s}.bin", dtype=np.uint16) for s in ("train", "val"))
    total = sum(len((d if d.endswith("\n") else d + "\n").encode()) for d in docs)
    assert len(train) + len(val) == total and len(val) == max(1, round(total * fraction))
    assert json.loads((out / "meta.json").read_text())["val_split"] == "tokens"


def test_val_split_by_documents_is_the_old_rule(tmp_path, capsys):
    """--val_split=documents: val is the last round(n_docs * fraction) whole documents (the rule the
    CPU grids up to deep16 trained on); one document is cut by tokens; data whose meta.json predates
    the val_split key counts as split by documents, and another split is another dataset."""
    sys.path.insert(0, str(ROOT))
    from prepare_data import prepare
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [f"doc {i}\n" * (i + 1) for i in range(20)]  # lengths 6, 12, ..., 120 bytes
    for i, doc in enumerate(docs):
        (corpus / f"{i:03d}.txt").write_text(doc)
    out = Path(prepare(text=str(corpus), data_dir=str(tmp_path / "d"), val_fraction=0.1, val_split="documents"))
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert bytes(val.astype(np.uint8)).decode() == docs[18] + docs[19]  # 2 of 20 documents, whole
    assert json.loads((out / "meta.json").read_text())["val_split"] == "documents"
    by_tokens = Path(prepare(text=str(corpus), data_dir=str(tmp_path / "t"), val_fraction=0.1))
    assert len(np.fromfile(by_tokens / "val.bin", dtype=np.uint16)) == round(sum(map(len, docs)) * 0.1) != len(val)
    one = tmp_path / "one.txt"
    one.write_text("x" * 999 + "\n")
    single = Path(prepare(text=str(one), data_dir=str(tmp_path / "d"), val_fraction=0.05, val_split="documents"))
    assert len(np.fromfile(single / "val.bin", dtype=np.uint16)) == 50
    meta = json.loads((out / "meta.json").read_text())
    del meta["val_split"]  # a dataset prepared before meta.json said how it was split
    (out / "meta.json").write_text(json.dumps(meta))
    assert prepare(text=str(corpus), data_dir=str(tmp_path / "d"), val_fraction=0.1, val_split="documents") == str(out)
    assert "already prepared" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"val_split=documents, val_fraction=0.1\); give its flags to use it"):
        prepare(text=str(corpus), data_dir=str(tmp_path / "d"), val_fraction=0.1)
    with pytest.raises(SystemExit, match="use tokens or documents"):
        prepare(text=str(corpus), data_dir=str(tmp_path / "d"), val_split="files")


def test_val_split_with_max_tokens(run, tmp_path):
    assert run("prepare_data.py", f"--data_dir={tmp_path}", "--max_tokens=20000", "--val_fraction=0.1").returncode == 0
    meta = json.loads((tmp_path / "pystdlib" / "meta.json").read_text())
    assert (meta["train_tokens"], meta["val_tokens"]) == (18000, 2000)


# -----------------------------------------------------------------------------
# config files are typed like flags; sample.py streams and reports a long prompt

def test_config_values_are_typed_like_flags(tmp_path):
    sys.path.insert(0, str(ROOT))
    import train
    cfg = tmp_path / "c.json"
    cfg.write_text('{"tie_embeddings": "false", "qk_norm": "true", "learning_rate": "1e-3", "max_iters": "7", '
                   '"compile": false}')
    c, model_values, explicit = train.parse_args([f"--config={cfg}"])
    assert model_values["tie_embeddings"] is False and model_values["qk_norm"] is True
    assert c.learning_rate == 1e-3 and c.max_iters == 7 and c.compile == "false"
    assert {"tie_embeddings", "learning_rate", "max_iters"} <= explicit
    toml = tmp_path / "c.toml"
    toml.write_text("tie_embeddings = false\nmax_iters = 7\nlearning_rate = 1\n")
    c, model_values, _ = train.parse_args([f"--config={toml}", "--max_iters=9"])
    assert model_values["tie_embeddings"] is False and c.max_iters == 9 and c.learning_rate == 1.0


def test_help_shows_meanings_and_choices(run):
    result = run("train.py", "-h", "--model=dca")
    assert result.returncode == 0
    for text in ("{cosine,inverse_sqrt}", "{scratch,resume}", "--overwrite", "out-<model>", "the peak, after warmup",
                 "--dca_k"):
        assert text in result.stdout, text


def test_sample_streams_what_generate_makes():
    """sample.py prints model.generate_tokens' tokens as they come: the first one is there
    before the rest are sampled, and all of them are generate's."""
    sys.path.insert(0, str(ROOT))
    import gpt
    torch.manual_seed(0)
    model = gpt.build_model(gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)).eval()
    idx = torch.randint(0, 256, (1, 5))
    for temperature, top_k, cache in ((0.8, 20, True), (1.0, None, False), (0.0, None, True)):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        expected = model.generate(idx, 30, temperature, top_k, use_cache=cache, generator=g1)  # past block_size
        tokens = model.generate_tokens(idx, 30, temperature, top_k, cache, g2)
        first = next(tokens)
        assert first.shape == (1, 1) and torch.equal(first, expected[:, 5:6])
        assert torch.equal(expected, torch.cat([idx, first, *tokens], dim=1))


def test_prompt_longer_than_the_context_is_reported(run, trained):
    result = run("sample.py", f"--out_dir={trained}", "--start=" + "x" * 100, "--num_samples=1", "--max_new_tokens=5")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.strip().splitlines() if "KV cache" not in line]  # (sample.py's size line)
    assert len(notes) == 1 and "100 tokens, longer than the model's context (block_size=32)" in notes[0]
    assert result.stdout.startswith("x" * 100)

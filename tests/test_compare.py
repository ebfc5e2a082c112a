"""compare.py: the grid, its resumption, its statistics, and the FLOPs it counts."""

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import compare  # noqa: E402
import gpt  # noqa: E402
from conftest import run  # noqa: E402

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--log_interval=2", "--warmup_iters=2"]


def compare_args(tmp, data_dir, *extra):
    """compare.py's arguments for a tiny grid in tmp (for conftest's run, or after sys.executable)."""
    return ["compare.py", f"--results={tmp / 'results'}", f"--data_dir={data_dir}",
            f"--out_dir={tmp / 'out'}", *TINY, *extra]


def test_tiny_grid_makes_the_table_summary_and_plots(data_dir, tmp_path):
    run(compare_args(tmp_path, data_dir, "--name=tiny", "--models=gpt,dca:dca_k=1", "--seeds=1,2",
                     "--lengths=0.5,2", "--max_iters=8", "--eval_interval=4"))
    out = tmp_path / "results" / "tiny"
    for name in ("table.md", "summary.json", "loss_vs_step.png", "loss_vs_flops.png", "loss_vs_time.png", "delta_vs_gpt.png"):
        assert (out / name).stat().st_size > 0, name
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["dca-dca_k-1-s1", "dca-dca_k-1-s2", "gpt-s1", "gpt-s2", "gpt-x0.5-s1", "gpt-x0.5-s2", "gpt-x2-s1", "gpt-x2-s2"]
    info = json.loads((out / "runs" / "gpt-x2-s1" / "run.json").read_text())
    assert info["max_iters"] == 16 and "--lr_decay_iters=16" in info["command"] and info["torch"] == torch.__version__
    meta = json.loads((Path(data_dir) / "pystdlib" / "meta.json").read_text())  # the data and machine it ran on
    assert (info["train_tokens"], info["val_tokens"], info["val_split"]) == (meta["train_tokens"], meta["val_tokens"], "tokens")
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and info["threads"] >= 1
    start = json.loads((out / "runs" / "gpt-x2-s1" / "log.jsonl").read_text().splitlines()[0])  # each sitting's machine
    assert start["event"] == "start" and start["cpu_capability"] == info["cpu_capability"] and start["threads"] >= 1
    assert "Trained on: " in (out / "table.md").read_text() and "different datasets" not in (out / "table.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["model"]: r for r in summary["rows"]}
    assert set(rows) == {"gpt", "dca:dca_k=1"} and rows["dca:dca_k=1"]["seeds"] == [1, 2]
    assert rows["dca:dca_k=1"]["welch_p"] is not None and summary["fit"] is not None
    assert "| `dca:dca_k=1` |" in (out / "table.md").read_text()
    # the summary again, from the files alone (the out_dir with its checkpoints gone)
    shutil.rmtree(tmp_path / "out")
    run(["compare.py", "--name=tiny", f"--results={tmp_path / 'results'}", "--summary"])
    assert json.loads((out / "summary.json").read_text())["rows"] == summary["rows"]
    # a subset of the models: their rows, and the table says how to make it again
    run(["compare.py", "--name=tiny", f"--results={tmp_path / 'results'}", "--summary", "--models=gpt"])
    table = (out / "table.md").read_text()
    assert "--summary --models=gpt makes it again" in table and "| `dca:dca_k=1` |" not in table
    assert "from different sittings" in table and not (out / "steps_vs_step_time.png").exists()  # times from the logs
    # --speed: both models timed in one process at the grid's shape, and the table made again with those times
    run(["compare.py", "--name=tiny", f"--results={tmp_path / 'results'}", "--speed"])
    speed = json.loads((out / "speed.json").read_text())
    assert speed["models"] == {"gpt": "gpt", "dca:dca_k=1": "dca:dca_k=1"}
    assert "--n_layer=2 --n_head=2 --n_embd=32 --block_size=32" in speed["command"] and "--batch_size=4" in speed["command"]
    assert {r["model"]: r["params"] for r in speed["bench"]} == {r["model"]: r["params"] for r in summary["rows"]}
    timed = {r["model"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert all(timed[m]["ms_per_step"] == speed["ms_per_step"][m] for m in timed)
    assert "compare.py --speed (python bench.py --json --models=gpt,dca:dca_k=1" in (out / "table.md").read_text()
    assert (out / "steps_vs_step_time.png").stat().st_size > 0  # drawn only with one-process times
    rows = json.loads((out / "summary.json").read_text())["rows"]
    run(["compare.py", "--name=tiny", f"--results={tmp_path / 'results'}", "--summary"])  # keeps using speed.json
    assert json.loads((out / "summary.json").read_text())["rows"] == rows


def test_a_killed_grid_resumes_without_redoing_finished_runs(data_dir, tmp_path):
    # 40 eval batches per checkpoint (every 5 steps) keep the second run busy for seconds after
    # its first checkpoint, on a fast machine too: the kill lands mid-way, not after its last step
    args = compare_args(tmp_path, data_dir, "--name=kill", "--models=gpt,resformer", "--seeds=1",
                        "--max_iters=60", "--eval_interval=5", "--eval_iters=40")
    runs = tmp_path / "results" / "kill" / "runs"
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.time() + 300
    second = tmp_path / "out" / "kill" / "resformer-s1" / "ckpt.pt"
    while not ((runs / "gpt-s1" / "run.json").exists() and second.exists()) and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # compare.py and its train.py, mid-way through the second run
    proc.wait()
    killed_at = compare.read_log(tmp_path / "out" / "kill" / "resformer-s1" / "log.jsonl")[-1]["step"]
    assert 5 <= killed_at < 60, f"the kill came at step {killed_at}, not mid-way: nothing to resume"
    assert (runs / "gpt-s1" / "run.json").exists() and not (runs / "resformer-s1").exists()
    first = (runs / "gpt-s1" / "run.json").read_text()
    result = run(args)
    assert "1 already finished, 1 to train" in result.stdout and f"resformer-s1: resuming at step {killed_at}" in result.stdout
    assert (runs / "gpt-s1" / "run.json").read_text() == first  # not trained again
    log = compare.read_log(runs / "resformer-s1" / "log.jsonl")
    logged = sorted(set(range(2, 61, 2)) | set(range(5, 61, 5)))
    assert [r["step"] for r in log] == logged  # one record per step, the resumed ones once


def processes_with(fragment):
    """The pids of the live processes whose command line holds fragment (from /proc; zombies have none)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if fragment in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the train.py processes in /proc")
def test_sigterm_stops_the_grid_with_its_runs_and_a_rerun_resumes_it(data_dir, tmp_path):
    """`kill` of compare.py (SIGTERM) stops its train.py runs too, not only itself: none is left
    training into the grid's folders, compare.py says how to go on and exits 143, and the same
    command then resumes the stopped runs from their checkpoints."""
    args = compare_args(tmp_path, data_dir, "--name=stop", "--models=gpt", "--seeds=1,2", "--jobs=2",
                        "--max_iters=100000", "--eval_interval=5")  # runs that would train for minutes
    out = tmp_path / "out" / "stop"

    def start_and_stop(until):
        """Start the grid, SIGTERM compare.py once until() holds -> (exit code, its stdout, its stderr)."""
        with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
            proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=stdout, stderr=stderr,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 60
        while not until() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # compare.py alone, as `kill PID` does
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "none: still running 20 s after SIGTERM"
        return code, (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()

    try:
        checkpoints = lambda: all((out / f"gpt-s{seed}" / "ckpt.pt").exists() for seed in (1, 2))  # noqa: E731
        code, stdout, stderr = start_and_stop(checkpoints)
        assert checkpoints(), f"the runs saved no checkpoint in 60 s:\n{stdout}\n{stderr}"
        assert not processes_with(str(out)), "train.py runs left going after compare.py stopped"
        assert code == 128 + signal.SIGTERM, f"exit {code}:\n{stderr}"
        assert "stopped by SIGTERM with 2 run(s) training; rerun this command to resume the grid" in stderr
        assert "Traceback" not in stderr
        steps = {seed: compare.read_log(out / f"gpt-s{seed}" / "log.jsonl")[-1]["step"] for seed in (1, 2)}
        # the same command again: the stopped runs resume (their train.lock left behind locks nothing)
        resuming = lambda: all(f"gpt-s{s}: resuming at step {steps[s]}" in (tmp_path / "stdout").read_text()  # noqa: E731
                               for s in (1, 2))
        code, stdout, stderr = start_and_stop(resuming)
        assert resuming() and code == 128 + signal.SIGTERM, f"exit {code}:\n{stdout}\n{stderr}"
        assert not processes_with(str(out))
    finally:
        for pid in processes_with(str(out)):  # never leave a failed test's runs training
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_several_runs_at_a_time_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(compare.os, "cpu_count", lambda: 8)
    assert compare.run_environment(2)["OMP_NUM_THREADS"] == "4" and compare.run_environment(16)["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in compare.run_environment(1)  # one run: torch's own choice
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert compare.run_environment(2)["OMP_NUM_THREADS"] == "3"  # the user's, kept


def test_bad_train_flags_fail_before_anything_trains(data_dir, tmp_path):
    result = run(compare_args(tmp_path, data_dir, "--name=bad", "--models=gpt,dca:dca_k=x"), check=False)
    assert result.returncode != 0 and "dca_k" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "bad").exists()
    result = run(compare_args(tmp_path, data_dir, "--name=bad", "--seed=3"), check=False)
    assert result.returncode != 0 and "--seeds" in result.stderr


# -----------------------------------------------------------------------------
# the statistics, on synthetic runs whose answers are known

def write_run(folder, model, seed, finals, length=1.0, flops_per_token=1e6, tokens_per_step=1000, max_iters=100):
    """A finished run whose val curve ends at finals[-1] (evals every max_iters/len(finals) steps)."""
    folder.mkdir(parents=True)
    steps = [round(max_iters * (i + 1) / len(finals)) for i in range(len(finals))]
    records = [{"step": s, "loss": v, "lr": 1e-3, "ms": 10.0, "tok_per_s": 1e5, "time": s * 0.01, "val": v}
               for s, v in zip(steps, finals)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "run.json").write_text(json.dumps({"run": folder.name, "model": model, "seed": seed, "length": length,
                                                 "params": 1000, "flops_per_token": flops_per_token,
                                                 "tokens_per_step": tokens_per_step, "max_iters": max_iters,
                                                 "bytes_per_token": 1.0}))


def test_welch_p_value_of_a_known_case(tmp_path):
    # a = 1, 2, 3 and b = 4, 5, 6: t = -3 / sqrt(1/3 + 1/3) = -3.674 with 4 degrees of freedom, p = 0.0213
    assert abs(compare.welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])[0] - 0.0213) < 5e-4
    for seed, (g, m) in enumerate([(4.0, 1.0), (5.0, 2.2), (6.0, 2.8)], start=1):
        write_run(tmp_path / "runs" / f"gpt-s{seed}", "gpt", seed, [9.0, g])
        write_run(tmp_path / "runs" / f"x-s{seed}", "x", seed, [9.0, m])
    summary = compare.summarize(compare.load_runs(tmp_path), ["gpt", "x"])
    row = next(r for r in summary["rows"] if r["model"] == "x")
    # x = 1, 2.2, 2.8 (mean 2, var 0.84): t = -3 / sqrt(1/3 + 0.84/3), 3.7 degrees of freedom
    t, dof = -3 / math.sqrt(1 / 3 + 0.84 / 3), (1 / 3 + 0.84 / 3) ** 2 / ((1 / 3) ** 2 / 2 + (0.84 / 3) ** 2 / 2)
    from scipy import stats
    assert abs(row["welch_p"] - 2 * stats.t.sf(abs(t), dof)) < 1e-9
    assert 0 < row["paired_p"] < 0.05  # the differences 3, 2.8, 3.2 are far from 0 for their spread
    assert abs(row["delta"] + 3.0) < 1e-12 and abs(row["bpb_mean"] - 2.0 / math.log(2)) < 1e-12
    assert row["time_to_gpt_loss"] is not None and row["time_to_gpt_loss"] < 1  # it passes gpt's 5.0 early


def test_steps_and_time_to_the_baselines_loss(tmp_path):
    """x's seed-mean curve reaches gpt's mean final loss (4.0) halfway between its evals at steps 50
    (5.0) and 75 (3.0), at 5/8 of gpt's 100 steps; at twice gpt's ms/step that takes 5/4 of gpt's
    time. The one-process times of speed.json replace the logs' when they cover every model, and only then."""
    for seed, end in ((1, -0.1), (2, 0.1)):
        write_run(tmp_path / "runs" / f"gpt-s{seed}", "gpt", seed, [9.0, 7.0, 5.0, 4.0 + end])
        write_run(tmp_path / "runs" / f"x-s{seed}", "x", seed, [9.0, 5.0, 3.0, 2.0 + end / 2])
    runs = compare.load_runs(tmp_path)
    row = lambda summary: next(r for r in summary["rows"] if r["model"] == "x")  # noqa: E731
    logged = compare.summarize(runs, ["gpt", "x"])
    assert abs(row(logged)["steps_to_gpt_loss"] - 0.625) < 1e-12 and abs(row(logged)["time_to_gpt_loss"] - 0.625) < 1e-12
    assert logged["ms_per_step_from"] == "the training logs" and row(logged)["ms_per_step"] == 10.0
    # each seed to its baseline seed's final loss: 3.9 at 50 + 25 * 1.1 / 2 steps, 4.1 at 50 + 25 * 0.9 / 2
    assert [round(v, 12) for v in row(logged)["steps_to_gpt_loss_paired"]] == [0.6375, 0.6125]
    assert logged["rows"][0]["steps_to_gpt_loss_paired"] == [1.0, 1.0]  # the baseline's own
    speed = {"ms_per_step": {"gpt": 30.0, "x": 60.0}, "params": {"gpt": 1000, "x": 1000}, "device": "cpu",
             "command": "python bench.py --json", "threads": 2, "hostname_cpu": "a CPU", "torch": "2", "measured": "today"}
    timed = compare.summarize(runs, ["gpt", "x"], speed)
    assert abs(row(timed)["steps_to_gpt_loss"] - 0.625) < 1e-12 and abs(row(timed)["time_to_gpt_loss"] - 1.25) < 1e-12
    assert row(timed)["ms_per_step"] == 60.0 and timed["ms_per_step_from"]["command"] == "python bench.py --json"
    assert "bench.py --json; a CPU, 2 thread(s)" in compare.table_markdown(timed, {"seeds": [1, 2]})
    assert "per-round ratios" not in compare.table_markdown(timed, {"seeds": [1, 2]})  # a speed.json from before
    assert "per-round ratios to gpt's" in compare.table_markdown(compare.summarize(runs, ["gpt", "x"], {
        **speed, "paired": True}), {"seeds": [1, 2]})
    del speed["params"]["x"]  # a model it did not time: the logs' times for all, never a mix
    assert compare.summarize(runs, ["gpt", "x"], speed)["ms_per_step_from"] == "the training logs"
    speed["params"]["x"] = 999  # nor when it timed another model than the runs trained (a stale speed.json)
    assert compare.summarize(runs, ["gpt", "x"], speed)["ms_per_step_from"] == "the training logs"


def test_the_table_says_where_its_runs_trained(tmp_path, capsys):
    """One machine: said once. Several (a grid continued on another VM): which run trained where, and a
    warning, in the grid's table and in --across's line for it."""
    for seed in (1, 2):
        write_run(tmp_path / "g" / "runs" / f"gpt-s{seed}", "gpt", seed, [9.0, 2.0 + seed / 10])
        write_run(tmp_path / "g" / "runs" / f"m-s{seed}", "m", seed, [9.0, 1.85 + seed * 0.12])
    for name in ("gpt-s1", "gpt-s2", "m-s1", "m-s2"):
        info = tmp_path / "g" / "runs" / name / "run.json"
        info.write_text(json.dumps({**json.loads(info.read_text()), "hostname_cpu": "AMD EPYC", "cpu_capability": "AVX2",
                                    "cuda": None}))
    (tmp_path / "g" / "compare.json").write_text(json.dumps({"commands": ["python compare.py"], "models": ["gpt", "m"],
                                                             "seeds": [1, 2], "lengths": [], "train_flags": []}))
    table = compare.report(tmp_path / "g")
    assert "Trained on: AMD EPYC (AVX2) (all 4 runs)." in table and "**Trained on" not in table
    info = tmp_path / "g" / "runs" / "m-s2" / "run.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "hostname_cpu": "Intel Xeon", "cpu_capability": "AVX512"}))
    table = compare.report(tmp_path / "g")
    assert "**Trained on 2 machines** (AMD EPYC (AVX2): 3 runs; Intel Xeon (AVX512): m-s2). " in table
    assert "datasets" not in table  # these run.json files do not say which data they saw: no data warning
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["machines"] == {"AMD EPYC (AVX2)": ["gpt-s1", "gpt-s2", "m-s1"], "Intel Xeon (AVX512)": ["m-s2"]}
    write_grid(tmp_path / "h", ["--n_layer=4"], {"gpt": [2.0, 2.1], "m": [1.9, 2.05]})  # run.json without a machine
    assert "Trained on: an unrecorded machine (all 4 runs)." in (tmp_path / "h" / "table.md").read_text()
    compare.main([f"--results={tmp_path}", "--name=both", "--across=g,h"])
    across = (tmp_path / "both" / "table.md").read_text()
    assert "(n=2, seeds 1-2); **on 2 machines** (see its table)" in across and "(n=2, seeds 1-2); on an unrecorded machine" in across
    for name, (val_tokens, split) in {"gpt-s1": (50, "documents"), "gpt-s2": (50, "documents"),
                                      "m-s1": (50, "documents"), "m-s2": (52, "tokens")}.items():
        info = tmp_path / "g" / "runs" / name / "run.json"
        info.write_text(json.dumps({**json.loads(info.read_text()), "dataset": "/x/data/pystdlib", "train_tokens": 950,
                                    "val_tokens": val_tokens, "val_split": split}))
    table = compare.report(tmp_path / "g")
    compare.main([f"--results={tmp_path}", "--name=both", "--across=g,h"])
    assert "**on 2 datasets** (see its table)" in (tmp_path / "both" / "table.md").read_text()
    assert ("**Trained on 2 different datasets** (pystdlib: 950 train + 50 val tokens, val split by documents: 3 runs; "
            "pystdlib: 950 train + 52 val tokens, val split by tokens: m-s2)") in table
    # one dataset: said once; recorded for some runs only: which
    for name in ("gpt-s1", "gpt-s2", "m-s1", "m-s2"):
        info = tmp_path / "g" / "runs" / name / "run.json"
        info.write_text(json.dumps({**json.loads(info.read_text()), "val_tokens": 50, "val_split": "documents"}))
    assert "Data: pystdlib: 950 train + 50 val tokens, val split by documents (all 4 runs)." in compare.report(tmp_path / "g")
    compare.main([f"--results={tmp_path}", "--name=both", "--across=g,h"])  # --across names each grid's data too
    across = (tmp_path / "both" / "table.md").read_text()
    assert "**on 2 machines** (see its table); data pystdlib: 950 train + 50 val tokens, val split by documents\n" in across
    assert "on an unrecorded machine\n" in across  # h's runs recorded no data: nothing said
    info = tmp_path / "g" / "runs" / "gpt-s1" / "run.json"
    info.write_text(json.dumps({k: v for k, v in json.loads(info.read_text()).items() if k != "val_tokens"}))
    assert ("Data: pystdlib: 950 train + 50 val tokens, val split by documents: 3 runs; not recorded (a run.json "
            "from before compare.py recorded the data): gpt-s1.") in compare.report(tmp_path / "g")
    compare.main([f"--results={tmp_path}", "--name=both", "--across=g,h"])
    assert "val split by documents (not recorded by every run)\n" in (tmp_path / "both" / "table.md").read_text()
    # the machine of each sitting, from the start records of the log: a run resumed elsewhere is both;
    # a run.json without the kernels counts as its CPU's other runs when these all recorded the same
    log = tmp_path / "g" / "runs" / "m-s2" / "log.jsonl"
    starts = [{"event": "start", "device": "cpu", "cpu": "AMD EPYC", "cpu_capability": "AVX2"},
              {"event": "start", "device": "cpu", "cpu": "Intel Xeon", "cpu_capability": "AVX512"}]
    log.write_text("".join(json.dumps(r) + "\n" for r in starts) + log.read_text())
    info = tmp_path / "g" / "runs" / "gpt-s2" / "run.json"
    info.write_text(json.dumps({k: v for k, v in json.loads(info.read_text()).items() if k != "cpu_capability"}))
    summary = compare.summarize(compare.load_runs(tmp_path / "g"), ["gpt", "m"])
    assert summary["machines"] == {"AMD EPYC (AVX2)": ["gpt-s1", "gpt-s2", "m-s1"], "AMD EPYC (AVX2) + Intel Xeon (AVX512)": ["m-s2"]}
    # what compare.py records of a run's machine: the CPU, the kernels torch chose, the threads it ran with
    env = compare.environment({"OMP_NUM_THREADS": "3"})
    assert env["threads"] == 3 and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["hostname_cpu"]
    assert compare.threads({"OMP_NUM_THREADS": "4,2"}) == compare.threads({}) == torch.get_num_threads()


def write_grid(folder, train_flags, finals, lengths=()):
    """A grid of finished runs, {model: [final per seed]} (the first model the baseline; its runs at
    other lengths {length: [finals]}), and its summary."""
    for model, values in finals.items():
        for seed, final in enumerate(values, start=1):
            write_run(folder / "runs" / f"{model}-s{seed}", model, seed, [9.0, final])
    for length, values in dict(lengths).items():
        for seed, final in enumerate(values, start=1):
            write_run(folder / "runs" / f"gpt-x{length:g}-s{seed}", "gpt", seed, [9.0, final], length=length,
                      max_iters=round(100 * length))
    (folder / "compare.json").write_text(json.dumps({"commands": ["python compare.py"], "models": list(finals),
                                                     "seeds": [1, 2, 3], "lengths": [], "train_flags": train_flags}))
    compare.report(folder)


def test_across_lists_the_models_best_first_by_the_last_grids_delta(tmp_path):
    # the table's rows in the figure's order (its legend's): a reader looks for the best first
    write_grid(tmp_path / "g8", ["--n_layer=8"], {"gpt": [2.0, 2.1, 2.2], "worse": [1.8, 1.9, 2.0], "better": [2.0, 2.1, 2.15]})
    write_grid(tmp_path / "g16", ["--n_layer=16"], {"gpt": [2.0, 2.1, 2.2], "worse": [2.0, 2.05, 2.15], "better": [1.7, 1.8, 1.9]})
    compare.main([f"--results={tmp_path}", "--name=both", "--across=g8,g16"])
    table = (tmp_path / "both" / "table.md").read_text()
    assert table.index("| `better` |") < table.index("| `worse` |")
    assert "`python compare.py --name=both --across=g8,g16`" in table  # (no --models: the same models)


def test_across_figures_grid_labels_do_not_run_into_each_other(tmp_path, monkeypatch):
    # width's figure: "--learning_rate=4e-3" under deep8 ran into "--n_head=8 --n_embd=256 --learning_rate=1e-3"
    label = compare.grid_label("wide8", ["--n_head=8", "--n_embd=256", "--learning_rate=1e-3"], columns=30)
    assert label == "wide8\n--n_head=8 --n_embd=256\n--learning_rate=1e-3"  # broken between flags, none split
    assert compare.grid_label("g", ["--a_flag_longer_than_the_columns=1"], columns=8) == "g\n--a_flag_longer_than_the_columns=1"
    assert compare.grid_label("g", [], columns=8) == "g"
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to measure its labels
    flags = {"a": ["--learning_rate=4e-3"], "b": ["--n_head=8", "--n_embd=256", "--learning_rate=1e-3"],
             "c": ["--n_layer=16", "--n_head=8", "--n_embd=256", "--block_size=256", "--learning_rate=2e-3"]}
    for grid, extra in flags.items():
        write_grid(tmp_path / grid, ["--max_iters=100", *extra], {"gpt": [2.0, 2.1, 2.2], "m": [1.9, 2.0, 2.05]})
    figures.clear()  # (each grid's own plots)
    compare.main([f"--results={tmp_path}", "--name=three", "--across=a,b,c"])
    fig, = figures
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].get_xticklabels()]
    assert len(boxes) == 3 and all(left.x1 < right.x0 for left, right in zip(boxes, boxes[1:])), \
        [(b.x0, b.x1) for b in boxes]
    legend = fig.axes[0].get_legend().get_window_extent(renderer)
    assert legend.y1 < min(b.y0 for b in boxes)  # and the legend sits under them, not over them


def test_across_puts_the_grids_models_side_by_side(tmp_path, capsys):
    write_grid(tmp_path / "g8", ["--n_layer=8", "--data_dir=a"], {"gpt": [2.0, 2.1, 2.2], "m": [1.9, 2.0, 2.05],
                                                                   "only8": [2.0, 2.1, 2.2]})
    # g16: gpt on L(C) = 2 (C/1e11)^-0.3 + 1 at three lengths (1e9 FLOPs a step), m at its loss of 1.5x the compute
    law = lambda steps: 2 * (steps * 1e9 / 1e11) ** -0.3 + 1  # noqa: E731
    spread = (-1e-3, 0.0, 1e-3)
    write_grid(tmp_path / "g16", ["--n_layer=16", "--data_dir=b"],
               {"gpt": [law(100) + e for e in spread], "m": [law(150) + e for e in reversed(spread)]},
               lengths={0.5: [law(50) + e for e in spread], 2: [law(200) + e for e in spread]})
    compare.main([f"--results={tmp_path}", "--name=depth", "--across=g8,g16"])
    table = (tmp_path / "depth" / "table.md").read_text()
    assert "`python compare.py --name=depth --across=g8,g16`" in table
    assert "- g8 (--n_layer=8): `gpt` 2.1000 ± 0.1000 (n=3, seeds 1-3)" in table  # what differs; paths are no difference
    assert [compare.seed_list(s) for s in ([4], [6, 7, 8, 9, 10], [1, 2, 3, 5], [1, 3])] == [
        "seed 4", "seeds 6-10", "seeds 1-3, 5", "seeds 1, 3"]  # which seeds: does a second grid reuse them?
    row = next(line for line in table.splitlines() if line.startswith("| `m` |"))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert cells[0] == "-0.1167 (n=3)" and cells[3] == f"{law(150) - law(100):+.4f} (n=3)"  # Δ vs its own gpt
    g8 = compare.load_grids(tmp_path, ["g8"])["g8"]["rows"][1]
    assert cells[1] == f"{compare.fmt_p(g8['welch_p'])} / {compare.fmt_p(g8['paired_p'])}" and cells[2] == "-"  # no fit
    assert re.fullmatch(r"1\.50 \(1\.\d\d–1\.\d\d\)", cells[5])  # the multiplier, its interval
    assert "only8" not in table  # by default the models in every grid
    assert (tmp_path / "depth" / "delta_across.png").stat().st_size > 0
    compare.main([f"--results={tmp_path}", "--name=depth", "--across=g8,g16", "--models=m,only8"])
    row = next(line for line in (tmp_path / "depth" / "table.md").read_text().splitlines() if "`only8`" in line)
    assert [c.strip() for c in row.split("|")[2:-1]][3:] == ["", "", ""]  # not in g16: blank there
    for argv, message in ((["--across=g8,nope"], "nope/summary.json not found"),
                          (["--across=g8,g16", "--n_layer=4"], "no train.py flags"),
                          (["--across=g8,g16", "--seeds=1"], "no train.py flags"),
                          (["--across=depth,g8"], "a name of its own"),
                          (["--across=g8,g8"], "two or more different grids"),
                          (["--across=g8,g16", "--models=mm"], "mm in none of the grids")):
        with pytest.raises(SystemExit) as exit_:
            compare.main([f"--results={tmp_path}", "--name=depth", *argv])
        assert message in str(exit_.value) + capsys.readouterr().err  # sys.exit's message, or argparse's
    with pytest.raises(SystemExit) as exit_:  # a grid's results are never overwritten by a comparison
        compare.main([f"--results={tmp_path}", "--name=g16", "--across=g8,depth"])
    assert "a name of its own" in capsys.readouterr().err and (tmp_path / "g16" / "compare.json").exists()
    write_grid(tmp_path / "other", ["--n_layer=4"], {"resformer": [1.0, 1.1, 1.2], "m": [1.0, 1.05, 1.1]})
    with pytest.raises(SystemExit, match="different baselines"):
        compare.main([f"--results={tmp_path}", "--name=depth", "--across=g8,other"])
    (tmp_path / "other" / "summary.json").write_text("{")
    with pytest.raises(SystemExit, match="unreadable or older"):
        compare.main([f"--results={tmp_path}", "--name=depth", "--across=g8,other"])


def test_across_with_own_rates_matches_each_model_at_the_rate_each_grid_has_it(tmp_path, capsys, monkeypatch):
    write_grid(tmp_path / "g8", ["--n_layer=8", "--learning_rate=4e-3"],
               {"gpt": [2.0, 2.1, 2.2], "dcmha:learning_rate=2e-3": [1.9, 2.0, 2.05],
                "gpt:learning_rate=2e-3": [2.0, 2.05, 2.2], "dca:dca_k=2;learning_rate=2e-3": [2.0, 2.1, 2.1]})
    write_grid(tmp_path / "g16", ["--n_layer=16"],  # at train.py's default rate
               {"gpt": [2.0, 2.2, 2.3], "dcmha:learning_rate=1e-3": [1.8, 2.0, 2.15],
                "gpt:learning_rate=2e-3": [2.1, 2.2, 2.3], "dca:dca_k=2": [2.0, 2.2, 2.2]})
    compare.main([f"--results={tmp_path}", "--name=own", "--across=g8,g16"])  # by spec: nothing in both but gpt:2e-3
    assert "`dcmha" not in (tmp_path / "own" / "table.md").read_text()
    compare.main([f"--results={tmp_path}", "--name=own", "--across=g8,g16", "--own_rates"])
    table = (tmp_path / "own" / "table.md").read_text()
    assert "`python compare.py --name=own --across=g8,g16 --own_rates`" in table
    assert "- g8 (--n_layer=8 --learning_rate=4e-3): `gpt` at lr 4e-3 2.1000" in table
    assert f"- g16 (--n_layer=16): `gpt` at lr {compare.learning_rate_of('gpt', [])[1]} 2.1667" in table
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| `")}
    # the baseline's variant keeps its name; best first by g16's Δ (-0.18, -0.03, +0.03)
    assert list(rows) == ["`dcmha`", "`dca:dca_k=2`", "`gpt:learning_rate=2e-3`"]
    assert rows["`dcmha`"][0] == "-0.1167 (n=3, lr 2e-3)" and rows["`dcmha`"][2] == "-0.1833 (n=3, lr 1e-3)"
    assert rows["`gpt:learning_rate=2e-3`"][0] == "-0.0167 (n=3, lr 2e-3)"
    assert rows["`dca:dca_k=2`"][2].endswith(f", lr {compare.learning_rate_of('gpt', [])[1]})")
    assert all(len(cells) == 4 for cells in rows.values()) and "no compute multipliers" in table  # no fits: no column
    assert compare.learning_rate_of("dca:dca_k=2;learning_rate=2.5e-4", []) == ("dca:dca_k=2", "2.5e-4")
    assert (tmp_path / "own" / "delta_across.png").stat().st_size > 0
    plotted = {}  # the figure's legend names each model's rate in each grid
    monkeypatch.setattr(compare, "across_plot", lambda summaries, *args: plotted.update(summaries))
    compare.main([f"--results={tmp_path}", "--name=own", "--across=g8,g16", "--own_rates"])
    assert compare.rates_label(plotted, "dcmha") == " (lr 2e-3 → 1e-3)"
    assert compare.rates_label(plotted, "gpt:learning_rate=2e-3") == " (lr 2e-3)"
    write_grid(tmp_path / "sweep", ["--n_layer=8"], {"gpt": [2.0, 2.1, 2.2], "dca:learning_rate=1e-3": [2.1, 2.1, 2.3],
                                                     "dca:learning_rate=2e-3": [2.0, 2.2, 2.1]})
    for models in ([], ["--models=dca"], ["--models=dca:learning_rate=4e-3"]):  # nothing, or nothing there, picks
        with pytest.raises(SystemExit, match=r"sweep trained dca at more than one learning rate \(dca:learning_rate=1e-3, "
                                             r"dca:learning_rate=2e-3\): name the one to take in --models"):
            compare.main([f"--results={tmp_path}", "--name=own", "--across=g8,sweep", "--own_rates", *models])
    write_grid(tmp_path / "g8b", ["--n_layer=8", "--learning_rate=4e-3"],
               {"gpt": [2.0, 2.1, 2.2], "dca:learning_rate=2e-3": [1.9, 2.0, 2.15]})
    compare.main([f"--results={tmp_path}", "--name=own", "--across=g8b,sweep", "--own_rates",
                  "--models=dca:learning_rate=1e-3"])  # picks sweep's 1e-3 row; g8b has dca at one rate: that one
    table = (tmp_path / "own" / "table.md").read_text()
    assert "`python compare.py --name=own --across=g8b,sweep --own_rates --models=dca:learning_rate=1e-3`" in table
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| `")}
    assert list(rows) == ["`dca`"] and rows["`dca`"][0] == "-0.0833 (n=3, lr 2e-3)"
    assert rows["`dca`"][2] == "+0.0667 (n=3, lr 1e-3)"  # sweep's 1e-3 row (2.1667), not its 2e-3 one (2.1)
    compare.main([f"--results={tmp_path}", "--name=own", "--across=g8b,sweep", "--own_rates",
                  "--models=dca:learning_rate=2e-3"])
    assert "+0.0000 (n=3, lr 2e-3)" in (tmp_path / "own" / "table.md").read_text()
    with pytest.raises(SystemExit):
        compare.main([f"--results={tmp_path}", "--name=g8", "--summary", "--own_rates"])
    assert "use it with --across" in capsys.readouterr().err


def test_across_draws_what_it_can_of_an_infinite_multiplier(tmp_path):
    """A model below the fitted law's asymptote needs infinite baseline compute: ∞ in the table,
    left out of the plot (which still draws)."""
    law = lambda steps: 2 * (steps * 1e9 / 1e11) ** -0.3 + 1  # noqa: E731
    spread = (-1e-3, 0.0, 1e-3)
    for grid in ("a", "b"):
        write_grid(tmp_path / grid, [f"--n_layer={len(grid)}"],
                   {"gpt": [law(100) + e for e in spread], "m": [0.5 + e for e in reversed(spread)]},
                   lengths={0.5: [law(50) + e for e in spread], 2: [law(200) + e for e in spread]})
    compare.main([f"--results={tmp_path}", "--name=both", "--across=a,b"])
    assert "| ~∞ (∞–∞) |" in (tmp_path / "both" / "table.md").read_text()
    assert (tmp_path / "both" / "delta_across.png").stat().st_size > 0


def test_speed_times_the_grids_models_at_its_shape():
    flags = ["--n_layer=8", "--block_size=64", "--value_residual=learnable"]
    mapping, shape, c = compare.speed_specs(flags[:2], ["gpt:learning_rate=1e-3", "gpt:learning_rate=2e-3",
                                                       "dca:dca_k=2;n_layer=4", "resformer:value_residual=learnable"])
    assert shape == {"n_layer": 8, "n_head": 4, "n_embd": 128, "block_size": 64} and c.batch_size == 16
    assert mapping == {"gpt:learning_rate=1e-3": "gpt", "gpt:learning_rate=2e-3": "gpt",  # learning rates: one model
                       "dca:dca_k=2;n_layer=4": "dca:dca_k=2;n_layer=4", "resformer:value_residual=learnable":
                       "resformer:value_residual=learnable"}
    assert compare.speed_specs(flags, ["resformer"])[0] == {"resformer": "resformer:value_residual=learnable"}
    # a model that keeps a shape field at its default while the baseline sets it: timed at its own
    assert compare.speed_specs([], ["gpt:n_layer=8", "dca"])[0] == {"gpt:n_layer=8": "gpt", "dca": "dca:n_layer=4"}
    for spec, what in (("gpt:batch_size=4", "batch_size"), ("gpt:block_size=32", "block_size"), ("gpt:dtype=float16", "dtype")):
        with pytest.raises(SystemExit, match=f"{spec} sets {what} unlike gpt"):
            compare.speed_specs([], ["gpt", spec])


def test_speed_times_an_optimizer_step_in_the_grids_dtype(data_dir, tmp_path, monkeypatch):
    """bench.py gets the grid's shape, dtype and device; an optimizer step of 2 accumulated micro-batches
    takes 2 of bench's (micro-batch) steps; a model's ms/step is gpt's times bench's paired ratio (1.8,
    not the medians' 2: a machine that drifted between rounds)."""
    flags = [f"--data_dir={data_dir}", "--gradient_accumulation_steps=2", "--dtype=bfloat16", "--batch_size=4"]
    (tmp_path / "compare.json").write_text(json.dumps({"models": ["gpt", "dcmha"], "train_flags": flags}))
    calls = []

    def fake_bench(argv, **kwargs):
        calls.append(argv)
        rows = [{"model": m, "params": 1, "ms_per_step": 10.0 * (i + 1), "ratio_to_gpt": ratio}
                for i, (m, ratio) in enumerate([("gpt", 1.0), ("dcmha", 1.8)])]
        return subprocess.CompletedProcess(argv, 0, stdout=json.dumps(rows), stderr="")
    monkeypatch.setattr(compare.subprocess, "run", fake_bench)
    speed = compare.measure_speed(tmp_path, None)
    assert "--dtype=bfloat16" in calls[0] and "--device=cpu" in calls[0] and "--batch_size=4" in calls[0]
    assert "--vocab_size=256" in calls[0] and "--compile" not in calls[0]
    assert speed["ms_per_step"] == {"gpt": 20.0, "dcmha": 36.0} and speed["device"] == "cpu" and speed["paired"]
    assert json.loads((tmp_path / "speed.json").read_text())["ms_per_step"] == speed["ms_per_step"]
    monkeypatch.setattr(compare.subprocess, "run", lambda argv, **kw: subprocess.CompletedProcess(
        argv, 0, stdout="a warning, then no JSON", stderr=""))
    with pytest.raises(SystemExit, match="bench.py failed"):
        compare.measure_speed(tmp_path, None)


def test_speed_refuses_what_it_cannot_time(tmp_path):
    (tmp_path / "compare.json").write_text(json.dumps({"models": ["gpt"], "train_flags": ["--device=xla"]}))
    with pytest.raises(SystemExit, match="not xla"):
        compare.measure_speed(tmp_path, None)
    (tmp_path / "compare.json").write_text(json.dumps({"models": ["gpt"], "train_flags": [f"--data_dir={tmp_path}"]}))
    with pytest.raises(SystemExit, match="no prepared data .*for the vocabulary size, its data"):
        compare.measure_speed(tmp_path, None)


def test_welch_interval_of_a_known_case():
    # a = 1, 2.2, 2.8 (var 0.84), b = 4, 5, 6 (var 1): se = sqrt(0.84/3 + 1/3), 3.97 degrees of freedom
    # (Welch-Satterthwaite), the 95% interval -3 ± t(0.975, dof)·se; the delta plot's error bars
    from scipy import stats
    se = math.sqrt(0.84 / 3 + 1 / 3)
    dof = se ** 4 / ((0.84 / 3) ** 2 / 2 + (1 / 3) ** 2 / 2)
    half = stats.t.ppf(0.975, dof) * se
    p, (low, high) = compare.welch([1.0, 2.2, 2.8], [4.0, 5.0, 6.0])
    assert abs(low - (-3 - half)) < 1e-9 and abs(high - (-3 + half)) < 1e-9
    assert abs(half - 2.181) < 1e-3  # t(0.975, 3.97) = 2.785 times se = 0.783
    assert 0 < p < 0.05 and high < 0  # the same test: p < 0.05, and its 95% interval excludes 0
    assert all(x != x for x in compare.welch([1.0], [4.0, 5.0])[1])  # one seed: no interval (nan)


def test_compute_multiplier_of_a_shifted_power_law(tmp_path):
    """The baseline follows L(C) = 2 (C/1e11)^-0.3 + 1 at three lengths; a model whose loss is the
    baseline's at 1.5x the compute, with the same FLOPs per token, has a multiplier of 1.5."""
    law = lambda c: 2 * (c / 1e11) ** -0.3 + 1  # noqa: E731
    flops_per_step = 1e6 * 1000
    noise = {1: 1e-3, 2: -1e-3}  # two seeds either side of the law: the means lie on it, the t-tests have a spread
    for length, iters in ((0.5, 50), (1.0, 100), (2.0, 200)):
        for seed in (1, 2):
            name = "gpt-s%d" % seed if length == 1.0 else f"gpt-x{length:g}-s{seed}"
            final = law(iters * flops_per_step) + noise[seed]
            write_run(tmp_path / "runs" / name, "gpt", seed, [9.0, final], length=length, max_iters=iters)
    target = law(1.5 * 100 * flops_per_step)
    for seed in (1, 2):
        write_run(tmp_path / "runs" / f"m-s{seed}", "m", seed, [9.0, target - noise[seed]])
    summary = compare.summarize(compare.load_runs(tmp_path), ["gpt", "m"])
    rows = {r["model"]: r for r in summary["rows"]}
    assert abs(summary["fit"]["b"] - 0.3) < 1e-3 and abs(summary["fit"]["c"] - 1) < 1e-3
    assert abs(rows["m"]["compute_multiplier"] - 1.5) < 0.01 and not rows["m"]["multiplier_extrapolated"]
    assert abs(rows["gpt"]["compute_multiplier"] - 1.0) < 0.01
    # the bootstrap interval: around the truth, narrow for seeds 2e-3 apart, the same on every summary
    low, high = rows["m"]["compute_multiplier_ci95"]
    assert 1.4 < low < 1.5 < high < 1.6
    assert compare.summarize(compare.load_runs(tmp_path), ["gpt", "m"])["rows"][1]["compute_multiplier_ci95"] == (low, high)
    # wider seed spread, wider interval; one seed of a model: no interval
    for seed in (1, 2):
        write_run(tmp_path / "runs" / f"wide-s{seed}", "wide", seed, [9.0, target - 10 * noise[seed]])
    write_run(tmp_path / "runs" / "single-s1", "single", 1, [9.0, target])
    rows = {r["model"]: r for r in compare.summarize(compare.load_runs(tmp_path), ["gpt", "m", "wide", "single"])["rows"]}
    wide_low, wide_high = rows["wide"]["compute_multiplier_ci95"]
    assert wide_high - wide_low > 2 * (high - low)
    assert rows["m"]["compute_multiplier_ci95"] == (low, high)  # other models in the table do not move m's
    assert all(x != x for x in rows["single"]["compute_multiplier_ci95"])
    assert " (1." in compare.table_markdown(compare.summarize(compare.load_runs(tmp_path), ["gpt", "m"]),
                                            {"seeds": [1, 2]}).splitlines()[3]  # m's row shows its interval


def test_the_table_says_which_machine_each_point_of_its_power_law_came_from(tmp_path):
    """A grid whose baseline ran its main length on one VM and its other lengths on another fits one law
    through both: the table names the machine of each point; a fit from one machine says nothing more."""
    for length, iters in ((0.5, 50), (1.0, 100), (2.0, 200)):
        for seed in (1, 2):
            name = "gpt-s%d" % seed if length == 1.0 else f"gpt-x{length:g}-s{seed}"
            write_run(tmp_path / "runs" / name, "gpt", seed, [9.0, 2 * (iters / 100) ** -0.3 + 1 + seed / 1e3],
                      length=length, max_iters=iters)
    for seed in (1, 2):
        write_run(tmp_path / "runs" / f"m-s{seed}", "m", seed, [9.0, 2.9 + seed ** 2 / 1e3])

    def on(cpu, *names):
        for name in names:
            info = tmp_path / "runs" / name / "run.json"
            info.write_text(json.dumps({**json.loads(info.read_text()), "hostname_cpu": cpu, "cpu_capability": "AVX512"}))

    def table():
        return compare.table_markdown(compare.summarize(compare.load_runs(tmp_path), ["gpt", "m"]), {"seeds": [1, 2]})
    on("Intel Xeon", "gpt-s1", "gpt-s2", "m-s1", "m-s2", "gpt-x0.5-s1", "gpt-x0.5-s2", "gpt-x2-s1", "gpt-x2-s2")
    assert "Trained on: Intel Xeon (AVX512) (all 8 runs)." in table() and "power law's points" not in table()
    on("AMD EPYC", "gpt-x0.5-s1", "gpt-x0.5-s2", "gpt-x2-s1")
    assert ("The power law's points, the baseline at 0.5× the steps: AMD EPYC (AVX512) (2 runs); 1× the steps: "
            "Intel Xeon (AVX512) (2 runs); 2× the steps: AMD EPYC (AVX512) (1 run), Intel Xeon (AVX512) (1 run): "
            "its compute multipliers mix machines too.") in table()
    # the model's runs on another machine than the whole law: the machines warning, but no fit note
    on("Intel Xeon", "gpt-x0.5-s1", "gpt-x0.5-s2", "gpt-x2-s1")
    on("AMD EPYC", "m-s1", "m-s2")
    assert "**Trained on 2 machines**" in table() and "power law's points" not in table()


# -----------------------------------------------------------------------------
# the FLOPs every model claims, against PyTorch's count of one forward

FLOP_CASES = [(name, {}) for name in gpt.all_models()] + [
    ("dca", {"dca_k": 2}), ("dca", {"grn": "v1"}), ("dcmha", {"dc_static": True}), ("dcmha", {"dc_key_wise": False})]


@pytest.mark.parametrize("name,overrides", FLOP_CASES, ids=lambda x: str(x))
def test_flops_per_token_matches_the_flop_counter(name, overrides):
    """flops_per_token() / 3 (the forward) against torch.utils.flop_counter over one forward,
    with SDPA's math path so that the attention matmuls are counted too. What the counter does
    not see (elementwise sums, gates) is a few percent at most."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    config_class, model_class = gpt.all_models()[name]
    model = model_class(config_class(model=name, n_layer=4, n_head=4, n_embd=64, block_size=64, vocab_size=256,
                                     **overrides))
    idx = torch.randint(0, 256, (2, 64))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx)
    counted = counter.get_total_flops() / idx.numel()
    claimed = model.flops_per_token(64) / 3
    assert abs(claimed / counted - 1) < 0.05, f"{name} {overrides}: claims {claimed:.0f} FLOPs/token, counted {counted:.0f}"


def test_a_grid_continues_under_its_recorded_command(tmp_path, monkeypatch):
    """table.md shows --data_dir=data where the grid ran with this machine's absolute path: that
    command must continue the grid, and a real change of flags must still be refused."""
    results = tmp_path / "results"
    (results / "g").mkdir(parents=True)
    (results / "g" / "compare.json").write_text(json.dumps(
        {"commands": ["python compare.py --name=g"], "models": ["gpt"], "seeds": [1], "lengths": [],
         "train_flags": [f"--data_dir={ROOT / 'data'}", "--max_iters=100"]}))
    monkeypatch.setattr(compare, "run_grid", lambda *args: None)  # the flags check only: nothing trains
    monkeypatch.setattr(compare, "report", lambda *args: "")
    argv = ["--name=g", f"--results={results}", "--models=gpt", "--seeds=1,2", "--data_dir=data"]
    compare.main(argv + ["--max_iters=100"])
    assert json.loads((results / "g" / "compare.json").read_text())["seeds"] == [1, 2]
    with pytest.raises(SystemExit, match="other train.py flags"):
        compare.main(argv + ["--max_iters=200"])
    with pytest.raises(SystemExit, match="other train.py flags"):
        compare.main(["--name=g", f"--results={results}", "--models=gpt", "--data_dir=data2", "--max_iters=100"])


def test_a_grid_refuses_to_go_on_with_other_data_under_the_same_data_dir(data_dir, tmp_path, monkeypatch):
    """The data folder made again with another --val_split keeps its --data_dir: the grid's next runs
    would train on other val windows than its finished ones. compare.py must refuse, before
    anything is trained or recorded, and go on once the data is the runs' again."""
    results = tmp_path / "results"
    grid = results / "g"
    (grid / "runs" / "gpt-s1").mkdir(parents=True)
    recorded = {"commands": ["python compare.py --name=g"], "models": ["gpt"], "seeds": [1], "lengths": [],
                "train_flags": [f"--data_dir={data_dir}", "--max_iters=100"]}
    (grid / "compare.json").write_text(json.dumps(recorded))
    meta = json.loads((Path(data_dir) / "pystdlib" / "meta.json").read_text())
    finished = {"run": "gpt-s1", "model": "gpt", "seed": 1, "dataset": str(Path(data_dir) / "pystdlib"),
                "train_tokens": meta["train_tokens"] + 17, "val_tokens": meta["val_tokens"] - 17, "val_split": "documents"}
    (grid / "runs" / "gpt-s1" / "run.json").write_text(json.dumps(finished))
    monkeypatch.setattr(compare, "run_grid", lambda *args: None)  # the checks only: nothing trains
    monkeypatch.setattr(compare, "report", lambda *args: "")
    argv = ["--name=g", f"--results={results}", "--models=gpt", "--seeds=1,2", f"--data_dir={data_dir}", "--max_iters=100"]
    with pytest.raises(SystemExit, match=r"runs trained on pystdlib: .* val split by documents, but .* now holds "
                                         r"pystdlib: .* val split by tokens: make their data again"):
        compare.main(argv)
    assert json.loads((grid / "compare.json").read_text()) == recorded  # nothing recorded
    finished.update(train_tokens=meta["train_tokens"], val_tokens=meta["val_tokens"], val_split=meta["val_split"])
    (grid / "runs" / "gpt-s1" / "run.json").write_text(json.dumps(finished))
    compare.main(argv)  # the runs' data again: the grid goes on
    assert json.loads((grid / "compare.json").read_text())["seeds"] == [1, 2]


def test_recorded_commands_show_repo_paths_relative(tmp_path):
    """compare.json and run.json record commands a reader can rerun from the repo: no absolute
    path into this machine's checkout, paths outside it unchanged."""
    shown = compare.shown_command("train.py", [f"--data_dir={ROOT / 'data'}", f"--out_dir={tmp_path}", "--n_layer=8",
                                               f"--results={ROOT}"])
    assert shown == f"python train.py --data_dir=data --out_dir={tmp_path} --n_layer=8 --results=."
    quoted = compare.shown_command("compare.py", ["--name=g", "--models=gpt,dca:dca_k=2;learning_rate=2e-3"])
    assert quoted == "python compare.py --name=g '--models=gpt,dca:dca_k=2;learning_rate=2e-3'"  # pastes into a shell


def test_each_model_has_its_color_in_every_figure():
    """A model's color does not depend on the grid: its plain spec (else its first) gets it, its variants
    (another learning rate, k-DCA) lighter shades of it, all different; analyze.py uses the same."""
    import analyze
    colors = compare.model_colors(["gpt", "attnres", "gpt:learning_rate=2e-3", "muddformer:learning_rate=2e-3",
                                   "mine", "gpt:learning_rate=8e-3"])
    assert colors["gpt"] == compare.MODEL_COLORS["gpt"] == analyze.MODEL_COLORS["gpt"]
    assert colors["muddformer:learning_rate=2e-3"] == compare.MODEL_COLORS["muddformer"]  # its first variant here
    assert compare.model_colors(["dca", "attnres"])["attnres"] == colors["attnres"]       # whatever the order
    assert len(set(colors.values())) == len(colors)                                      # none shared
    assert colors["mine"] not in compare.MODEL_COLORS.values()                           # a model of your own
    # the plain model keeps its own color wherever the grid lists it; its variants also differ in
    # marker and line (three ResFormers were three blues of one look in own-rates' figure)
    specs = ["resformer:value_residual=learnable_plus", "gpt", "resformer", "resformer:value_residual=learnable"]
    assert compare.model_colors(specs)["resformer"] == compare.MODEL_COLORS["resformer"]
    styles = compare.variant_styles(specs)
    assert styles["resformer"] == styles["gpt"] == ("o", "-")
    assert styles["resformer:value_residual=learnable_plus"] == ("s", "--") and styles["resformer:value_residual=learnable"] == ("^", ":")


def test_an_unfinished_run_is_not_removed_while_a_live_run_holds_its_folder(tmp_path):
    """compare.py starts a run that saved no checkpoint again from scratch, removing its folder; a
    train.py still running there (left going by a stopped compare.py) keeps it, with the reason."""
    import train
    out_dir = tmp_path / "gpt-s1"
    out_dir.mkdir()
    (out_dir / "log.jsonl").write_text('{"event": "start"}\n')
    with train.locked(str(out_dir / "train.lock")):
        why = compare.remove_unfinished(out_dir)
        assert "in use by another run" in why and (out_dir / "log.jsonl").exists()
    assert compare.remove_unfinished(out_dir) is None and not out_dir.exists()


def test_against_makes_the_table_with_another_baseline_and_leaves_the_grids(tmp_path):
    """--summary --against=MODEL: Δ and p against that model, into against-<MODEL>.md; table.md and
    summary.json are the grid's, as they were. A model the grid lacks is refused, naming those it has."""
    grid = tmp_path / "results" / "g"
    write_grid(grid, [], {"gpt": [2.0, 2.1, 2.2], "gpt:learning_rate=2e-3": [1.9, 2.05, 2.1], "m": [1.5, 1.7, 1.6]})
    before = {name: (grid / name).read_text() for name in ("table.md", "summary.json")}
    out = run(["compare.py", "--name=g", f"--results={tmp_path / 'results'}", "--summary",
               "--against=gpt:learning_rate=2e-3"]).stdout
    written = (grid / "against-gpt-learning_rate-2e-3.md").read_text()
    assert "--summary --against=gpt:learning_rate=2e-3` from the logs" in written
    assert "| Δ vs gpt:learning_rate=2e-3 |" in written and "| `m` | " in written and "| -0.4167 |" in written
    assert "| `gpt` | " in written and "| +0.0833 |" in written and out.strip() in written
    assert {name: (grid / name).read_text() for name in before} == before
    refused = run(["compare.py", "--name=g", f"--results={tmp_path / 'results'}", "--summary", "--against=dca"],
                  check=False)
    assert refused.returncode != 0 and "--against=dca is not a model of g: use one of gpt, gpt:learning_rate=2e-3, m" in refused.stderr
    alone = run(["compare.py", "--name=g", f"--results={tmp_path / 'results'}", "--against=gpt"], check=False)
    assert alone.returncode == 2 and "use it with --summary" in alone.stderr


def test_the_seed_by_seed_table_counts_the_seeds_each_model_ended_below_the_baseline(tmp_path):
    """Under the main table, the paired Δs behind 'p (paired)': on how many seeds a model ended below the
    baseline, each seed's Δ, and the smallest and largest, so a claim such as 'ahead on every seed, by
    0.011 to 0.041' is a copy of printed lines; against another baseline too. A seed the baseline lacks
    is left out; a grid of one seed gets no such table."""
    grid = tmp_path / "results" / "g"
    write_grid(grid, [], {"gpt": [2.0, 2.1, 2.2], "m": [1.6, 2.15, 1.7], "n": [2.1, 2.0]})
    table = (grid / "table.md").read_text()
    assert "Seed by seed: each model's final val loss minus `gpt`'s on the same seed" in table
    assert "| model | below gpt on | Δ by seed | from | to |" in table
    assert "| `m` | 2 of 3 seeds | s1 -0.4000, s2 +0.0500, s3 -0.5000 | -0.5000 | +0.0500 |" in table
    assert "| `n` | 1 of 2 seeds | s1 +0.1000, s2 -0.1000 | -0.1000 | +0.1000 |" in table
    summary = json.loads((grid / "summary.json").read_text())
    assert next(r for r in summary["rows"] if r["model"] == "n")["paired_seeds"] == [1, 2]
    run(["compare.py", "--name=g", f"--results={tmp_path / 'results'}", "--summary", "--against=m"])
    against = (grid / "against-m.md").read_text()
    assert "| `gpt` | 1 of 3 seeds | s1 +0.4000, s2 -0.0500, s3 +0.5000 | -0.0500 | +0.5000 |" in against
    assert "| `n` | 1 of 2 seeds | s1 +0.5000, s2 -0.1500 | -0.1500 | +0.5000 |" in against
    # the baseline lacks seed 3 here: m's third run has no partner and is left out
    write_grid(tmp_path / "h", [], {"gpt": [2.0, 2.1], "m": [1.9, 2.2, 1.0]})
    assert "| `m` | 1 of 2 seeds | s1 -0.1000, s2 +0.1000 | -0.1000 | +0.1000 |" in (tmp_path / "h" / "table.md").read_text()
    write_grid(tmp_path / "one", [], {"gpt": [2.0], "m": [1.9]})
    assert "Seed by seed" not in (tmp_path / "one" / "table.md").read_text()

"""Tests for prepare_data.py: token files, idempotence, atomic writes, tokenizers, clear errors."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import prepare_data  # noqa: E402
from prepare_data import get_tokenizer, prepare  # noqa: E402

GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def run(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), *args], capture_output=True,
                          text=True, encoding="utf-8", env=env, timeout=timeout)


def make_corpus(folder, n=20):
    """A folder of text files (plus files that must be skipped); returns the documents in order."""
    folder.mkdir()
    docs = [f"document {i}: héllo wörld ✓ the thé {'x' * i}\n" for i in range(n)]
    docs[3] = "no trailing newline here"
    for i, doc in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    (folder / "sub").mkdir()
    (folder / "sub" / "last.md").write_text("# the last document\n", encoding="utf-8")
    (folder / "blob.bin").write_bytes(b"\x00\x01\x02binary")  # skipped: binary
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # skipped: not utf-8
    (folder / ".hidden").write_text("hidden\n", encoding="utf-8")  # skipped: hidden
    return docs + ["# the last document\n"]


def load(out_dir):
    meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
    train = np.memmap(out_dir / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(out_dir / "val.bin", dtype=np.uint16, mode="r")
    return meta, train, val


def assert_clear_error(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]


def test_text_folder_byte_round_trip(tmp_path):
    docs = make_corpus(tmp_path / "corpus")
    result = run(f"--text={tmp_path / 'corpus'}", f"--data_dir={tmp_path / 'data'}")
    assert result.returncode == 0, result.stderr
    meta, train, val = load(tmp_path / "data" / "corpus")
    text = "".join(d if d.endswith("\n") else d + "\n" for d in docs)  # byte: a newline ends each doc
    n_bytes = len(text.encode("utf-8"))
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 256 and meta["eot_token"] is None
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert len(train) + len(val) == n_bytes
    assert len(val) == round(n_bytes * 0.05)  # 5% of the tokens, the last document cut where needed
    tok = get_tokenizer(meta["tokenizer"])
    assert tok.decode(np.concatenate([train, val])) == text


def test_second_run_does_no_work_and_force_rebuilds(tmp_path):
    make_corpus(tmp_path / "corpus")
    args = [f"--text={tmp_path / 'corpus'}", f"--data_dir={tmp_path / 'data'}", "--name=c"]
    assert run(*args).returncode == 0
    train_bin = tmp_path / "data" / "c" / "train.bin"
    stamp = train_bin.stat().st_mtime_ns

    again = run(*args)
    assert again.returncode == 0
    assert "already prepared" in again.stdout and "--force" in again.stdout
    assert train_bin.stat().st_mtime_ns == stamp

    (tmp_path / "corpus" / "doc00.txt").write_text("changed\n", encoding="utf-8")
    forced = run(*args, "--force")
    assert forced.returncode == 0 and "already prepared" not in forced.stdout
    meta, train, val = load(tmp_path / "data" / "c")
    assert get_tokenizer("byte").decode(train[:8]) == "changed\n"

    # other settings into the same directory: refuse instead of mixing datasets
    assert_clear_error(run(*args, "--max_tokens=100"), "--force")


@pytest.mark.parametrize("stall_on", ["train.bin", "val.bin"])
def test_kill_mid_write_leaves_no_partial_file(tmp_path, stall_on):
    make_corpus(tmp_path / "corpus")
    args = [f"--text={tmp_path / 'corpus'}", f"--data_dir={tmp_path / 'data'}", "--name=c"]
    # a child that writes part of one file, says so, and hangs there until it is killed
    code = f"""if True:
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import prepare_data
        write_atomic = prepare_data.write_atomic
        def stall(f):
            f.write(b"\\0" * 4096)
            f.flush()
            print("stalling", flush=True)
            time.sleep(120)
        def stalling_write_atomic(path, write):
            return write_atomic(path, stall if path.endswith({stall_on!r}) else write)
        prepare_data.write_atomic = stalling_write_atomic
        prepare_data.main({args!r})
    """
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if line.strip() == "stalling":
                break
        else:
            pytest.fail("the child finished without stalling")
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    out_dir = tmp_path / "data" / "c"
    assert not out_dir.exists()  # only the hidden build folder, data/.c.building-<pid>

    result = run(*args)
    assert result.returncode == 0 and "already prepared" not in result.stdout
    meta, train, val = load(out_dir)
    assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    assert os.listdir(tmp_path / "data") == ["c"]  # the killed run's build folder was cleaned up


def test_failed_write_cleans_up(tmp_path, monkeypatch):
    make_corpus(tmp_path / "corpus")
    write_atomic = prepare_data.write_atomic

    def failing_write(f):
        f.write(b"\0" * 100)
        raise OSError("disk full")

    def write_atomic_failing_on_val(path, write):
        return write_atomic(path, failing_write if path.endswith("val.bin") else write)

    monkeypatch.setattr(prepare_data, "write_atomic", write_atomic_failing_on_val)
    with pytest.raises(OSError, match="disk full"):
        prepare(text=str(tmp_path / "corpus"), data_dir=str(tmp_path / "data"), name="c")
    assert os.listdir(tmp_path / "data") == []  # no half-built dataset, no temporary folder


def tiny_encoding():
    """A byte-level BPE with a few merges, built offline (the real gpt2 files need a download)."""
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({b"th": 256, b"the": 257, b" the": 258})
    return tiktoken.Encoding(name="tiny", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 259})


def test_tiktoken_path_puts_eot_after_every_document(tmp_path):
    docs = make_corpus(tmp_path / "corpus")
    tok = get_tokenizer(tiny_encoding())
    assert tok.vocab_size == 260 and tok.eot_token == 259 and tok.name == "tiny"
    out_dir = prepare(text=str(tmp_path / "corpus"), tokenizer=tok, data_dir=str(tmp_path / "data"))
    assert out_dir == str(tmp_path / "data" / "corpus-tiny")
    meta, train, val = load(Path(out_dir))
    assert meta["tokenizer"] == "tiny" and meta["vocab_size"] == 260 and meta["eot_token"] == 259
    tokens = np.concatenate([train, val])
    assert 258 in tokens  # the merges are used
    assert tokens[-1] == 259 and len(val) == round(len(tokens) * 0.05)  # split by tokens, not documents
    ends = np.flatnonzero(tokens == 259)
    pieces = np.split(tokens, ends + 1)[:-1]
    assert [tok.decode(p[:-1]) for p in pieces] == docs  # exact: no newline added with an EOT


def test_gpt2_download_failure_is_one_clear_line(monkeypatch):
    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(SystemExit) as e:
        get_tokenizer("gpt2")
    message = str(e.value)
    assert "\n" not in message and "--tokenizer=byte" in message and "TIKTOKEN_CACHE_DIR" in message


def test_default_source_is_the_offline_stdlib(tmp_path):
    result = run("--max_tokens=200000", f"--data_dir={tmp_path / 'data'}")
    assert result.returncode == 0, result.stderr
    meta, train, val = load(tmp_path / "data" / "pystdlib")
    assert meta["source"].startswith("stdlib:") and meta["tokenizer"] == "byte"
    assert len(train) + len(val) == 200000 and len(val) > 0
    first = prepare_data.list_files(meta["source"][len("stdlib:"):], ".py", prepare_data.SKIP_DIRS)[0]
    head = Path(first).read_bytes()[:1000]
    assert np.asarray(train[:len(head)], dtype=np.uint8).tobytes() == head


def test_another_pythons_stdlib(tmp_path):
    # --stdlib_dir: the corpus of another Python (another machine's runs), its .py files but tests and site-packages
    lib = tmp_path / "python3.12"
    for path, text in {"os.py": "import sys\n", "abc.py": "class ABC: pass\n", "test/test_os.py": "skipped\n",
                       "site-packages/x.py": "skipped\n", "README.txt": "not python\n"}.items():
        (lib / path).parent.mkdir(parents=True, exist_ok=True)
        (lib / path).write_text(text * 50)
    result = run(f"--stdlib_dir={lib}", f"--data_dir={tmp_path / 'data'}", "--val_split=documents")
    assert result.returncode == 0, result.stderr
    meta, train, val = load(tmp_path / "data" / "pystdlib")
    assert meta["source"] == f"stdlib:{lib}"
    files = prepare_data.list_files(str(lib), ".py", prepare_data.SKIP_DIRS)
    assert sorted(Path(f).name for f in files) == ["abc.py", "os.py"]
    assert np.concatenate([train, val]).astype(np.uint8).tobytes() == b"".join(Path(f).read_bytes() for f in files)
    assert_clear_error(run(f"--stdlib_dir={tmp_path}", f"--data_dir={tmp_path / 'd2'}"), "no os.py")
    assert_clear_error(run(f"--stdlib_dir={lib}", f"--text={lib}", f"--data_dir={tmp_path / 'd2'}"), "--stdlib_dir")
    assert not (tmp_path / "d2").exists()


def test_help():
    result = run("-h")
    assert result.returncode == 0 and "--source" in result.stdout and "--max_tokens" in result.stdout


def test_missing_text_path_is_a_clear_error(tmp_path):
    result = run(f"--text={tmp_path / 'nope'}", f"--data_dir={tmp_path / 'data'}")
    assert_clear_error(result, "does not exist")
    assert not (tmp_path / "data").exists()


def test_unknown_source_and_tokenizer_are_clear_errors(tmp_path):
    assert_clear_error(run("--source=nope", f"--data_dir={tmp_path}"), "stdlib", "shakespeare")
    assert_clear_error(run("--tokenizer=nope", f"--data_dir={tmp_path}"), "--tokenizer=byte")


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run(f"--text={tmp_path / 'empty'}", f"--data_dir={tmp_path / 'data'}")
    assert_clear_error(result, "too small")
    assert not (tmp_path / "data").exists()


def test_unreachable_hub_is_a_clear_error(tmp_path):
    # a stand-in `datasets` that fails the way the real one does without network
    (tmp_path / "fake" / "datasets").mkdir(parents=True)
    (tmp_path / "fake" / "datasets" / "__init__.py").write_text(
        "def load_dataset(*args, **kwargs):\n"
        "    raise ConnectionError(\"Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)\")\n",
        encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake"))
    result = run("--source=c4", f"--data_dir={tmp_path / 'data'}", env=env)
    assert_clear_error(result, "unreachable", "--text")
    assert not (tmp_path / "data").exists()


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets not installed")
def test_real_datasets_offline_is_a_clear_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = run("--source=fineweb-edu", f"--data_dir={tmp_path / 'data'}", env=env)
    assert_clear_error(result, "unreachable", "--text")


def test_unreachable_shakespeare_is_a_clear_error(tmp_path):
    # a proxy on a closed local port: the download fails at once, as it does offline
    env = dict(os.environ, https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    result = run("--source=shakespeare", f"--data_dir={tmp_path / 'data'}", env=env)
    assert_clear_error(result, "could not download", "--text")

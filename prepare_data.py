"""
Prepare a token dataset for train.py:

    text -> data/<name>/train.bin, val.bin (raw np.uint16 token ids) + meta.json

python prepare_data.py                                # offline: this Python's stdlib, bytes
python prepare_data.py --source=shakespeare --tokenizer=gpt2
python prepare_data.py --source=c4 --tokenizer=gpt2 --max_tokens=50000000
python prepare_data.py --text=path/to/file_or_folder

Read the result with np.memmap(path, dtype=np.uint16, mode="r").

Documents: every file (stdlib, --text folder) or streamed record is one document. The val
split is the last val_fraction of the tokens (the document at the cut is cut in two), or with
--val_split=documents the last val_fraction of the documents (the rule before 2026-11-26, which
the README's CPU grids up to deep16 were trained on; one document is cut by tokens). gpt2
puts EOT (50256) after every document; byte has no EOT, so a document that does not end with
a newline gets one.

A dataset is built in a hidden folder beside its place (data/.<name>.building-<pid>) and moved
into place only when complete: data/<name> is always a whole dataset, and --force replaces the
old one only once the new one is done.
"""
import argparse
import json
import os
import re
import shutil
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
HUB_SOURCES = {  # source -> datasets.load_dataset(path, name), streamed
    "lm1b": ("lm1b", None),
    "c4": ("allenai/c4", "en"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
}
SOURCES = ["stdlib", "shakespeare", *HUB_SOURCES, "text"]
HUB_MAX_TOKENS = 10_000_000  # default budget for the streamed corpora
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}  # for stdlib

# -----------------------------------------------------------------------------
# tokenizers

class ByteTokenizer:
    name = "byte"
    vocab_size = 256
    eot_token = None

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids):
        return np.asarray(ids, dtype=np.uint8).tobytes()


class TiktokenTokenizer:
    def __init__(self, encoding):
        self.encoding = encoding
        self.name = encoding.name
        self.vocab_size = encoding.n_vocab
        has_eot = "<|endoftext|>" in encoding.special_tokens_set
        self.eot_token = encoding.eot_token if has_eot else None

    def encode(self, text):
        return self.encoding.encode_ordinary(text)

    def decode(self, ids):
        return self.encoding.decode([int(i) for i in ids], errors="replace")

    def decode_bytes(self, ids):
        return self.encoding.decode_bytes([int(i) for i in ids])


def get_tokenizer(name):
    """'byte', 'gpt2', or an already built tiktoken.Encoding (no download needed)."""
    if isinstance(name, (ByteTokenizer, TiktokenTokenizer)):
        return name
    if name == "byte":
        return ByteTokenizer()
    import tiktoken
    if isinstance(name, tiktoken.Encoding):
        return TiktokenTokenizer(name)
    if name != "gpt2":
        sys.exit(f"error: unknown tokenizer '{name}'; use --tokenizer=byte or --tokenizer=gpt2")
    try:
        return TiktokenTokenizer(tiktoken.get_encoding("gpt2"))
    except Exception as e:
        sys.exit(f"error: the gpt2 tokenizer files could not be downloaded ({type(e).__name__}); "
                 "use --tokenizer=byte, or run once with internet so tiktoken caches them "
                 "(TIKTOKEN_CACHE_DIR sets where)")

# -----------------------------------------------------------------------------
# sources: each yields documents (str)

def read_text(path):
    """The file's text, or None if it is binary or not utf-8."""
    data = Path(path).read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def list_files(root, suffix="", skip_dirs=()):
    """All files under root, sorted, without hidden files and without skip_dirs."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        files += [os.path.join(dirpath, f) for f in filenames
                  if f.endswith(suffix) and not f.startswith(".")]
    return sorted(files, key=lambda f: os.path.relpath(f, root))


def file_docs(paths):
    skipped = 0
    for path in paths:
        text = read_text(path)
        if text is None:
            skipped += 1
        elif text:
            yield text
    if skipped:
        print(f"skipped {skipped} binary or non-utf-8 files", file=sys.stderr)


def stdlib_root(stdlib_dir=None):
    """The stdlib's folder: this Python's, or another Python's (--stdlib_dir)."""
    return os.path.abspath(stdlib_dir) if stdlib_dir else sysconfig.get_paths()["stdlib"]


def stdlib_docs(stdlib_dir=None):
    return file_docs(list_files(stdlib_root(stdlib_dir), ".py", SKIP_DIRS))


def text_docs(path):
    if os.path.isdir(path):
        return file_docs(list_files(path))
    return file_docs([path])


def shakespeare_docs():
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            yield response.read().decode("utf-8")
    except OSError as e:
        sys.exit(f"error: could not download {SHAKESPEARE_URL} ({getattr(e, 'reason', e)}); check the "
                 "network, or use the offline default (python prepare_data.py) or --text=PATH")


def hub_docs(source):
    try:
        import datasets
    except ImportError:
        sys.exit(f"error: --source={source} needs the datasets package: pip install datasets")
    path, name = HUB_SOURCES[source]
    print(f"streaming {path} from the Hugging Face hub (HF_HUB_OFFLINE=1: use only the local cache)")
    try:
        for row in datasets.load_dataset(path, name, split="train", streaming=True):
            yield row["text"]
    except Exception as e:  # hub and network errors come in many classes
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        sys.exit(f"error: could not stream {path} from the Hugging Face hub ({reason}); "
                 "the network or hub is unreachable? use the offline default "
                 "(python prepare_data.py) or --text=PATH")


def source_docs(source, text=None, stdlib_dir=None):
    if source == "stdlib":
        return stdlib_docs(stdlib_dir)
    if source == "shakespeare":
        return shakespeare_docs()
    if source == "text":
        return text_docs(text)
    return hub_docs(source)


def describe(source, text=None, stdlib_dir=None):
    """The source as a string for meta.json; equal strings mean the same corpus."""
    if source == "stdlib":
        return f"stdlib:{stdlib_root(stdlib_dir)}"
    if source == "shakespeare":
        return f"shakespeare:{SHAKESPEARE_URL}"
    if source == "text":
        return f"text:{os.path.abspath(text)}"
    path, name = HUB_SOURCES[source]
    return f"hub:{path}" + (f"/{name}" if name else "")

# -----------------------------------------------------------------------------

def tokenize(docs, tok, max_tokens=None):
    """One uint16 array per document, stopping after max_tokens tokens in total."""
    arrays, n_tokens, last_print = [], 0, 0.0
    progress = sys.stderr.isatty()  # a progress line for people; logs and pipes get only the result
    for doc in docs:
        if tok.eot_token is None and not doc.endswith("\n"):
            doc += "\n"
        ids = tok.encode(doc)
        if tok.eot_token is not None:
            ids.append(tok.eot_token)
        if ids and max(ids) >= tok.vocab_size:
            sys.exit(f"error: the {tok.name} tokenizer made token id {max(ids)} >= its vocab_size {tok.vocab_size}")
        if max_tokens is not None:
            ids = ids[:max_tokens - n_tokens]
        arrays.append(np.array(ids, dtype=np.uint16))
        n_tokens += len(ids)
        if progress and time.time() - last_print > 0.5:
            print(f"\rtokenizing: {len(arrays):,} docs, {n_tokens:,} tokens", end="", file=sys.stderr)
            last_print = time.time()
        if max_tokens is not None and n_tokens >= max_tokens:
            break
    if progress:
        print(f"\rtokenizing: {len(arrays):,} docs, {n_tokens:,} tokens", file=sys.stderr)
    return arrays


def split(arrays, val_fraction, by="tokens"):
    """(train, val): val is the last val_fraction of the tokens (by="tokens") or of the documents
    (by="documents"; of the tokens if there is only one), at least one of them."""
    tokens = np.concatenate(arrays + [np.zeros(0, dtype=np.uint16)])
    if len(tokens) < 2:
        sys.exit(f"error: the corpus is too small to split into train and val "
                 f"({len(tokens)} tokens); give it more text")
    last = lambda n: min(max(1, round(n * val_fraction)), n - 1)  # of n items, at least 1, never all
    if by == "documents" and len(arrays) > 1:  # (every document has a token at least: its newline or EOT)
        n_val = sum(len(a) for a in arrays[-last(len(arrays)):])
    else:
        n_val = last(len(tokens))
    return tokens[:-n_val], tokens[-n_val:]


def write_atomic(path, write):
    """write(f) into a temporary file next to path, then rename it to path."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def prepare(source="stdlib", tokenizer="byte", name=None, text=None, max_tokens=None,
            val_fraction=0.05, val_split="tokens", data_dir="data", force=False, stdlib_dir=None):
    """Build data_dir/<name> unless it is already there; returns its path."""
    source, max_tokens = check_request(source, text, max_tokens, val_fraction, stdlib_dir)
    if val_split not in ("tokens", "documents"):
        sys.exit(f"error: --val_split={val_split}: use tokens or documents")
    tok = get_tokenizer(tokenizer)
    if tok.vocab_size > 65535:
        sys.exit(f"error: vocab_size {tok.vocab_size} does not fit in uint16 token files")
    name = dataset_name(name, source, text, tok, data_dir)
    out_dir = os.path.join(data_dir, name)
    settings = dict(tokenizer=tok.name, source=describe(source, text, stdlib_dir), max_tokens=max_tokens,
                    val_fraction=val_fraction, val_split=val_split)
    for folder in (data_dir, out_dir):
        if os.path.exists(folder) and not os.path.isdir(folder):
            sys.exit(f"error: {folder} is a file; give another --name or --data_dir")
    if already_prepared(out_dir, settings, force):
        return out_dir
    print(f"preparing {out_dir} from {settings['source']} with the {tok.name} tokenizer")
    train, val = split(tokenize(source_docs(source, text, stdlib_dir), tok, max_tokens), val_fraction, val_split)
    meta = dict(tokenizer=tok.name, vocab_size=tok.vocab_size, train_tokens=len(train),
                val_tokens=len(val), eot_token=tok.eot_token) | settings
    write_dataset(train, val, meta, data_dir, name)
    print(f"wrote {out_dir}: {len(train):,} train + {len(val):,} val tokens")
    return out_dir


def check_request(source, text, max_tokens, val_fraction, stdlib_dir=None):
    """The source and the flags, checked before anything is read; -> (source, max_tokens)."""
    if stdlib_dir is not None:
        if text is not None or source != "stdlib":
            sys.exit("error: --stdlib_dir is for the stdlib source; drop it, or drop --text/--source")
        if not os.path.isfile(os.path.join(stdlib_dir, "os.py")):
            sys.exit(f"error: --stdlib_dir={stdlib_dir} is no Python standard library (no os.py in it); "
                     "give a folder like /usr/lib/python3.12")
    if text is not None:
        if source not in ("stdlib", "text"):
            sys.exit(f"error: --text and --source={source} exclude each other; drop one")
        source = "text"
    if source not in SOURCES:
        sys.exit(f"error: unknown source '{source}'; use one of {', '.join(SOURCES)} (or --text=PATH)")
    if source == "text" and text is None:
        sys.exit("error: --source=text needs --text=PATH (a file or a folder)")
    if source == "text" and not os.path.exists(text):
        sys.exit(f"error: --text={text} does not exist; give an existing file or folder")
    if not 0 < val_fraction < 1:
        sys.exit(f"error: --val_fraction={val_fraction} must be between 0 and 1")
    if max_tokens is None and source in HUB_SOURCES:
        max_tokens = HUB_MAX_TOKENS
    if max_tokens is not None and max_tokens < 2:
        sys.exit(f"error: --max_tokens={max_tokens} is too small")
    return source, max_tokens


def dataset_name(name, source, text, tok, data_dir):
    """--name, or one made from the source (and the tokenizer, unless bytes): pystdlib, shakespeare-gpt2, ..."""
    if name is None:
        name = Path(text).resolve().stem if source == "text" else {"stdlib": "pystdlib"}.get(source, source)
        name += "" if tok.name == "byte" else f"-{tok.name}"
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        sys.exit(f"error: --name={name!r} must be a folder name (no /, \\ or leading .): the dataset "
                 f"goes inside --data_dir={data_dir}")
    return name


def already_prepared(out_dir, settings, force):
    """True if out_dir holds this very dataset; an error if it holds another (unless --force)."""
    if force or not os.path.exists(os.path.join(out_dir, "meta.json")):
        return False
    try:
        meta = read_meta(out_dir)
    except ValueError as e:
        sys.exit(f"error: {e}; rebuild it with --force")
    if all(meta.get(k) == v for k, v in settings.items()):
        print(f"{out_dir} already prepared ({meta['train_tokens']:,} train tokens); use --force to rebuild")
        return True
    sys.exit(f"error: {out_dir} holds another dataset ({meta.get('source')}, {meta.get('tokenizer')}, "
             f"val_split={meta['val_split']}, val_fraction={meta.get('val_fraction')}); give its flags to use it, "
             f"--force to rebuild it, or --name=NEW")


def write_dataset(train, val, meta, data_dir, name):
    """train.bin, val.bin and meta.json, written in a private folder and swapped in whole."""
    remove_stale_builds(data_dir, name)
    build = os.path.join(data_dir, f".{name}.building-{os.getpid()}")
    try:
        os.makedirs(build)
        write_atomic(os.path.join(build, "train.bin"), train.tofile)
        write_atomic(os.path.join(build, "val.bin"), val.tofile)
        write_atomic(os.path.join(build, "meta.json"),
                     lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode("utf-8")))
        swap_in(build, os.path.join(data_dir, name))
    finally:
        if os.path.exists(build):
            shutil.rmtree(build)


def swap_in(build, out_dir):
    """Move a finished build to out_dir. An old dataset there is moved aside first and removed
    only once the new one is in place."""
    old = build + ".old"
    if os.path.lexists(out_dir):
        os.rename(out_dir, old)
    try:
        os.rename(build, out_dir)
    except OSError:
        if os.path.lexists(old):
            os.rename(old, out_dir)
        raise
    if os.path.islink(old):
        os.remove(old)
    elif os.path.lexists(old):
        shutil.rmtree(old)


def remove_stale_builds(data_dir, name):
    """Clean up after a killed build (its pid is gone): its half-written folder goes; an old
    dataset it had moved aside goes back in place if nothing replaced it."""
    if not os.path.isdir(data_dir):
        return
    for entry in sorted(os.listdir(data_dir)):
        m = re.fullmatch(rf"\.{re.escape(name)}\.building-(\d+)(\.old)?", entry)
        if not m or pid_alive(int(m.group(1))):
            continue
        path, out_dir = os.path.join(data_dir, entry), os.path.join(data_dir, name)
        if m.group(2) and not os.path.lexists(out_dir):
            os.rename(path, out_dir)
        else:
            shutil.rmtree(path, ignore_errors=True)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


# -----------------------------------------------------------------------------
# reading a prepared dataset back (train.py checks what it opens with these)

def read_meta(folder):
    """meta.json of a prepared dataset; ValueError (one line) if it cannot be used."""
    path = os.path.join(folder, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({str(e).splitlines()[0]})")
    except OSError as e:
        raise ValueError(f"cannot read {path} ({e.strerror})")
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds no key/value pairs")
    vocab = meta.get("vocab_size")
    if not isinstance(meta.get("tokenizer"), str) or isinstance(vocab, bool) or not isinstance(vocab, int) \
            or not 1 <= vocab <= 65536:
        raise ValueError(f"{path} needs a tokenizer name and an integer vocab_size in 1..65536, has "
                         f"tokenizer={meta.get('tokenizer')!r} vocab_size={vocab!r}")
    meta.setdefault("val_split", "documents")  # data made before meta.json recorded its split
    return meta


def check_tokens(path, vocab_size, chunk=1 << 16, max_chunks=256):
    """ValueError (one line) unless path is a file of uint16 token ids < vocab_size. A big file is
    checked in max_chunks chunks spread over it, a small one whole."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ValueError(f"cannot read {path} ({e.strerror})")
    if size == 0 or size % 2:
        raise ValueError(f"{path} has {size} bytes: {'empty' if size == 0 else 'not a whole number of uint16 tokens'}")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    starts = range(0, len(data), chunk)
    if len(starts) > max_chunks:
        starts = np.linspace(0, len(data) - chunk, max_chunks).astype(np.int64)
    for start in starts:
        top = int(data[start:start + chunk].max())
        if top >= vocab_size:
            raise ValueError(f"{path} holds token id {top} (near token {start:,}) >= vocab_size {vocab_size}")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of the whole usage
        sys.exit(f"error: {message} (python prepare_data.py -h lists the flags)")


def main(argv=None):
    parser = ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="stdlib",
                        help=f"one of: {', '.join(SOURCES)} (default: stdlib, offline)")
    parser.add_argument("--tokenizer", default="byte", help="byte (vocab 256, offline) or gpt2 (tiktoken)")
    parser.add_argument("--name", default=None,
                        help="dataset name under data_dir (default: from the source and tokenizer)")
    parser.add_argument("--text", default=None,
                        help="a local text file (one document) or folder (every text file in it)")
    parser.add_argument("--stdlib_dir", default=None,
                        help="with the stdlib source: another Python's standard library folder, e.g. "
                             "/usr/lib/python3.12 (default: this Python's; the corpus differs between versions)")
    parser.add_argument("--max_tokens", type=int, default=None,
                        help=f"token budget (default: all; {HUB_MAX_TOKENS:,} for {', '.join(HUB_SOURCES)})")
    parser.add_argument("--val_fraction", type=float, default=0.05,
                        help="fraction of the tokens held out for val, at the end (default: 0.05)")
    parser.add_argument("--val_split", default="tokens", choices=("tokens", "documents"),
                        help="cut val off by tokens (default) or by whole documents (the rule before 2026-11-26)")
    parser.add_argument("--data_dir", default="data", help="the folder of the datasets (default: data)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if already prepared (the old dataset stays until the new one is done)")
    args = parser.parse_args(argv)
    try:
        prepare(**vars(args))
    except OSError as e:  # a full disk, no permission: nothing was changed
        sys.exit(f"error: could not write {e.filename or args.data_dir} ({e.strerror or e}); nothing was changed")
    except KeyboardInterrupt:
        print("interrupted; nothing was changed", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

"""
Sample from a trained checkpoint of any model, with a KV cache; each sample streams to stdout
as it is generated.

    python sample.py --start="def " --num_samples=3 --max_new_tokens=200     # out-gpt/ckpt.pt
    python sample.py --out_dir=out-dca --start=FILE:prompt.txt --temperature=0.8 --top_k=50
"""

import codecs
import math
import os
import sys

import torch

import gpt
from prepare_data import get_tokenizer
from train import ArgumentParser, UserError, run_cli, load_checkpoint, resolve_device


def read_prompt(start):
    """--start's text: itself, or FILE:path's contents (utf-8)."""
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"--start={start}: no such file")
    except UnicodeDecodeError as e:
        raise UserError(f"--start={start}: not utf-8 text (byte {e.start}); save the prompt as utf-8")
    except OSError as e:
        raise UserError(f"--start={start}: cannot read it ({e.strerror})")


def parse_args(argv):
    parser = ArgumentParser(prog="sample.py", description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out_dir", default="out-gpt",
                        help="the folder with ckpt.pt (default: out-gpt; train.py's for --model=X is out-X)")
    parser.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from (default: a newline)")
    parser.add_argument("--num_samples", type=int, default=3, help="samples, one after another (default: 3)")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="tokens per sample (default: 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help=">= 0; 0 = greedy (default: 0.8)")
    parser.add_argument("--top_k", type=int, default=200, help="keep the k likeliest tokens; 0 = all (default: 200)")
    parser.add_argument("--seed", type=int, default=1337, help="(default: 1337)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps (default: cpu)")
    parser.add_argument("--no_cache", action="store_true", help="recompute the whole context every token")
    args = parser.parse_args(argv)
    for key in ("num_samples", "max_new_tokens"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key}={getattr(args, key)} must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature={args.temperature} must be >= 0 (0 = greedy)")
    if args.top_k < 0:
        raise UserError(f"--top_k={args.top_k} must be >= 0 (0 = no top-k filtering)")
    return args


def load_model(out_dir, device):
    """out_dir/ckpt.pt -> (the model on device, in eval mode, its checkpoint, its tokenizer)."""
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(ckpt_path):
        raise UserError(f"{ckpt_path} not found; train first (python train.py --out_dir={out_dir})")
    checkpoint = load_checkpoint(ckpt_path)
    try:
        model = gpt.build_model(gpt.config_from_dict(checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    except (ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"{ckpt_path} does not fit its own model config: {str(e).splitlines()[0][:200]}")
    return model.to(device).eval(), checkpoint, get_tokenizer(checkpoint["meta"]["tokenizer"])


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    start = read_prompt(args.start)
    model, checkpoint, tokenizer = load_model(args.out_dir, device)
    ids = tokenizer.encode(start)
    if not ids:
        raise UserError("--start is empty after tokenization; give some text")
    block_size = model.config.block_size
    if len(ids) > block_size:
        print(f"note: the prompt is {len(ids)} tokens, longer than the model's context (block_size={block_size}); "
              f"it sees only the last {block_size}", file=sys.stderr)
    if not args.no_cache:  # what decoding keeps per token: the number SVFormer (and MLA-like ideas) shrink
        kv = gpt.kv_cache_bytes_per_token(model, block_size)
        print(f"{checkpoint['model_config'].get('model', 'gpt')}: KV cache {kv / 1024:.2f} KiB per token "
              f"({next(model.parameters()).dtype}), {kv * block_size / 2**20:.2f} MiB at the full context "
              f"of {block_size} tokens", file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for _ in range(args.num_samples):
        x = torch.tensor([ids], dtype=torch.long, device=device)
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
        sys.stdout.write(start)
        for token in model.generate_tokens(x, args.max_new_tokens, args.temperature, args.top_k or None,
                            use_cache=not args.no_cache, generator=generator):
            sys.stdout.write(text.decode(tokenizer.decode_bytes(token[0].tolist())))
            sys.stdout.flush()
        print(text.decode(b"", final=True))
        print("-" * 40, flush=True)


if __name__ == "__main__":
    run_cli(main)

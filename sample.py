"""
Sample from a trained checkpoint of any model, with a KV cache.

    python sample.py --out_dir=out --start="def " --num_samples=3 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt --temperature=0.8 --top_k=50
"""

import argparse
import os
import sys

import torch

import gpt
from prepare_data import get_tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out_dir", default="out", help="folder with ckpt.pt")
    parser.add_argument("--start", default="\n", help='prompt text, or FILE:path to read it from a file')
    parser.add_argument("--num_samples", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=200, help="0 = no top-k filtering")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps")
    parser.add_argument("--no_cache", action="store_true", help="recompute the whole context every token")
    args = parser.parse_args(argv)

    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if not os.path.exists(ckpt_path):
        sys.exit(f"error: {ckpt_path} not found; train first (python train.py --out_dir={args.out_dir})")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model = gpt.build_model(gpt.config_from_dict(checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    model.to(args.device).eval()
    tokenizer = get_tokenizer(checkpoint["meta"]["tokenizer"])

    start = args.start
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        if not os.path.exists(path):
            sys.exit(f"error: --start={start}: no such file")
        with open(path, encoding="utf-8") as f:
            start = f.read()
    ids = tokenizer.encode(start)
    if not ids:
        sys.exit("error: --start is empty after tokenization; give some text")
    ids = ids[-model.config.block_size:]
    x = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    y = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                       use_cache=not args.no_cache, generator=generator)
    for i in range(args.num_samples):
        print(tokenizer.decode(y[i].tolist()))
        print("-" * 40)


if __name__ == "__main__":
    main()

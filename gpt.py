"""
The shared tiny GPT: a Llama-style "Transformer++" (RMSNorm pre-norm, RoPE, SwiGLU, no
biases, tied embeddings), which is also the baseline model "gpt".

The variant files (dca.py, dcmha.py, resformer.py) import this file and replace only what
their paper changes. The seams they use:
  - CausalSelfAttention.values()   how V is formed               (ResFormer / SVFormer)
  - CausalSelfAttention.cache_kv() what goes into the KV cache   (SVFormer, DCMHA)
  - CausalSelfAttention.attend()   scores -> weights -> output   (DCMHA)
  - GPT.make_block()               which block each layer is     (all)
  - GPT.residual_stream()          how blocks are wired          (DCA)
Every forward pass carries one Context: RoPE tables, the KV cache (when decoding) and any
cross-layer state a variant needs (e.g. ResFormer's first-layer values).
"""

import math
from dataclasses import dataclass, fields, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    model: str = "gpt"
    block_size: int = 256        # the longest sequence the model sees
    vocab_size: int = 256        # the tokenizer's; the embedding is padded to a multiple of 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp: str = "swiglu"          # "swiglu" (hidden ~8/3 d) or "gelu" (hidden 4 d, the DCA paper's)
    tie_embeddings: bool = True  # lm_head shares the token embedding's weight
    qk_norm: bool = False        # per-head RMSNorm on q and k before RoPE
    rope_theta: float = 10000.0

    @property
    def padded_vocab_size(self):
        return (self.vocab_size + 63) // 64 * 64

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def validate(self):
        """Raise ValueError with a one-line message for a config that cannot be built."""
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"head dim n_embd/n_head={self.head_dim} must be even for RoPE")
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"mlp={self.mlp!r}: choose 'swiglu' or 'gelu'")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


# -----------------------------------------------------------------------------
# the pieces

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # the weight in x's dtype, as autocast casts a linear's (else no fused kernel)
        return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype), self.eps)


def rope_tables(head_dim, max_len, theta, device=None):
    """cos, sin of shape (max_len, head_dim/2) for rotary position embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (B, T, nh, hd); cos, sin: (T, hd/2). Rotates the two halves of each head."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def causal_mask(T, S, start, window=None, device=None):
    """Boolean (T, S) mask, True where query t (at position start+t) may see key s.
    With a window w, a query sees the w most recent keys, itself included."""
    q_pos = torch.arange(start, start + T, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask = mask & (k_pos > q_pos - window)
    return mask


class KVCache:
    """Per-layer tensors kept between decoding steps. Each layer's entry is a dict of named
    tensors with the sequence on dim 2 (B, nh, S, hd); a variant caches whatever it needs."""

    def __init__(self, n_layer):
        self.layers = [{} for _ in range(n_layer)]
        self.pos = 0  # tokens already in the cache

    def append(self, layer, name, x, dim=2):
        """Append x along the sequence dim and return everything cached so far."""
        store = self.layers[layer]
        store[name] = x if name not in store else torch.cat([store[name], x], dim=dim)
        return store[name]

    def nbytes(self):
        return sum(t.numel() * t.element_size() for d in self.layers for t in d.values())


@torch.no_grad()
def kv_cache_bytes_per_token(model, context):
    """Bytes the model's KV cache holds per token, measured: a real KVCache after the model has
    read `context` tokens (one sequence; at most block_size), divided by the tokens. It counts
    whatever a variant caches (SVFormer's single V for all layers, DCMHA's key-wise factors), in
    the dtype of the model's parameters (float32 here; half that in bf16)."""
    context = max(1, min(context, model.config.block_size))
    device = next(model.parameters()).device
    cache = KVCache(model.config.n_layer)
    model(torch.zeros(1, context, dtype=torch.long, device=device), cache=cache)
    return cache.nbytes() / context


class Context:
    """What one forward pass shares across layers. Variants may add attributes."""

    def __init__(self, cos, sin, cache=None, start=0):
        self.cos, self.sin = cos, sin  # (T, hd/2), already offset to the current positions
        self.cache = cache             # KVCache when decoding, else None
        self.start = start             # position of the first token of this pass


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = config.n_head, config.head_dim
        d = config.n_embd
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, d, bias=False)
        self.c_v = nn.Linear(d, d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if config.qk_norm else None
        self.window = None  # local attention window (keys), None = global

    def forward(self, x, ctx, k_in=None, v_in=None):
        """x: (B, T, d) normed input; DCA feeds keys and values from other inputs."""
        B, T, _ = x.shape
        k_in = x if k_in is None else k_in
        v_in = x if v_in is None else v_in
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(k_in).view(B, T, self.n_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        v = self.values(v_in, ctx)                                  # (B, T, nh, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
        if ctx.cache is not None:
            k, v = self.cache_kv(k, v, ctx)                          # (B, nh, S, hd)
        y = self.attend(q, k, v, x, ctx)                             # (B, nh, T, hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))

    def values(self, v_in, ctx):
        B, T, _ = v_in.shape
        return self.c_v(v_in).view(B, T, self.n_head, self.head_dim)

    def cache_kv(self, k, v, ctx):
        return ctx.cache.append(self.layer_idx, "k", k), ctx.cache.append(self.layer_idx, "v", v)

    def attend(self, q, k, v, x, ctx):
        T, S = q.size(2), k.size(2)
        if self.window is None and T == S:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.window is None and T == 1:  # one new token sees the whole cache
            return F.scaled_dot_product_attention(q, k, v)
        mask = causal_mask(T, S, S - T, self.window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MLP(nn.Module):
    def __init__(self, config, hidden=None):
        super().__init__()
        d = config.n_embd
        self.swiglu = config.mlp == "swiglu"
        if hidden is None:  # a variant may give its own width (MUDDFormer's re-allocation)
            hidden = MLP.default_hidden(config)
        self.c_fc = nn.Linear(d, 2 * hidden if self.swiglu else hidden, bias=False)
        self.c_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.c_proj(h)

    @staticmethod
    def default_hidden(config):
        """SwiGLU: ~8/3 d rounded up to a multiple of 64 (as many weights as 4 d with GELU)."""
        d = config.n_embd
        return (8 * d // 3 + 63) // 64 * 64 if config.mlp == "swiglu" else 4 * d


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config, layer_idx, attn_class=CausalSelfAttention):
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd)
        self.attn = attn_class(config, layer_idx)
        self.norm_2 = RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, ctx):
        x = x + self.attn(self.norm_1(x), ctx)
        return x + self.mlp(self.norm_2(x))


# -----------------------------------------------------------------------------
# the model

class GPT(nn.Module):
    config_class = GPTConfig

    def __init__(self, config):
        super().__init__()
        config.validate()
        self.config = config
        self.tok_emb = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([self.make_block(config, i) for i in range(config.n_layer)])
        self.norm_f = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # nanoGPT init: N(0, 0.02), residual output projections scaled by 1/sqrt(2L)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def make_block(self, config, layer_idx):
        return Block(config, layer_idx)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token, forward + backward (= 3 x the forward), counted the usual
        way (PaLM's appendix B, nanoGPT's estimate_mfu): 2 per weight of every matmul (the
        lm_head too; the embedding is a lookup), plus attention's Q Kᵀ and A V over all T keys,
        2·2·T·d per layer (the causal half is not subtracted, by convention), plus what a
        variant adds (extra_flops_per_token). Norms and activations are not counted."""
        T = seq_len or self.config.block_size
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        attention = 4 * self.config.n_layer * self.config.n_embd * T
        return 3 * (2 * matmul_weights + attention + self.extra_flops_per_token(T))

    def extra_flops_per_token(self, seq_len):
        """A variant's forward FLOPs per token beyond its nn.Linear matmuls and the attention
        scores: its own weights that are not nn.Linear, its mixing and composing."""
        return 0

    def residual_stream(self, x, ctx):
        """(B, T, d) embeddings -> (B, T, d) last hidden state, before the final norm."""
        for block in self.blocks:
            x = block(x, ctx)
        return x

    def forward(self, idx, targets=None, cache=None):
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens > block_size={self.config.block_size}")
        ctx = Context(self.rope_cos[start:start + T], self.rope_sin[start:start + T], cache, start)
        x = self.residual_stream(self.tok_emb(idx), ctx)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.norm_f(x))[..., :self.config.vocab_size]  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None):
        """Sample max_new_tokens after idx (B, T); returns idx with them appended."""
        new = list(self.generate_tokens(idx, max_new_tokens, temperature, top_k, use_cache, generator))
        return torch.cat([idx, *new], dim=1)

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None):
        """Yield each new (B, 1) token as soon as it is sampled (sample.py streams them). With
        use_cache, a KVCache makes each step cost one token; when the context would pass
        block_size, the cache is rebuilt from the last block_size/2 tokens (without the cache,
        the context is cropped each step)."""
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -self.config.block_size:])
            elif cache is None or cache.pos == self.config.block_size:
                context = self.config.block_size if cache is None else self.config.block_size // 2
                cache = KVCache(self.config.n_layer)
                logits, _ = self(idx[:, -context:], cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            logits = logits[:, -1, :].float()
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next

    def no_decay_param_names(self):
        """Names of >=2-D parameters that still get no weight decay. Variants extend this."""
        return set()

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type=None):
        """AdamW; weight decay only on >=2-D matmul weights and embeddings, never on norms,
        gains, biases or scalars (nor on what a variant lists in no_decay_param_names)."""
        skip = self.no_decay_param_names()
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        decay = [p for n, p in params.items() if p.dim() >= 2 and n not in skip]
        no_decay = [p for n, p in params.items() if p.dim() < 2 or n in skip]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


# -----------------------------------------------------------------------------
# the registry: name -> (config class, model class). Variant files add themselves on import.

MODELS = {"gpt": (GPTConfig, GPT)}
VARIANT_MODULES = ["resformer", "dcmha", "dca", "muddformer", "attnres"]


def all_models():
    """Import every variant file so that it registers, and return the registry."""
    import importlib
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    for name in VARIANT_MODULES:
        if os.path.exists(os.path.join(here, name + ".py")):
            importlib.import_module(name)
    return MODELS


def config_from_dict(d):
    """Build the right config dataclass from a plain dict (as stored in checkpoints)."""
    models = all_models()
    if d.get("model") not in models:
        raise ValueError(f"unknown model {d.get('model')!r}; known: {', '.join(models)}")
    config_class = models[d["model"]][0]
    known = {f.name for f in fields(config_class)}
    return config_class(**{k: v for k, v in d.items() if k in known})


def build_model(config):
    return all_models()[config.model][1](config)


def config_to_dict(config):
    return asdict(config)

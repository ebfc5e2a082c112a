"""
DCMHA: Dynamically Composable Multi-Head Attention, the attention of DCFormer.
Da Xiao, Qingye Meng, Shengping Li, Xingyuan Yuan, "Improving Transformers with Dynamically
Composable Multi-Head Attention", ICML 2024, arXiv 2405.08553.

In multi-head attention each head's attention matrix is computed and used alone. DCMHA lets
the heads share: at every (query t, key s) the vector a_ts of the N heads' scores is
multiplied by an N x N matrix that depends on the query token and on the key token,

    Compose(A)[:, t, s] = a_ts · W_ts,
    W_ts = I + qw1_tᵀ qw2_t + diag(qdd_t) + kw1_sᵀ kw2_s + diag(kdd_s)   (+ W_b, static),

once on the logits before the softmax ("pre") and once on the probabilities after it
("post"). The low-rank factors w1, w2 (R x N) and the gates dd (N) are computed from the
block's normed input x by a small GELU network, separately for the four sets {pre, post} x
{query-wise, key-wise}. Their initialisation is tiny, so DCMHA starts as plain MHA.

W_ts is never built per (t, s): it is I, plus a query part Q_t = qw1_tᵀ qw2_t + diag(qdd_t)
(+ W_b), plus a key part K_s = kw1_sᵀ kw2_s + diag(kdd_s); each part is applied to the
scores with one batched N x N matmul per token, and the identity as a plain sum
(dc_compose="matrix"). dc_compose="factors" never forms Q_t or K_s either: the factorised form,
contractions over the heads written as broadcast products and sums, which torch.compile fuses
into a few passes over the scores (on the GPU the matmuls, with an inner dimension of N, run
as tiny tensor-core tiles). dc_compose="folded" moves the contractions over the heads into the
attention's own matmuls: the low-rank terms become R extra "heads" of width D = N·hd in q·kᵀ
and in probs @ v (fold_pre_compose, fold_post_compose), the rest is elementwise.
dc_compose="kernel" computes compose, mask, softmax and compose as one custom op (dcmha_kernels.py):
on CUDA Triton kernels that mix the heads in registers and write only the composed probabilities;
elsewhere the factorised form. All four are the same function. Flash attention's kernels cannot be
used (each head's scores are mixed with the others'); queries are processed in chunks, so the
transient (B, chunk, N, S) score tensors bound the memory, and no chunk computes scores for keys
that its queries cannot see.

Options (the paper's ablations are config values):
  dc_pre, dc_post              compose the logits / the probabilities
  dc_query_wise, dc_key_wise   the dynamic weights read at the query / at the key
  dc_static                    a learned static head-mixing matrix W_b (residual form)
  dc_rank, dc_hidden(_mult)    R, and C (the hidden width of the weight network, 4N)
  dc_compose                   how Compose is computed: matrix, factors, folded or kernel (same result)
  dc_float32_scores            the attention's scores, both Composes, the softmax and probs @ v
                               in float32 even under bf16 autocast (default). In bf16, as the
                               authors' JAX code runs them, DCMHA's loss blew up mid-run on an
                               H200 and an H100 (1.9 -> 3.2 at step ~150) where the all-float32
                               twin trained (results/gpu/h100-2026-11-26); off = the authors' way
  window, window_pattern       DCFormer++'s alternation of local (sliding window) and
                               global layers; qk_norm (on by default, as in DCFormer++)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt


@dataclass
class DCMHAConfig(gpt.GPTConfig):
    model: str = "dcmha"
    qk_norm: bool = True          # DCFormer++ uses QK-norm
    dc_pre: bool = True           # compose the logits before the softmax
    dc_post: bool = True          # compose the probabilities after it
    dc_query_wise: bool = True    # dynamic weights computed at the query
    dc_key_wise: bool = True      # dynamic weights computed at the key
    dc_static: bool = False       # + a static N x N W_b (paper: lower loss, slower)
    dc_rank: int = 2              # R, rank of each dynamic projection
    dc_hidden_mult: int = 4       # C = dc_hidden_mult * n_head ...
    dc_hidden: int = 0            # ... unless C is given here (> 0)
    dc_compose: str = "matrix"    # matrix: Q_t, K_s as N x N matmuls | factors: the factorised form | folded | kernel
    dc_float32_scores: bool = True  # under bf16 autocast, keep the attention (logits to @ v) in float32
    query_chunk: int = 128        # queries per chunk of the attention (0 = all at once)
    window: int = 0               # keys a local layer sees, itself included (0 = all global)
    window_pattern: str = "LG"    # local (L) / global (G) layers, repeated over the depth

    @property
    def dc_hidden_dim(self):
        return self.dc_hidden or self.dc_hidden_mult * self.n_head

    def validate(self):
        super().validate()
        if not (self.dc_pre or self.dc_post):
            raise ValueError("dc_pre and dc_post are both off: nothing left to compose")
        if not (self.dc_query_wise or self.dc_key_wise or self.dc_static):
            raise ValueError("dc_query_wise, dc_key_wise and dc_static are all off: nothing to compose with")
        if self.dc_compose not in ("matrix", "factors", "folded", "kernel"):
            raise ValueError(f"dc_compose={self.dc_compose!r}: choose matrix, factors, folded or kernel")
        if self.dc_compose == "kernel" and self.dc_static:
            raise ValueError("dc_compose=kernel has no static W_b (dc_static): use dc_compose=matrix, or dc_static=false")
        for name in ("dc_rank", "dc_hidden_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("dc_hidden", "query_chunk", "window"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not self.window_pattern or set(self.window_pattern) - set("LG"):
            raise ValueError(f"window_pattern={self.window_pattern!r} must be a non-empty string of L and G")


def compose(a, query_mix, key_mix):
    """The paper's Compose (Fig. 2): out[b, t, :, s] = a[b, t, :, s] · W_ts, W_ts = I + Q_t + K_s.
    a (B, T, N, S): the scores of a query t are one N x S matrix, so a_ts · Q_t for every s is
    one matmul; a_ts · K_s for every t is one matmul on the scores laid out by key.
    query_mix Q (B, T, N, N) or None (= 0), key_mix K (B, S, N, N) or None (= 0).
    The identity is never inside a matmul: a + a·Q, not a·(I + Q). Under bf16 autocast a matmul
    rounds its operands to 8 bits of mantissa, where 1 + q == 1 for every |q| < 1/256, and the
    dynamic weights start far smaller (~1e-3)."""
    out = a if query_mix is None else a + query_mix.mT @ a                          # (B, T, N, S)
    if key_mix is not None:
        by_key = a.permute(0, 3, 1, 2).contiguous()                                 # (B, S, T, N), a copy
        out = out + (by_key @ key_mix).permute(0, 2, 3, 1)                          # (B, T, N, S)
    return out


def compose_factors(a, query_factors, key_factors, static):
    """The same Compose in the factorised form, with no N x N matrix per token:
        out[m] = a[m]·(1 + qdd[m] + kdd[m]) + Σ_i qw2[i, m] Σ_n a[n] qw1[i, n]
                                            + Σ_i kw2[i, m] Σ_n a[n] kw1[i, n]  (+ Σ_n a[n] W_b[n, m])
    a (B, T, N, S); query_factors (B, T, 2R+1, N) = [qw1; qw2; qdd] or None; key_factors
    (B, S, 2R+1, N) or None; static W_b (N, N) or None. The sums over the heads (n) and the rank
    (i) are broadcast products summed over one dim: torch.compile fuses each into one pass."""
    out = a if static is None else a + static.mT @ a                                 # (B, T, N, S)
    for factors, at_key in ((query_factors, False), (key_factors, True)):
        if factors is None:
            continue
        R = factors.size(-2) // 2
        f = factors.permute(0, 2, 3, 1)[:, None] if at_key else factors[..., None]  # (B, 1|T, 2R+1, N, S|1)
        w1, w2, dd = f[:, :, :R], f[:, :, R:2 * R], f[:, :, 2 * R]
        h = (a[:, :, None] * w1).sum(3, keepdim=True)                               # (B, T, R, 1, S)
        out = out + (h * w2).sum(2) + a * dd                                        # (B, T, N, S)
    return out


def split_factors(factors):
    """(..., 2R+1, N) -> w1 (..., R, N), w2 (..., R, N), dd (..., N)."""
    R = factors.size(-2) // 2
    return factors[..., :R, :], factors[..., R:2 * R, :], factors[..., 2 * R, :]


def fold_pre_compose(logits, q, k, query_factors, key_factors, static):
    """Compose of the logits, folded into the q·kᵀ matmul: no N x N matmul, no contraction over
    the heads of a (B, N, T, S) tensor. The query part's low-rank term contracts the heads' logits,
        Σ_n qw1[i, n](t) · q_n(t)·k_n(s) = q̃_i(t)·k(s),   q̃_i(t) = [qw1[i, n](t) q_n(t)]_n   (a D-vector),
    so it is R more "heads" of width D = N·hd, one big matmul; the key part likewise with
    k̃_i(s) = [kw1[i, n](s) k_n(s)]_n; what is left is elementwise:
        out[m] = logits[m] (1 + qdd[m](t) + kdd[m](s)) + Σ_i qw2[i, m](t) h_i + Σ_i kw2[i, m](s) h'_i.
    logits (B, N, T, S), q (B, N, T, hd), k (B, N, S, hd); factors and W_b as compose_factors'."""
    B, N, T, S = logits.shape
    out = logits if static is None else logits + torch.einsum("nm,bnts->bmts", static, logits)
    q_heads, k_heads = q.transpose(1, 2), k.transpose(1, 2)                         # (B, T|S, N, hd)
    if query_factors is not None:
        w1, w2, dd = split_factors(query_factors)                                   # (B, T, R, N), ..., (B, T, N)
        q_tilde = (w1[..., None] * q_heads[:, :, None]).flatten(-2)                # (B, T, R, D)
        h = (q_tilde.flatten(1, 2) @ k_heads.flatten(-2).mT).view(B, T, -1, S)     # (B, T, R, S)
        out = out + logits * dd.mT[..., None]
        for i in range(h.size(2)):
            out = out + w2[:, :, i].mT[..., None] * h[:, None, :, i]                # (B, N, T, S)
    if key_factors is not None:
        w1, w2, dd = split_factors(key_factors)                                     # (B, S, R, N), ..., (B, S, N)
        k_tilde = (w1[..., None] * k_heads[:, :, None]).flatten(-2)                # (B, S, R, D)
        h = (q_heads.flatten(-2) @ k_tilde.flatten(1, 2).mT).view(B, T, S, -1)     # (B, T, S, R)
        out = out + logits * dd.mT[:, :, None]
        for i in range(h.size(3)):
            out = out + w2[:, :, i].mT[:, :, None] * h[:, None, :, :, i]            # (B, N, T, S)
    return out


def fold_post_compose(probs, v, query_factors, key_factors, static):
    """Compose of the probabilities, then @ v, folded into matmuls of width D:
        Σ_s Compose(P)[m](t, s) v_m(s) = (1 + qdd[m](t)) (P_m @ v_m) + P_m @ (kdd[m] ⊙ v_m)
            + Σ_i qw2[i, m](t) (g_i @ v)_m + Σ_i (g'_i @ (kw2[i, m] ⊙ v_m))_m,
    with g_i(t, s) = Σ_n qw1[i, n](t) P_n(t, s) and g'_i(t, s) = Σ_n kw1[i, n](s) P_n(t, s): the
    heads' probabilities contracted to R maps each, which meet v in one (T x S) @ (S x D) matmul.
    probs (B, N, T, S), v (B, N, S, hd) -> (B, N, T, hd); factors and W_b as compose_factors'."""
    B, N, T, S = probs.shape
    attended = probs @ v                                                            # (B, N, T, hd)
    out = attended
    if static is not None:
        out = out + torch.einsum("nm,bnts->bmts", static, probs) @ v
    v_heads = v.transpose(1, 2)                                                     # (B, S, N, hd)
    if query_factors is not None:
        w1, w2, dd = split_factors(query_factors)                                   # (B, T, R, N)
        g = sum(w1[:, :, :, n].mT[..., None] * probs[:, None, n] for n in range(N))  # (B, R, T, S)
        gv = (g @ v_heads.flatten(-2)[:, None]).view(B, -1, T, N, v.size(-1))      # (B, R, T, N, hd)
        out = out + attended * dd.mT[..., None] + (w2.permute(0, 2, 3, 1)[..., None] * gv.transpose(2, 3)).sum(1)
    if key_factors is not None:
        w1, w2, dd = split_factors(key_factors)                                     # (B, S, R, N)
        out = out + probs @ (v * dd.mT[..., None])
        g = sum(w1[:, :, :, n].mT[:, :, None] * probs[:, None, n] for n in range(N))  # (B, R, T, S)
        v_scaled = (w2[..., None] * v_heads[:, :, None]).transpose(1, 2)            # (B, R, S, N, hd)
        gv = (g @ v_scaled.flatten(-2)).sum(1).view(B, T, N, v.size(-1))            # (B, T, N, hd)
        out = out + gv.transpose(1, 2)
    return out


def mixing_matrix(factors):
    """factors (..., 2R+1, N) = [w1 (R rows); w2 (R rows); dd] -> w1ᵀ w2 + diag(dd) (..., N, N)."""
    w1, w2, dd = split_factors(factors)
    low_rank = (w1[..., :, :, None] * w2[..., :, None, :]).sum(-3)  # sum_i w1[i, n] w2[i, m]
    return low_rank + torch.diag_embed(dd)


class DCMHAttention(gpt.CausalSelfAttention):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        D, N, R, C = config.n_embd, config.n_head, config.dc_rank, config.dc_hidden_dim
        self.rank, self.query_chunk = R, config.query_chunk
        self.stages = [s for s, on in (("pre", config.dc_pre), ("post", config.dc_post)) if on]
        self.sides = [s for s, on in (("query", config.dc_query_wise), ("key", config.dc_key_wise)) if on]
        n_sets = len(self.stages) * len(self.sides)  # the paper's 4 = {pre, post} x {query, key}
        if n_sets:
            # [w1; w2] = GELU(x W1) W2 and dd = tanh(x Wdd), for each set. The init is the
            # authors' JAX one, which trained the paper's models (their PyTorch port's Wdd is 10x larger)
            self.W1 = nn.Parameter(torch.randn(D, n_sets, C) * math.sqrt(2 / (D + C)))
            self.W2 = nn.Parameter(torch.randn(n_sets, C, 2 * R, N) * math.sqrt(1 / C) * 2 / (N + R) * 0.01)
            self.Wdd = nn.Parameter(torch.randn(D, n_sets, N) * math.sqrt(2 / (D + N)) * 0.005)
        if config.dc_static:  # one W_b per stage, used as a + a W_b
            self.Wb = nn.Parameter(torch.randn(len(self.stages), N, N) * 0.1 / math.sqrt(N))
        self.compose = compose if config.dc_compose == "matrix" else compose_factors  # (folded, kernel: for probes)
        self.folded = config.dc_compose == "folded"
        self.fused = config.dc_compose == "kernel"
        self.float32_scores = config.dc_float32_scores
        pattern = config.window_pattern
        if config.window and pattern[layer_idx % len(pattern)] == "L":
            self.window = config.window

    def dynamic_factors(self, x):
        """x (B, T, D) -> (B, T, stages, sides, 2R+1, N): [w1; w2; dd] of every set at every token."""
        B, T, _ = x.shape
        n_sets, C, _, N = self.W2.shape
        R = self.rank
        hidden = F.gelu(x @ self.W1.flatten(1), approximate="tanh")  # jax.nn.gelu, as the authors'
        hidden = hidden.view(B, T, n_sets, C)                                       # (B, T, sets, C)
        w = torch.einsum("btkc,kcrn->btkrn", hidden, self.W2)                       # (B, T, sets, 2R, N)
        w1 = F.rms_norm(w[:, :, :, :R], (N,), eps=1e-6)  # only w1 is normalised, over the heads
        dd = torch.tanh(x @ self.Wdd.flatten(1)).view(B, T, n_sets, 1, N)          # (B, T, sets, 1, N)
        factors = torch.cat([w1, w[:, :, :, R:], dd], dim=3)                        # (B, T, sets, 2R+1, N)
        return factors.view(B, T, len(self.stages), len(self.sides), 2 * R + 1, N)

    def mixing_factors(self, x, ctx):
        """Per stage, (the query factors (B, T, 2R+1, N) or None, the key factors (B, S, 2R+1, N)
        or None, W_b (N, N) or None). When decoding, the key factors of all S cached keys come
        from the cache."""
        factors = self.dynamic_factors(x) if self.sides else None
        key_factors = None
        if "key" in self.sides:
            key_factors = factors[:, :, :, -1]                                      # (B, T, stages, 2R+1, N)
            if ctx.cache is not None:
                key_factors = ctx.cache.append(self.layer_idx, "dc_key_factors", key_factors, dim=1)  # (B, S, ...)
        return {stage: (factors[:, :, i, 0] if "query" in self.sides else None,
                        None if key_factors is None else key_factors[:, :, i],
                        self.Wb[i] if hasattr(self, "Wb") else None)
                for i, stage in enumerate(self.stages)}

    def mixing_matrices(self, x, ctx):
        """Per stage, the query part Q_t (B, T, N, N) or None (= 0) and the key part K_s
        (B, S, N, N) or None of W_ts; W_b is in the query part."""
        mixes = {}
        for stage, (query_factors, key_factors, static) in self.mixing_factors(x, ctx).items():
            query_mix = None if query_factors is None else mixing_matrix(query_factors)  # (B, T, N, N)
            if static is not None:
                query_mix = static if query_mix is None else query_mix + static
            if query_mix is not None:  # W_ts's identity is added in compose, outside the matmul
                query_mix = query_mix.expand(x.size(0), x.size(1), -1, -1)  # (B, T, N, N), also a lone W_b
            key_mix = None if key_factors is None else mixing_matrix(key_factors)       # (B, S, N, N)
            mixes[stage] = (query_mix, key_mix)
        return mixes

    def attend(self, q, k, v, x, ctx):
        """q (B, N, T, hd), k and v (B, N, S, hd) with the cache; x (B, T, D) the block's normed
        input, which the dynamic weights are computed from."""
        mixes = self.mixing_factors(x, ctx) if self.compose is compose_factors else self.mixing_matrices(x, ctx)
        if not self.float32_scores:
            return self.attend_chunks(q, k, v, mixes)
        wide = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 in the exactness tests
        q, k, v = q.to(wide), k.to(wide), v.to(wide)
        mixes = {stage: tuple(None if m is None else m.to(wide) for m in mix) for stage, mix in mixes.items()}
        with torch.autocast(q.device.type, enabled=False):  # else autocast would run the matmuls in bf16
            return self.attend_chunks(q, k, v, mixes)

    def attend_chunks(self, q, k, v, mixes):
        """The attention of T queries to S keys, a chunk of queries at a time."""
        T, S = q.size(2), k.size(2)
        q = q * self.head_dim ** -0.5  # scale q, not the scores: Compose is linear
        start = S - T  # position of the first query; the keys are positions 0 .. S-1
        chunk = self.query_chunk or T
        out = []
        for t0 in range(0, T, chunk):  # a fixed number of chunks: fine for torch.compile and XLA
            t1 = min(t0 + chunk, T)
            s0 = 0 if self.window is None else max(0, start + t0 - self.window + 1)
            s1 = start + t1  # keys after the chunk's last query are never seen
            mask = gpt.causal_mask(t1 - t0, s1 - s0, start + t0 - s0, self.window, q.device)  # (Tc, Sc)
            chunk_mixes = {stage: (None if qm is None else qm[:, t0:t1], None if km is None else km[:, s0:s1], *static)
                           for stage, (qm, km, *static) in mixes.items()}  # (factors: + W_b)
            out.append(self.attend_chunk(q[:, :, t0:t1], k[:, :, s0:s1], v[:, :, s0:s1], mask, chunk_mixes))
        return torch.cat(out, dim=2)                                                # (B, N, T, hd)

    def attend_chunk(self, q, k, v, mask, mixes):
        """In this order: logits, compose, mask, softmax (in float32 or wider), compose, @ v."""
        if self.fused:
            return self.attend_chunk_fused(q, k, v, mixes)
        if self.folded:
            return self.attend_chunk_folded(q, k, v, mask, mixes)
        logits = (q @ k.mT).transpose(1, 2)                                         # (B, Tc, N, Sc)
        if "pre" in mixes:
            logits = self.compose(logits, *mixes["pre"])
        logits = logits.masked_fill(~mask[:, None], float("-inf"))  # after compose: -inf would mix into NaN
        probs = F.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
        if "post" in mixes:
            # no renormalisation; compose mixes heads, never positions, so the masked
            # probabilities (exact zeros) stay exact zeros and need no second mask
            probs = self.compose(probs, *mixes["post"])
        return probs.transpose(1, 2) @ v                                            # (B, N, Tc, hd)

    def attend_chunk_fused(self, q, k, v, mixes):
        """attend_chunk with compose, mask, softmax and compose as one op (dc_compose=kernel). The
        chunk's last query sees its last key: query t sits at key position t + Sc - Tc."""
        import dcmha_kernels
        logits = q @ k.mT                                                           # (B, N, Tc, Sc)
        (pre_query, pre_key, _), (post_query, post_key, _) = (mixes.get(s, (None,) * 3) for s in ("pre", "post"))
        probs, _ = dcmha_kernels.compose_softmax_compose(logits, pre_query, pre_key, post_query, post_key,
                                                         k.size(2) - q.size(2), self.window or 0)
        return probs.to(v.dtype) @ v                                                # (B, N, Tc, hd)

    def attend_chunk_folded(self, q, k, v, mask, mixes):
        """attend_chunk with both Composes folded into matmuls of width D (dc_compose=folded)."""
        logits = q @ k.mT                                                           # (B, N, Tc, Sc)
        if "pre" in mixes:
            logits = fold_pre_compose(logits, q, k, *mixes["pre"])
        logits = logits.masked_fill(~mask, float("-inf"))
        probs = F.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
        return fold_post_compose(probs, v, *mixes["post"]) if "post" in mixes else probs @ v


class DCFormer(gpt.GPT):
    config_class = DCMHAConfig

    def make_block(self, config, layer_idx):
        return gpt.Block(config, layer_idx, attn_class=DCMHAttention)

    def extra_flops_per_token(self, seq_len):
        """Per layer: the weight network (x W1, its W2, x Wdd) and, per composed stage, one
        N x N matmul over the T scores of the query (a Q_t) and one at the key (a K_s)."""
        c, N, T = self.config, self.config.n_head, seq_len
        total = 0
        for block in self.blocks:
            attn = block.attn
            weights = sum(getattr(attn, w).numel() for w in ("W1", "W2", "Wdd") if hasattr(attn, w))
            composes = len(attn.stages) * (("query" in attn.sides or c.dc_static) + ("key" in attn.sides))
            total += 2 * weights + composes * 2 * N * N * T
        return total


gpt.MODELS["dcmha"] = (DCMHAConfig, DCFormer)

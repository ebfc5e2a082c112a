"""
AttnRes — Attention Residuals (Kimi Team: G. Chen, Y. Zhang, J. Su, ... X. Zhou, technical
report, arXiv 2603.15031, 2026). The official repository (MoonshotAI/Attention-Residuals) has
the README and Fig. 2's pseudocode only; this file follows the paper's text (§3).

A pre-norm transformer feeds each sublayer the SUM of the embedding and every earlier
sublayer's output. AttnRes feeds it a softmax-weighted AVERAGE of them, the weights coming from
one learned pseudo-query per sublayer (§3.1, Full AttnRes). A "layer" of the paper is a
sublayer: attention and MLP each read their own mix, 2L readers for L = n_layer, and one last
mix over everything feeds norm_f. With e = tok_emb(idx) and v_i the output of sublayer i
(attn(norm_1(h_i)) or mlp(norm_2(h_i)): the increment, never the hidden state):

    sources of sublayer l:  s_0 = e, s_1 = v_1, ..., s_{l-1} = v_{l-1}
    z_i = w_l · RMSNorm_l(s_i) = w_l · (γ_l ⊙ s_i / sqrt(mean(s_i²) + eps))   a scalar per token
    α_i = softmax_i(z_i)                                                        over the sources
    h_l = Σ_i α_i s_i                                                           the raw sources

w_l ∈ R^d is a parameter (the input dependence comes in through the keys), initialised to 0;
γ_l is the key RMSNorm's weight. h_l is never added to anything: the mix IS the residual path.

Block AttnRes (§3.2): blocks of S consecutive sublayers; b_0 = e, b_n = the sum of block n's
outputs. Sublayer i of block n reads [b_0, ..., b_{n-1}] and, when i > 1, the partial sum
b_n^{i-1} of the block's outputs so far (an empty partial is not a source). The final mix reads
[b_0, ..., b_N] (the last block may be shorter). S = 1 is Full AttnRes.

At init it IS the baseline: w = 0 makes α uniform, so h_l = x_l / m where x_l is gpt.py's
residual sum of the same outputs, and every reader of h (norm_1, norm_2, norm_f) is an RMSNorm,
scale-invariant when its eps is 0. The same holds for the sigmoid gate (α = 1/2).

Options (the paper's ablations, Table 4):
  attnres_block      S sublayers per block; 0 = Full
  attnres_key_scale  the learnable γ (False: the key norm has no weight)
  attnres_gate       "softmax" | "sigmoid": α_i = σ(z_i), each source gated on its own
  attnres_key_norm   False: raw keys γ ⊙ s_i, no division by their RMS

Reading choices (where the paper admits two readings):
  - The first sublayer (layer 0's attention) reads e alone and has no AttnRes: a softmax over
    one source is 1 and its w would never get a gradient (nor γ, which only ever gets one
    through w). Fig. 2 gives it a w and γ anyway; here h_1 = e for every option, so the model
    has 2d·2L extra parameters (d·2L without γ), not 2d(2L+1).
  - Without the key norm γ stays, as a plain scale of the raw key: each flag drops one thing.
  - The sigmoid gate is not normalised over the sources (Table 4 contrasts softmax's
    competition between sources with independent gates).
  - The key norm's eps is gpt.RMSNorm's, 1e-6.

Efficiency. The sources are a Python list; each is made once and read in place by every later
mix, never torch.stack-ed (that would save O(L²) copies for the backward). The RMSNorm of a key
is never materialised: w·(γ ⊙ s / rms(s)) = ((w ⊙ γ)·s) / rms(s), so each new source gets its
logits for ALL its later readers in one (B, T, d) x (d, readers) matmul, in float32 (or wider:
float64 stays float64) even under bf16 autocast, with one rms. A block's partial sum is
projected for its one reader only. The mix is a loop of addcmuls with α in float32, so h is
float32 too. Plain autograd then saves each source once: gpt.py's activations + 2L (B, T, d)
tensors (e is the first sublayer's input anyway), for Full and Block alike. Decoding needs
nothing more in the KV cache: the mix at position t reads only that token's own sources.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt


@dataclass
class AttnResConfig(gpt.GPTConfig):
    model: str = "attnres"
    attnres_block: int = 0          # S sublayers per block (Block AttnRes, §3.2); 0 = Full
    attnres_key_scale: bool = True  # learnable γ, the key RMSNorm's weight
    attnres_gate: str = "softmax"   # or "sigmoid": α_i = σ(z_i), unnormalised (Table 4's ablation)
    attnres_key_norm: bool = True   # False: raw keys γ ⊙ s_i, no RMS division (Table 4's ablation)

    def validate(self):
        super().validate()
        if self.attnres_block < 0:
            raise ValueError(f"attnres_block={self.attnres_block} must be >= 0 (0 = Full AttnRes)")
        if self.attnres_gate not in ("softmax", "sigmoid"):
            raise ValueError(f"attnres_gate={self.attnres_gate!r}: choose 'softmax' or 'sigmoid'")
        for name in ("attnres_key_scale", "attnres_key_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")

    def sources_read(self, r):
        """How many sources reader r reads (r = 1 .. 2L sublayers, 0-based; 2L = the final
        mix): e, the completed blocks before r, and r's block's partial sum if non-empty."""
        S = self.attnres_block or 1
        return 1 + r // S + (r % S > 0)


class AttnRes(nn.Module):
    """One reader's parameters: the pseudo-query w, zero at init (§3.1), and the key
    RMSNorm's weight γ. The work is done for all readers at once by AttnResGPT."""

    def __init__(self, config):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(config.n_embd))
        self.key_scale = nn.Parameter(torch.ones(config.n_embd)) if config.attnres_key_scale else None

    def folded_query(self):
        """w ⊙ γ: w · (γ ⊙ k) = (w ⊙ γ) · k, so γ never touches a (B, T, d) tensor."""
        return self.query if self.key_scale is None else self.query * self.key_scale


def key_logits(s, queries, key_norm, eps=1e-6):
    """z = w_r · RMSNorm_r(s) for every reader r (a row of queries, w ⊙ γ) at once:
    (B, T, d) -> (B, T, readers), in s's dtype, which is float32 or wider."""
    with torch.autocast(s.device.type, enabled=False):  # logits never in bf16
        z = F.linear(s, queries.to(s.dtype))                                 # (B, T, readers)
        if key_norm:
            z = z * torch.rsqrt(s.square().mean(-1, keepdim=True) + eps)     # / rms(s)
    return z


class AttnResBlock(gpt.Block):
    """gpt's sublayers (norm_1, attn, norm_2, mlp) with a depth mix in front of each; layer
    0's attention reads e alone and has none (see the top). The model wires the sublayers."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.attn_res = AttnRes(config) if layer_idx > 0 else None
        self.mlp_res = AttnRes(config)

    def forward(self, x, ctx):
        raise RuntimeError("an AttnResBlock has no residual of its own: AttnResGPT.residual_stream runs it")


class AttnResGPT(gpt.GPT):
    config_class = AttnResConfig

    def __init__(self, config):
        super().__init__(config)
        self.res_f = AttnRes(config)  # the final mix, over all sources, before norm_f

    def make_block(self, config, layer_idx):
        return AttnResBlock(config, layer_idx)

    def readers(self):
        """The AttnRes of readers 1 .. 2L in order (reader 0, layer 0's attention, reads e)."""
        return [m for b in self.blocks for m in (b.attn_res, b.mlp_res) if m is not None] + [self.res_f]

    def residual_stream(self, e, ctx):
        """(B, T, d) embeddings -> the final mix (B, T, d), before norm_f. Sublayer j (0-based:
        attention of layer j // 2 if j is even, else its MLP) is reader j; the final mix is 2L."""
        c = self.config
        n, S = 2 * c.n_layer, c.attnres_block or 1     # Full = blocks of one sublayer
        queries = torch.stack([m.folded_query() for m in self.readers()])  # (2L, d): row r-1 is reader r's
        wide = torch.promote_types(e.dtype, torch.float32)

        def source(s, first, last=n):
            """s with its logits for readers first..last: ONE matmul for all of them."""
            return s, key_logits(s, queries[first - 1:last], c.attnres_key_norm), first

        done = [source(e.to(wide), 1)]   # b_0 = e, then the completed blocks b_1, b_2, ...
        partial, h = None, e             # the current block's sum so far; reader 0 reads e
        for j in range(n):
            block = self.blocks[j // 2]
            if j % 2 == 0:
                v = block.attn(block.norm_1(h), ctx)                       # (B, T, d)
            else:
                v = block.mlp(block.norm_2(h))                             # (B, T, d)
            v = v.to(wide)               # under autocast: the sums and the mix stay float32
            partial = v if partial is None else partial + v
            if (j + 1) % S == 0 or j + 1 == n:  # block complete: b_n, read by all later readers
                done.append(source(partial, j + 1))
                partial = None
                h = self.mix(done, j + 1)
            else:                               # the partial b_n^i is read by the next sublayer only
                h = self.mix(done + [source(partial, j + 1, j + 1)], j + 1)
        return h

    def mix(self, sources, r):
        """h_r = Σ_i α_i s_i over reader r's sources [(s_i, logits of s_i, first reader)]."""
        z = torch.stack([z[..., r - first] for _, z, first in sources], dim=-1)  # (B, T, m)
        alpha = z.softmax(-1) if self.config.attnres_gate == "softmax" else z.sigmoid()
        h = sources[0][0] * alpha[..., 0:1]                                      # (B, T, d)
        for i in range(1, len(sources)):
            h = h.addcmul_(sources[i][0], alpha[..., i:i + 1])
        return h

    def extra_flops_per_token(self, seq_len):
        """Every reader r = 1..2L over its m_r sources: the logits w·k, 2d per source (the
        matmuls of source()), and the mix Σ α_i s_i, 2d per source. Full: ≈ 8dL²; Block ≈ 8dLN.
        (The keys' rms, the softmax and the block sums are not counted, like norms and gpt's
        residual adds.)"""
        c = self.config
        return 4 * c.n_embd * sum(c.sources_read(r) for r in range(1, 2 * c.n_layer + 1))


gpt.MODELS["attnres"] = (AttnResConfig, AttnResGPT)

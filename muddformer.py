"""
MUDDFormer: MUltiway Dynamic Dense connections (Xiao, Meng, Li, Yuan, ICML 2025,
arXiv 2502.12170; code github.com/Caiyun-AI/MUDDFormer).

A residual stream hands block i+1 one tensor X_i, which serves as its query, key, value and
residual input at once: everything the earlier blocks wrote must squeeze through it. MUDD keeps
every hidden state X_0 (the embedding), X_1, ..., X_i (full states, not increments) and, after
each block, a depth-wise aggregate DA_i forms FOUR weighted sums of them: the next block's
query, key, value and residual inputs. The weights are scalars per token and per stack entry,
made from the newest state X_i by a tiny MLP (dynamic) on top of a learned static prior a (the
static dense connections of §2.1), separately per way (multiway; §2):

    block i:  A   = X̄^r + Attn(Norm_q(X̄^q), Norm_k(X̄^k), Norm_v(X̄^v))
              X_i = A + MLP(Norm_m(A))                 block 1 reads X_0 four times, one norm
    DA_i:     W   = GELU(rmsnorm(X_i) W1) W2 + a       (B, T, C·m) -> (B, T, C, m), m = i+1
              X̄^c = Σ_j W[..., c, j] · X_j             c in (q, k, v, r), the inputs of block i+1
    output:   logits = lm_head(norm_f(X̄^r_L))         DA_L has one way, r

One generator (W1: d x K, W2: K x C·m) feeds all C ways; no softmax, the weights are signed.
The paper's init (§3), which it calls critical: W1 ~ N(0, 1/d), W2 = 0, a one-hot on the
newest entry. Every way then returns X_i, and the model IS gpt.py's transformer.

Parameter re-allocation (§2.4, part of MUDDFormer in the ablation table): the FFN hidden width
grows with depth, D_f·(0.5 + (i-1)/(L-1)) for block i, 0.5 -> 1.5 D_f, the same total.

PrePostDANorm (§2.5; as in the authors' JAX code): every stack entry is RMS-normed once (its own
scale) before it is mixed, the ways become X_i + Σ W·S, and the way feeding R gets a post-norm
whose scale starts at 1e-3: X̄^r = X_i + PostNorm(Σ W·S). With a = 0 it is the identity at init.

Options (the paper's ablations are config values):
  mudd_streams   the ways a DA mixes: "qkvr", or a subset ("kvr" is the table's -Q); a way not
                 mixed reads X_i. "shared": one mix feeds all four = DDFormer, and DenseFormer
                 with mudd_dynamic=False (§2.1). Without r there is no DA_L (our guess).
  mudd_dynamic   False: the static prior a alone
  mudd_hidden    K; 0 = the authors' rule: C·m, x4 at DA_L, rounded up past a multiple of 64
  mudd_layers    k > 0 keeps only the last k DAs (2 with "vr" ~ modded-nanogpt's record 81)
  mudd_norm      PrePostDANorm
  mudd_realloc   the FFN re-allocation

Efficiency. The stack is a Python list: an entry is made once and read in place by every later
DA, never copied into an (m, B, T, d) tensor. A way is a chain of addcmuls with (B, T, 1)
coefficients, so autograd keeps only O(L²·B·T) scalars beyond the entries (alive anyway): no
custom backward. A DA reads only the current tokens' states, so the KV cache holds k and v per
layer, as in gpt.py, and nothing else.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt

WAYS = "qkvr"


@dataclass
class MUDDConfig(gpt.GPTConfig):
    model: str = "muddformer"
    mudd_streams: str = "qkvr"   # the ways each DA mixes (a subset of qkvr), or "shared"
    mudd_dynamic: bool = True    # weights from X_i; False: the static prior a only (§2.1)
    mudd_hidden: int = 0         # the generator's width K; 0 = the authors' rule
    mudd_layers: int = 0         # keep only the last k DAs; 0 = all
    mudd_norm: bool = False      # PrePostDANorm (§2.5)
    mudd_realloc: bool = True    # FFN widths 0.5 -> 1.5 D_f over depth (§2.4)

    def validate(self):
        super().validate()
        s = self.mudd_streams
        if s != "shared" and (not s or set(s) - set(WAYS) or len(set(s)) < len(s)):
            raise ValueError(f"mudd_streams={s!r}: give distinct letters of 'qkvr', or 'shared'")
        if self.mudd_hidden < 0:
            raise ValueError(f"mudd_hidden={self.mudd_hidden} must be >= 0 (0 = the authors' rule)")
        if self.mudd_layers < 0:
            raise ValueError(f"mudd_layers={self.mudd_layers} must be >= 0 (0 = every DA)")
        if not self.da_layers():
            raise ValueError(f"mudd_streams={s!r} with n_layer=1 leaves no DA (the last one mixes only r)")

    @property
    def ways(self):
        """The ways a DA between blocks mixes, in the order q, k, v, r; or "shared"."""
        s = self.mudd_streams
        return s if s == "shared" else "".join(c for c in WAYS if c in s)

    def da_layers(self):
        """The blocks l (0-based) followed by a DA; DA l reads X_0..X_{l+1}. The last block's
        DA (DA_L, before lm_head) mixes only r, so it exists only when r is mixed. mudd_layers
        = k keeps the last k of these (our reading: without r, DA_L is not counted)."""
        last = "r" in self.ways or self.ways == "shared"
        layers = list(range(self.n_layer - 1)) + ([self.n_layer - 1] if last else [])
        return layers[-self.mudd_layers:] if self.mudd_layers else layers

    def ffn_hidden(self, layer_idx):
        """§2.4: D_f·(0.5 + (i-1)/(L-1)) for block i = layer_idx + 1, to a multiple of 64 (the
        authors round to 128, too coarse for small models); D_f itself when L = 1 (the
        authors' formula divides by zero) or without re-allocation."""
        d_f = gpt.MLP.default_hidden(self)
        if not self.mudd_realloc or self.n_layer == 1:
            return d_f
        return max(64, round(d_f * (0.5 + layer_idx / (self.n_layer - 1)) / 64) * 64)


def mix(stack, coefs):
    """One way of a DA: Σ_j coefs[j] · stack[j]. stack: m tensors (B, T, d); coefs: m weights,
    (B, T, 1) each, or (1,) when static. Training and decoding both use it."""
    out = stack[0] * coefs[0]                                        # (B, T, d)
    for s, c in zip(stack[1:], coefs[1:]):
        out = torch.addcmul(out, s, c)
    return out


class DepthAggregate(nn.Module):
    """DA after block layer_idx: C weighted sums of the stack [X_0, ..., X_{layer_idx+1}], with
    weights from the newest entry. Returns the next block's (q, k, v, r) inputs."""

    def __init__(self, config, layer_idx, ways):
        super().__init__()
        d = config.n_embd
        self.ways = ways                                     # e.g. "qkvr", "vr", "r", "shared"
        self.C = 1 if ways == "shared" else len(ways)
        self.m = layer_idx + 2                               # X_0 .. X_{layer_idx+1}
        a = torch.zeros(self.C, self.m)
        if not config.mudd_norm:
            a[:, -1] = 1.0                                   # every way starts as X_i (§3)
        self.a = nn.Parameter(a)                             # (C, m), the static prior
        self.dynamic = config.mudd_dynamic
        if self.dynamic:
            final = layer_idx == config.n_layer - 1
            K = config.mudd_hidden or (self.C * self.m * (4 if final else 1) // 64 + 1) * 64
            self.gen_norm = gpt.RMSNorm(d) if config.mudd_norm else None  # else: rmsnorm, no scale
            self.w1 = nn.Linear(d, K, bias=False)
            self.w2 = nn.Linear(K, self.C * self.m, bias=False)
            nn.init.normal_(self.w1.weight, std=d ** -0.5)   # N(0, 1/d)
            nn.init.zeros_(self.w2.weight)                   # W = a at init
        # PrePostDANorm: ways are X_i + Σ W·S; the one feeding R gets a post-norm, scale 1e-3
        # (the JAX code's placement; eq. 10 reads as a post-norm on every way).
        self.prepost = config.mudd_norm
        if config.mudd_norm and ("r" in ways or ways == "shared"):
            self.post_norm = gpt.RMSNorm(d)
            nn.init.constant_(self.post_norm.weight, 1e-3)

    def weights(self, x):
        """(B, T, d) newest state X_i -> the mixing weights W: (B, T, C, m), or a: (C, m)."""
        if not self.dynamic:
            return self.a
        h = self.gen_norm(x) if self.gen_norm is not None else F.rms_norm(x, x.shape[-1:], eps=1e-6)
        w = self.w2(F.gelu(self.w1(h)))                      # (B, T, C·m)
        return w.view(*w.shape[:-1], self.C, self.m) + self.a  # (B, T, C, m)

    def forward(self, stack, x):
        # one weight tensor per (way, entry), as views: the backward stacks their gradients
        # once, instead of scattering each into a zero (B, T, C, m) tensor
        w = self.weights(x).movedim((-2, -1), (0, 1)).unsqueeze(-1)     # (C, m, B, T, 1), or (C, m, 1)
        names = ("shared",) if self.ways == "shared" else tuple(self.ways)
        mixed = {way: mix(stack, w_c.unbind(0)) for way, w_c in zip(names, w.unbind(0))}  # (B, T, d) each
        if self.prepost:
            mixed = {way: x + (self.post_norm(y) if way in ("r", "shared") else y) for way, y in mixed.items()}
        if self.ways == "shared":
            return (mixed["shared"],) * 4
        return tuple(mixed.get(way, x) for way in WAYS)      # a way not mixed reads X_i


class MUDDBlock(nn.Module):
    """A pre-norm block with four inputs: A = X̄^r + Attn(Norm_q(X̄^q), Norm_k(X̄^k), Norm_v(X̄^v)),
    X = A + MLP(Norm_m(A)). The authors' three attention norms (sepln) only where the three
    inputs can differ; otherwise one, and the block is gpt.Block."""

    def __init__(self, config, layer_idx, sepln, hidden):
        super().__init__()
        d = config.n_embd
        self.norm_q = gpt.RMSNorm(d)
        self.norm_k = gpt.RMSNorm(d) if sepln else None
        self.norm_v = gpt.RMSNorm(d) if sepln else None
        self.attn = gpt.CausalSelfAttention(config, layer_idx)
        self.norm_m = gpt.RMSNorm(d)
        self.mlp = gpt.MLP(config, hidden=hidden)

    def forward(self, inputs, ctx):
        q_in, k_in, v_in, r_in = inputs                                  # (B, T, d) each
        if self.norm_k is None:
            a = r_in + self.attn(self.norm_q(q_in), ctx)
        else:
            a = r_in + self.attn(self.norm_q(q_in), ctx, k_in=self.norm_k(k_in), v_in=self.norm_v(v_in))
        return a + self.mlp(self.norm_m(a))


class MUDDFormer(gpt.GPT):
    config_class = MUDDConfig

    def __init__(self, config):
        super().__init__(config)
        # The DAs come after GPT.__init__, which re-inits every nn.Linear: W2 must stay 0.
        ways, last = config.ways, config.n_layer - 1
        final_ways = "shared" if ways == "shared" else "r"               # DA_L feeds only lm_head
        self.das = nn.ModuleDict({str(l): DepthAggregate(config, l, final_ways if l == last else ways)
                                  for l in config.da_layers()})
        self.n_entries = max(config.da_layers()) + 2                     # X_0.. that some DA reads
        if config.mudd_norm:                                             # PrePostDANorm's pre-norms
            self.stack_norms = nn.ModuleList([gpt.RMSNorm(config.n_embd) for _ in range(self.n_entries)])

    def make_block(self, config, layer_idx):
        ways = config.ways
        after_da = layer_idx - 1 in config.da_layers()
        sepln = after_da and ways != "shared" and any(c in ways for c in "qkv")
        return MUDDBlock(config, layer_idx, sepln, config.ffn_hidden(layer_idx))

    def residual_stream(self, x, ctx):
        """The blocks with a DA after each (the docstring's math); returns X̄^r_L, or X_L."""
        norm = self.config.mudd_norm
        stack = [self.stack_norms[0](x) if norm else x]                  # S = [X_0, ...]
        inputs = (x, x, x, x)                                            # block 1 reads X_0
        for l, block in enumerate(self.blocks):
            x = block(inputs, ctx)                                       # X_{l+1}  (B, T, d)
            if len(stack) < self.n_entries:
                stack.append(self.stack_norms[len(stack)](x) if norm else x)
            inputs = self.das[str(l)](stack, x) if str(l) in self.das else (x, x, x, x)
        return inputs[3]

    def extra_flops_per_token(self, seq_len):
        """The mixes: 2 FLOPs per (way, entry, element). The generators are nn.Linear (counted
        already); the norms and the adds of PrePostDANorm, like all norms, are not counted."""
        return sum(2 * da.C * da.m * self.config.n_embd for da in self.das.values())

    def no_decay_param_names(self):
        # The prior a gets no weight decay (the authors decay everything): decay would pull
        # the one-hot identity towards 0, like DCA's b.
        return {f"das.{l}.a" for l in self.das}


gpt.MODELS["muddformer"] = (MUDDConfig, MUDDFormer)

"""
DCA — DeepCrossAttention (Heddes, Javanmard, Axiotis, Fu, Bateni, Mirrokni, ICML 2025,
arXiv 2502.06785). No official code; this file follows the paper's equations.

A residual transformer feeds block t the SUM of everything before it. DCA keeps the token
embedding e and every block's own output f_j (its increment, not the residual state) as a
stack S_t = [e, f_1, ..., f_{t-1}], and gives each block three learned, input-dependent
weighted sums of it — one each for the attention's queries, keys and values ("depth-wise
cross-attention"). The weighted sum is a GRN ("generalized residual network", sec. 3):

    GRN-v1  g = sum_i b_i * s_i              b_i scalar, init 1
    GRN-v2  g = sum_i b_i ⊙ s_i              b_i in R^d, init 1
    GRN-v3  g = sum_i s_i ⊙ (b_i + relu(w·n(s_i)))
            b_i in R^d init 1; one w in R^d per GRN, init 0; n = LayerNorm on the gate input

DCA block t (the paper's Figs. 3-4):
    q_in, k_in, v_in = GRN_q(S_t), GRN_k(S_t), GRN_v(S_t)
    a   = attention(Norm_q(q_in), keys from Norm_k(k_in), values from Norm_v(v_in))
    f_t = a + MLP(Norm_m(q_in + a))                          pushed onto the stack
and the final hidden state is one more GRN over all L+1 entries. With b = 1, w = 0 every GRN
returns the plain sum x_t = e + f_1 + ... + f_{t-1}, and x_t + f_t is exactly gpt.py's
pre-norm block: at initialisation DCA IS the baseline.

k-DCA (sec. 3.1) bounds the stack: [e, f_1 + ... + f_{t-k-1}, f_{t-k}, ..., f_{t-1}] — the
embedding, ONE slot for the sum of the older outputs, and the last k outputs.

Options (the paper's ablations):
  grn            "v1" | "v2" | "v3" — the GRN version (the 6-layer ablation table)
  dca_qkv        True: three GRNs (q, k, v) per block = DCA; False: one GRN feeds q, k and v
                 (the ablation's "GRN-vX" rows)
  dca_k          k-DCA; 0 (or >= n_layer) keeps the whole stack = full DCA
  grn_norm       the LayerNorm n on GRN-v3's gate input (on by default, see the spec)
  grn_relu_bias  relu(b + w·n(s)) (the appendix's reading) instead of b + relu(w·n(s)) (the
                 formula, default)
  grn_weight_decay   decay the GRNs' b and w like any weight, as the paper's Flax lm1b recipe
                 does (optax.adamw decays every parameter); default off: decay pulls b off its
                 identity value 1
  gate_grad_at_zero  the gate relu's derivative at exactly 0: 1 (ours, default), 0 (torch.relu,
                 jax.nn.relu: w never leaves 0 and GRN-v3 silently becomes GRN-v2), 0.5
                 (jnp.maximum(x, 0)). The forward pass is the same for every value.

Efficiency. The stack is a Python list: an entry is made once and read in place by every
later GRN, never copied into an (m, B, T, d) tensor. The weighted sums are StackSum, whose
hand-written backward keeps no (B, T, d) tensor per (GRN, entry) pair (autograd would: O(L^2)
memory); under torch.compile they are plain sums, which inductor fuses and recomputes. All the
gates of an entry, for every GRN that will read it, are one projection of its LayerNorm made
once (the norm's affine part folds into w). k-DCA keeps its sum slot as a running sum, so its
cost is O(L k).

On relu at 0. w starts at exactly 0, so w·n(s) = 0 for every token. torch.relu (and
jax.nn.relu) take the derivative 0 at 0, so with the formula's placement w would get NO
gradient and never leave 0: the GRN-v3 gate would be dead from the start. We therefore use
relu with the subgradient 1 at 0 (gate_relu below). The forward pass is unchanged, and the
first optimizer step moves w off 0, after which it is an ordinary relu. (The paper's code is
not public; jnp.maximum(x, 0) would give 1/2 at 0, which also trains.) With grn_relu_bias the
relu's input starts at b = 1 > 0, so there the question does not arise.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt


@dataclass
class DCAConfig(gpt.GPTConfig):
    model: str = "dca"
    grn: str = "v3"              # "v1" | "v2" | "v3" (the version DCA uses)
    dca_qkv: bool = True         # three GRNs per block (q, k, v); False: one GRN feeds all three
    dca_k: int = 0               # k-DCA keeps e, one sum slot and the last k outputs; 0 = full DCA
    grn_norm: bool = True        # LayerNorm on GRN-v3's gate input
    grn_relu_bias: bool = False  # relu(b + w·n(s)) instead of b + relu(w·n(s))
    grn_weight_decay: bool = False   # decay GRN b and w (the paper's Flax recipe decays everything)
    gate_grad_at_zero: float = 1.0   # d relu/dz at z = 0: 1 ours, 0 torch/jax relu, 0.5 jnp.maximum
    grn_kernel: bool = False     # the GRN sums as one custom op: fused Triton kernels on CUDA (dca_kernels.py)

    def validate(self):
        super().validate()
        if self.grn not in ("v1", "v2", "v3"):
            raise ValueError(f"grn={self.grn!r}: choose 'v1', 'v2' or 'v3'")
        if self.dca_k < 0:
            raise ValueError(f"dca_k={self.dca_k} must be >= 0 (0 = full DCA)")

    def stack_size(self, layer_idx):
        """Entries in the stack read by block layer_idx (0-based; n_layer = the final GRN)."""
        if self.dca_k == 0 or layer_idx <= self.dca_k:
            return layer_idx + 1        # e, f_1, ..., f_layer_idx
        return self.dca_k + 2           # e, the sum of the older outputs, the last k


def gate_relu(z):
    """max(z, 0) whose gradient at z = 0 is 1, not 0, so that w trains from w = 0 (see top)."""
    return torch.where(z >= 0, z, 0.0)


def relu_with_grad_at_zero(z, grad):
    """max(z, 0) whose gradient at z = 0 is grad (gate_grad_at_zero != 1): the value there is
    grad * 0 = 0, so the forward pass equals gate_relu's."""
    return torch.where(z > 0, z, torch.where(z == 0, grad * z, 0.0))


class StackSum(torch.autograd.Function):
    """outs[j] = sum_i s_i ⊙ (b[j, i] + r[i, ..., j]): n_out weighted sums of one stack.

    b: (n_out, m, d), or (n_out, m) for GRN-v1; r: (m, B, T, n_out) the relu'd gates, or None;
    stack: m tensors (B, T, d). The same as a loop of addcmuls under autograd, but autograd
    would keep one (B, T, d) coefficient b + r alive per (sum, entry) pair for the backward —
    O(L^2) activations in full DCA — and allocate a new (B, T, d) tensor for every op of the
    backward. Here nothing is kept but the entries themselves (alive anyway, they are the
    stack) and the small gates, and the loops reuse scratch buffers. The gradients are plain:
        d/ds_i = sum_j g_j ⊙ (b[j, i] + r_ij)
        d/db[j, i] = sum over (B, T) of g_j ⊙ s_i      (and over d too for GRN-v1)
        d/dr_ij = sum over d of g_j ⊙ s_i"""

    @staticmethod
    def forward(ctx, b, r, *stack):
        ctx.save_for_backward(b, r, *stack)
        coef = torch.empty_like(stack[0])
        outs = []
        for j in range(b.size(0)):
            for i, s in enumerate(stack):
                c = StackSum.coefficient(b, r, j, i, coef)
                out = s * c if i == 0 else out.addcmul_(s, c)         # (B, T, d)
            outs.append(out)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        b, r, *stack = ctx.saved_tensors
        return weighted_sums_backward(grads, b, r, stack)

    @staticmethod
    def coefficient(b, r, j, i, out):
        """b[j, i] + r[i, ..., j] (written into out), or b[j, i] alone without gates."""
        if r is None:
            return b[j, i]
        return torch.add(b[j, i], r[i, ..., j:j + 1], out=out)        # (B, T, d)


def weighted_sums(b, r, stack):
    """StackSum's outs as plain tensor expressions (autograd's own backward)."""
    outs = []
    for j in range(b.size(0)):
        terms = [s * (b[j, i] if r is None else b[j, i] + r[i, ..., j:j + 1]) for i, s in enumerate(stack)]
        outs.append(sum(terms[1:], terms[0]))
    return outs


def weighted_sums_backward(grads, b, r, stack):
    """StackSum's gradients (d/db, d/dr or None, d/ds_i for each entry) from grads = d/d(outs),
    with scratch buffers reused: no (B, T, d) tensor per (sum, entry) pair."""
    grad_b = torch.empty_like(b)
    grad_r = None if r is None else torch.empty_like(r)
    coef, g_s = torch.empty_like(stack[0]), torch.empty_like(stack[0])
    grad_stack = []
    for i, s in enumerate(stack):
        for j, g in enumerate(grads):
            torch.mul(g, s, out=g_s)
            grad_b[j, i] = g_s.sum_to_size(b[j, i].shape)
            if r is not None:
                grad_r[i, ..., j] = g_s.sum(-1)
            c = StackSum.coefficient(b, r, j, i, coef)
            grad_s = g * c if j == 0 else grad_s.addcmul_(g, c)
        grad_stack.append(grad_s)
    return grad_b, grad_r, *grad_stack


def stack_sum(b, r, stack, kernel=False):
    """kernel (grn_kernel): the custom op of dca_kernels.py, fused Triton kernels on CUDA, always.
    Else StackSum in eager training; plain sums under torch.no_grad (evaluation, sampling: no
    backward to save memory for) and under torch.compile, whose inductor fuses each weighted sum
    into one kernel and whose partitioner recomputes the coefficients b + r in the backward
    rather than keeping them. The two compute the same numbers. The custom Function is kept out
    of compiled graphs because torch 2.11's Dynamo got it wrong on CUDA: under no_grad it failed
    ('Parameter' object has no attribute 'save_for_backward', H200), and with a backward it trained
    to a val loss of 3.41 where gpt reached 1.79 (H100, bf16; results/gpu/h100-2026-11-26)."""
    if kernel:
        import dca_kernels
        return dca_kernels.stack_sum(b, r, list(stack)).unbind(0)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return StackSum.apply(b, r, *stack)
    return weighted_sums(b, r, stack)


class GRN(nn.Module):
    """n_out independent GRNs over the same stack of n_entries entries (sec. 3): a block's
    three (q, k, v), or the final one. Each GRN j has its own b[j], w[j] and gate norm
    (norm_weight[j], norm_bias[j]); they are one module only so that they share the work —
    one StackSum, and their gates come in one projection per entry (DCA.residual_stream)."""

    def __init__(self, config, n_entries, n_out):
        super().__init__()
        d = config.n_embd
        self.version, self.relu_bias = config.grn, config.grn_relu_bias
        self.grad_at_zero = config.gate_grad_at_zero
        self.kernel = config.grn_kernel
        self.b = nn.Parameter(torch.ones(n_out, n_entries) if config.grn == "v1"
                              else torch.ones(n_out, n_entries, d))
        if config.grn == "v3":
            self.w = nn.Parameter(torch.zeros(n_out, d))
            self.gate_norm = config.grn_norm
            if config.grn_norm:  # the LayerNorm n's scale and bias, one per GRN
                self.norm_weight = nn.Parameter(torch.ones(n_out, d))
                self.norm_bias = nn.Parameter(torch.zeros(n_out, d))

    def gate_projection(self):
        """(weight, bias) with w·n(s) = weight @ n̂(s) + bias for each of the n_out GRNs.

        n(s) = γ ⊙ n̂(s) + β is a LayerNorm; n̂(s), the part without the affine scale and bias,
        is the same for every GRN that reads s, so it is computed once per entry (in
        DCA.residual_stream). Each GRN's own γ and β fold into its w, exactly:
            w·(γ ⊙ n̂(s) + β) = (w ⊙ γ)·n̂(s) + w·β"""
        if self.gate_norm:
            return self.w * self.norm_weight, (self.w * self.norm_bias).sum(-1)  # (n_out, d), (n_out,)
        return self.w, torch.zeros_like(self.w[:, 0])

    def forward(self, stack):
        """stack: list of (s_i, z_i): the entry (B, T, d) and, for GRN-v3, its gates
        w·n(s_i) for these n_out GRNs (B, T, n_out). Returns n_out tensors (B, T, d)."""
        entries = [s for s, _ in stack]
        if self.version != "v3":                                     # v1, v2: sum_i b_i s_i
            return stack_sum(self.b, None, entries, self.kernel)
        z = torch.stack([z for _, z in stack])                       # (m, B, T, n_out)
        relu = gate_relu if self.grad_at_zero == 1 else lambda x: relu_with_grad_at_zero(x, self.grad_at_zero)
        if not self.relu_bias:                                       # sum_i s_i ⊙ (b_i + relu(z_i))
            return stack_sum(self.b, relu(z), entries, self.kernel)
        outs = []                                                    # sum_i s_i ⊙ relu(b_i + z_i)
        for j in range(self.b.size(0)):                              # (plain autograd: an ablation)
            terms = [s * relu(self.b[j, i] + z[i, ..., j:j + 1]) for i, s in enumerate(entries)]
            outs.append(sum(terms))
        return outs


class DCABlock(nn.Module):
    """Three GRNs read the stack for q, k and v; the block returns its own output f_t."""

    def __init__(self, config, layer_idx):
        super().__init__()
        d = config.n_embd
        self.qkv = config.dca_qkv
        self.grn = GRN(config, config.stack_size(layer_idx), n_out=3 if self.qkv else 1)
        self.norm_q = gpt.RMSNorm(d)
        self.norm_k = gpt.RMSNorm(d) if self.qkv else None
        self.norm_v = gpt.RMSNorm(d) if self.qkv else None
        self.attn = gpt.CausalSelfAttention(config, layer_idx)
        self.norm_m = gpt.RMSNorm(d)
        self.mlp = gpt.MLP(config)

    def forward(self, stack, ctx):
        if self.qkv:
            q_in, k_in, v_in = self.grn(stack)                                      # (B, T, d) each
            a = self.attn(self.norm_q(q_in), ctx, k_in=self.norm_k(k_in), v_in=self.norm_v(v_in))
        else:
            q_in, = self.grn(stack)
            a = self.attn(self.norm_q(q_in), ctx)
        h = self.norm_m(q_in + a)     # the skip comes from the raw q-GRN output, before Norm_q
        return a + self.mlp(h)        # f_t: the block's input is NOT added, the stack keeps it


class DCA(gpt.GPT):
    config_class = DCAConfig

    def __init__(self, config):
        super().__init__(config)
        self.grn_f = GRN(config, config.stack_size(config.n_layer), n_out=1)  # over all L+1 entries

    def make_block(self, config, layer_idx):
        return DCABlock(config, layer_idx)

    def residual_stream(self, x, ctx):
        """Run the blocks on the stack [e, f_1, ...]; return the final GRN's output."""
        L, k = self.config.n_layer, self.config.dca_k
        readers = [block.grn for block in self.blocks] + [self.grn_f]     # GRN modules 0..L
        projections = [grn.gate_projection() for grn in readers] if self.config.grn == "v3" else None

        def entry(s, first, last):
            """Stack entry s, read by the GRN modules first..last: (s, their gates, first).
            All the gates w·n(s) of s, for every GRN that will read it, are ONE projection of
            its gate input n̂(s), made once, here: O(L) projections, not O(L^2)."""
            if self.config.grn != "v3":
                return s, [None] * (last + 1 - first), first
            n = F.layer_norm(s, s.shape[-1:]) if self.config.grn_norm else s        # n̂(s)
            weight, bias = (torch.cat(p) for p in zip(*projections[first:last + 1]))
            z = F.linear(n, weight, bias)                                # (B, T, all their gates)
            return s, z.split([len(p[1]) for p in projections[first:last + 1]], dim=-1), first

        stack = [entry(x, 0, L)]       # e, f_1, f_2, ...; k-DCA: e, the sum slot, the last k
        older = None                   # k-DCA: the sum of the outputs that left the stack
        for l, reader in enumerate(readers):
            if k and l > k:
                if older is not None:
                    stack.pop(1)                             # the sum slot made for reader l - 1
                f_old = stack.pop(1)[0]                      # the oldest output leaves ...
                older = f_old if older is None else older + f_old   # ... into the running sum
                stack.insert(1, entry(older, l, l))
            inputs = [(s, gates[l - first]) for s, gates, first in stack]  # each with reader l's gates
            if l == L:
                return reader(inputs)[0]
            f = self.blocks[l](inputs, ctx)                                    # (B, T, d)
            stack.append(entry(f, l + 1, L if k == 0 else min(l + k, L)))

    def extra_flops_per_token(self, seq_len):
        """Every GRN j over its m entries: the weighted sum, 2 FLOPs per entry element (3 with
        GRN-v3's b + relu(gate)), and GRN-v3's gate w·n(s), 2d per (GRN, entry); k-DCA's
        running sum, d per layer past k. (The extra norms, like all norms, are not counted.)"""
        c, d = self.config, self.config.n_embd
        per_element = 3 if c.grn == "v3" else 2
        readers = [block.grn for block in self.blocks] + [self.grn_f]
        total = 0
        for grn in readers:
            n_out, m = grn.b.shape[:2]
            total += n_out * m * d * per_element + (n_out * m * 2 * d if c.grn == "v3" else 0)
        if c.dca_k:
            total += d * max(0, c.n_layer - c.dca_k)
        return total

    def no_decay_param_names(self):
        # GRN parameters get no weight decay by default: decay would pull b away from its
        # identity value 1. grn_weight_decay follows the paper's Flax recipe (every parameter
        # decayed) for b and w; the gate norm's scale and bias stay undecayed, as every norm here.
        kept = ("norm_weight", "norm_bias") if self.config.grn_weight_decay else None
        return {f"{mod_name}.{name}" for mod_name, mod in self.named_modules() if isinstance(mod, GRN)
                for name, _ in mod.named_parameters() if kept is None or name in kept}


gpt.MODELS["dca"] = (DCAConfig, DCA)

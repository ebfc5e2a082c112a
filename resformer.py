"""
ResFormer and SVFormer: value residual learning.

Zhou, Wu, Jiang, Obeid, Lan, "Value Residual Learning For Alleviating Attention Concentration
In Transformers" (arXiv 2410.17897, ACL 2025).

In deep layers attention concentrates on a few tokens and the value states drain. ResFormer
gives every layer n >= 2 direct access to the FIRST layer's values: it attends over a mix of
its own values and layer 1's (the paper counts layers from 1):

    V_1  = H_0 W_V^(1)
    V_n' = λ_{n,1} V_1 + λ_{n,2} H_{n-1} W_V^(n)              for n >= 2
    U_n  = softmax(Q_n K_n^T / sqrt(d_h)) V_n'                Q, K untouched; RoPE never touches V

The mix happens on the current tokens, before the KV cache: the cache holds V_n', nothing more.
The config option value_residual picks the λs (the paper's ablations):
    identity    λ1 = λ2 = 0.5, fixed (paper v1 and the authors' code; default)
    learnable   λ1, λ2 trained per layer n >= 2, init 0.5, no weight decay (two free scalars,
                not modded-nanogpt's tied (1 - λ)·V_n + λ·V_1)
    learnable_plus  Learnable-ResFormer Plus, the best variant of the latest version (v5):
                λ_{n,1} = λ · softmax(λ'_{2,1}, ..., λ'_{N,1})_n, λ_{n,2} per layer; see below
    constant    λ1 = value_residual_lambda (default 2), λ2 = 1
    sparse      as constant, but only on the layers value_residual_layers ("6-8", 1-based,
                inclusive); the others are plain attention. Best at 82M: λ = 5 on 6-8 of 8.
value_residual_lambda is read by constant and sparse only; given with another mode (it defaults
to None, "not given") it is an error, like value_residual_layers outside sparse.

Learnable-ResFormer Plus, our reading. The λ_{n,1} of the layers n = 2..N are not free scalars
but a softmax over the layers times one shared learnable scale λ:
    λ_{n,1} = λ · softmax(λ')_n,   λ' in R^(N-1) init 0 (uniform),  λ init N
so the V_1 weights of all layers sum to λ and the layers compete for it (at init every layer
gets N/(N-1)); λ_{n,2} is a learnable scalar per layer, init 0.5. None of them is decayed.
Source: arXiv 2410.17897 v5 (June 2025), the "Learnable-ResFormer Plus" rows of its results
and ablation tables. We could not read v5's text itself here (only its abstract is stored);
the form above is the one two independent implementations that cite v5 agree on (BlaGPT's
"learnable-plus"; SATFormer's ResFormer baseline: "λ_{n,1} = λ_scale · softmax(λ'_{n,1}),
λ_scale initialised to N and shared", λ_{n,2} = 0.5), and the authors point to "the learnable
version with [a new] init" (Zcchill/Value-Residual-Learning issue #2). Check it against the
paper's own section before quoting numbers for it.

SVFormer ("svformer") goes all the way: layers n >= 2 have no W_V and attend over V_1 itself
(λ = (1, 0)). Q and K stay per layer, so decoding caches K per layer but V only once:
(L+1)/(2L) of the baseline's KV cache.
"""

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt

VALUE_RESIDUALS = ("identity", "learnable", "learnable_plus", "constant", "sparse")


@dataclass
class ResFormerConfig(gpt.GPTConfig):
    model: str = "resformer"
    value_residual: str = "identity"      # identity | learnable | learnable_plus | constant | sparse
    value_residual_lambda: float = None   # constant, sparse: λ1 (λ2 = 1); None = not given = 2
    value_residual_layers: str = ""       # sparse: the layers that mix in V_1, e.g. "6-8" (1-based)

    def residual_layers(self):
        """The layers n (1-based, as in the paper) whose values mix in V_1."""
        if self.value_residual != "sparse":
            return range(2, self.n_layer + 1)
        first, last = re.fullmatch(r"(\d+)(?:-(\d+))?", self.value_residual_layers).groups()
        return range(int(first), int(last or first) + 1)

    def validate(self):
        super().validate()
        if self.value_residual not in VALUE_RESIDUALS:
            raise ValueError(f"value_residual={self.value_residual!r}: choose one of {', '.join(VALUE_RESIDUALS)}")
        if self.value_residual_lambda is not None and self.value_residual not in ("constant", "sparse"):
            raise ValueError(f"value_residual_lambda is only read by value_residual='constant' or 'sparse', "
                             f"not {self.value_residual!r}")
        if self.value_residual != "sparse":
            if self.value_residual_layers:
                raise ValueError("value_residual_layers is only read by value_residual='sparse'")
            return
        if not re.fullmatch(r"\d+(-\d+)?", self.value_residual_layers):
            raise ValueError(f"value_residual_layers={self.value_residual_layers!r}: give a range of layers like '6-8'")
        layers = self.residual_layers()
        if not 2 <= layers.start < layers.stop <= self.n_layer + 1:
            raise ValueError(f"value_residual_layers={self.value_residual_layers!r}: "
                             f"need 2 <= first <= last <= n_layer={self.n_layer} (layer 1 is V_1 itself)")


@dataclass
class SVFormerConfig(gpt.GPTConfig):
    model: str = "svformer"


class ResFormerAttention(gpt.CausalSelfAttention):
    """Layer 1 keeps its values V_1 on the Context; layer n >= 2 attends over V_n'."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.mixes = (layer_idx + 1) in config.residual_layers()  # never layer 1: V_1 is its own V
        if not self.mixes:
            return
        if config.value_residual == "learnable":
            # 0-dim, so configure_optimizers gives them no weight decay (it would pull them to 0)
            self.lambda_1 = nn.Parameter(torch.tensor(0.5))
            self.lambda_2 = nn.Parameter(torch.tensor(0.5))
        elif config.value_residual == "learnable_plus":
            self.lambda_1 = None  # λ · softmax(λ')_n, made from the model's λ and λ' every pass
            self.lambda_2 = nn.Parameter(torch.tensor(0.5))
        elif config.value_residual == "identity":
            self.lambda_1, self.lambda_2 = 0.5, 0.5
        else:  # constant, sparse
            lam = config.value_residual_lambda
            self.lambda_1, self.lambda_2 = (2.0 if lam is None else lam), 1.0

    def values(self, v_in, ctx):
        v = super().values(v_in, ctx)                                  # V_n (B, T, nh, hd)
        if self.layer_idx == 0:
            ctx.first_values = v                                       # V_1, not detached
        elif self.mixes:
            lambda_1 = ctx.plus_lambda_1[self.layer_idx - 1] if self.lambda_1 is None else self.lambda_1
            v = lambda_1 * ctx.first_values + self.lambda_2 * v        # V_n' (B, T, nh, hd)
        return v  # the KV cache stores this mixed V_n'


class SVFormerAttention(gpt.CausalSelfAttention):
    """Layer n >= 2 has no W_V: it attends over V_1, which only layer 1 caches."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        if layer_idx > 0:
            del self.c_v  # no W_V at all: nothing unused for DDP, nothing in the state_dict

    def values(self, v_in, ctx):
        if self.layer_idx == 0:
            ctx.first_values = super().values(v_in, ctx)               # V_1 (B, T, nh, hd)
        return ctx.first_values

    def cache_kv(self, k, v, ctx):
        if self.layer_idx == 0:
            return super().cache_kv(k, v, ctx)                         # K_1, V_1
        k = ctx.cache.append(self.layer_idx, "k", k)                   # (B, nh, S, hd)
        return k, ctx.cache.layers[0]["v"]                             # layer 1's V, appended above


class ResFormer(gpt.GPT):
    config_class = ResFormerConfig
    attention_class = ResFormerAttention

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "value_residual", None) == "learnable_plus":
            # λ and λ' of Learnable-ResFormer Plus (see the top); 0-dim and 1-dim: no weight decay
            self.lambda_scale = nn.Parameter(torch.tensor(float(config.n_layer)))
            self.lambda_logits = nn.Parameter(torch.zeros(config.n_layer - 1))

    def make_block(self, config, layer_idx):
        return gpt.Block(config, layer_idx, attn_class=self.attention_class)

    def plus_lambda_1(self):
        """Learnable-ResFormer Plus: λ_{n,1} = λ · softmax(λ')_n for the layers n = 2..N, (N-1,)."""
        return self.lambda_scale * F.softmax(self.lambda_logits, dim=0)

    def residual_stream(self, x, ctx):
        if hasattr(self, "lambda_scale"):
            ctx.plus_lambda_1 = self.plus_lambda_1()  # once per pass; layer n reads entry n-2
        return super().residual_stream(x, ctx)

    def extra_flops_per_token(self, seq_len):
        # V_n' = λ1 V_1 + λ2 V_n: 3 FLOPs per value element in each mixing layer
        return 3 * self.config.n_embd * sum(block.attn.mixes for block in self.blocks)


class SVFormer(ResFormer):
    config_class = SVFormerConfig
    attention_class = SVFormerAttention

    def extra_flops_per_token(self, seq_len):
        return 0  # nothing mixed: layers n >= 2 simply have no W_V (fewer nn.Linear weights)


gpt.MODELS["resformer"] = (ResFormerConfig, ResFormer)
gpt.MODELS["svformer"] = (SVFormerConfig, SVFormer)

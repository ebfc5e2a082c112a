"""
Inside the models: what every layer's attention, values and hidden states look like on a fixed
set of val batches, for any checkpoint train.py wrote.

    python analyze.py --out_dir=out-gpt                          # out-gpt/analysis.json, analysis_*.png
    python analyze.py --out_dir=out-gpt --out_dir=out-resformer  # ... and the two side by side in out-gpt/

Every model: the attention entropy per layer and head, the share of attention the first token
gets (sinks), the value-state norms, the cosine similarity of the hidden states between layers,
the residual-stream norm, and the KV-cache bytes per token. Then each paper's own parameters:
DCA's GRN weights b and how often its gates open (the DCA paper's Fig. 10), the size of DCMHA's
dynamic composition and one composed attention map, ResFormer's λs, and the depth-mixing
weights of MUDDFormer and AttnRes.

The probes only read. They wrap a few methods of the model's own modules (attend,
attend_chunk, mixing_factors, ...) or hook them, call the original and hand back its output
untouched; every run checks that the logits with the probes equal the logits without, exactly.
SDPA never materialises the attention probabilities, so the probes recompute them from the q
and k the attention really received (for DCMHA: the composed probabilities it really uses), and
check that they reproduce its output.
"""

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import torch

import gpt
import train
from compare import MODEL_COLORS  # one color per model, the same in every figure

gpt.all_models()  # register every variant file there is (muddformer.py and attnres.py too)
import dca  # noqa: E402  (the probes need their classes)
import dcmha  # noqa: E402

LINE_STYLES = ["-", "--", ":", "-."]  # a second run of the same model gets the next one
MAP_SIZE = 48                         # DCMHA's attention maps: the first MAP_SIZE queries and keys


# -----------------------------------------------------------------------------
# checkpoints and data

def load_run(out_dir, device="cpu"):
    """-> (model in eval mode, the checkpoint dict) from out_dir/ckpt.pt."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        sys.exit(f"error: {path} not found; train first (python train.py --out_dir={out_dir})")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and containers: runs no code
    values = dict(ckpt["model_config"])
    # checkpoints written before value_residual_lambda defaulted to None ("not given") hold
    # the old default 2.0 for every mode; only constant and sparse read it
    if values.get("value_residual") not in (None, "constant", "sparse") and values.get("value_residual_lambda") == 2.0:
        values["value_residual_lambda"] = None
    model = gpt.build_model(gpt.config_from_dict(values))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def val_batches(ckpt, data_dir, n_batches, batch_size, block_size, seed):
    """A fixed list of (x, y) val batches of the dataset the checkpoint was trained on, drawn as
    train.py draws its eval windows (train.Batches, one seeded generator): the same offsets for
    every model of the same block_size, and with --seed=0 the very windows train.py scores."""
    dataset = ckpt.get("train_config", {}).get("dataset", "pystdlib")
    path = os.path.join(data_dir, dataset, "val.bin")
    if not os.path.exists(path):
        sys.exit(f"error: {path} not found; the checkpoint was trained on --dataset={dataset}: "
                 f"give --data_dir=<the folder holding {dataset}/>")
    try:
        val = train.Batches(path, block_size, seed, ckpt["model_config"]["vocab_size"])
        offsets = val.draw(n_batches * batch_size).view(n_batches, batch_size)
        return dataset, [val.get(row, torch.device("cpu")) for row in offsets]
    except train.UserError as e:
        sys.exit(f"error: {e}")


# -----------------------------------------------------------------------------
# the probes

def attention_weights(probs):
    """Each query's weights as a distribution over the keys it sees: |p| / Σ|p|. For softmax
    probabilities this changes nothing; DCMHA's composed probabilities are mixed across heads
    after the softmax, so their rows need not sum to 1 (nor stay >= 0)."""
    w = probs.abs().to(torch.promote_types(probs.dtype, torch.float32))
    return w / w.sum(-1, keepdim=True).clamp_min(1e-30)


class Probes:
    """Everything recorded over the batches, as running sums and counts per (name, layer)."""

    def __init__(self, model):
        self.model = model
        self.L = model.config.n_layer
        self.sums = defaultdict(float)
        self.counts = defaultdict(float)
        self.states = {}               # this batch's hidden state per layer, (B, T, d)
        self.maps = {}                 # DCMHA: (uncomposed, composed) maps of layer l, first batch
        self.recompute_error = 0.0     # max |recomputed probs @ v - the attention's output|
        self.batch = 0

    def add(self, name, layer, total, count):
        self.sums[name, layer] = self.sums[name, layer] + total.detach().double().cpu()
        self.counts[name, layer] += count

    def mean(self, name, layer):
        if (name, layer) not in self.sums:
            return None
        return self.sums[name, layer] / max(self.counts[name, layer], 1)

    def per_layer(self, name, layers=None):
        return [self.mean(name, l) for l in (range(self.L) if layers is None else layers)]

    # --- attention: probabilities, entropy, sinks, value norms

    def record_attention(self, layer, probs, mask, q_pos, k_pos, importance):
        """probs (B, N, T, S) the weights the queries at positions q_pos (T,) really put on the
        keys at positions k_pos (S,); mask (T, S) which keys each query sees."""
        w = attention_weights(probs)
        n_keys = mask.sum(-1)                                               # (T,)
        entropy = -(w * w.clamp_min(1e-30).log()).sum(-1)                   # (B, N, T)
        rows = n_keys > 1                       # a query that sees one key has no choice to make
        if rows.any():
            normed = entropy[:, :, rows] / n_keys[rows].log()               # in [0, 1]
            self.add("entropy", layer, normed.sum((0, 2)), normed.size(0) * normed.size(2))
        sees_first = rows & mask[:, 0] & (k_pos[0] == 0)    # queries that can see token 0 at all
        if sees_first.any():
            share = w[:, :, sees_first, 0]                                  # (B, N, rows)
            self.add("first_token_share", layer, share.sum((0, 2)), share.size(0) * share.size(2))
        importance[:, k_pos] += w.mean(1).sum(1)            # the ResFormer paper's token importance

    def record_values(self, layer, v):
        """v (B, N, S, hd): the values the attention averages (ResFormer's mixed V_n', SVFormer's V_1)."""
        norms = v.float().norm(dim=-1)                                      # (B, N, S)
        self.add("value_norm", layer, norms.sum(), norms.numel())
        self.add("value_norm_first", layer, norms[:, :, 0].sum(), norms[:, :, 0].numel())

    def record_importance(self, layer, importance):
        """The ResFormer paper's attention entropy (the authors' analyze/get_entropy.py): average the
        heads, sum over the queries -> how much attention each token receives, normalised to a
        distribution; its entropy, here divided by log(tokens) so that 1 = evenly spread."""
        p = importance / importance.sum(-1, keepdim=True)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1) / math.log(p.size(-1))
        self.add("token_importance_entropy", layer, entropy.sum(), entropy.numel())

    def wrap_attention(self, attn):
        """Wrap attn.attend (and DCMHA's attend_chunk and mixing_factors) to record what it
        does; return the names of the wrapped methods."""
        state = {}   # what attend tells the chunk probe: the chunk's place, the float type, the importance
        attn.attend = self.attend_probe(attn, state)
        if not isinstance(attn, dcmha.DCMHAttention):
            return ["attend"]
        attn.attend_chunk = self.attend_chunk_probe(attn, state)
        attn.mixing_factors = self.mixing_factors_probe(attn)
        return ["attend", "attend_chunk", "mixing_factors"]

    def attend_probe(self, attn, state):
        """attn.attend, recording values and importance; for SDPA also the attention probabilities,
        recomputed (DCMHA records its own, chunk by chunk, in attend_chunk_probe)."""
        layer, attend = attn.layer_idx, attn.attend

        def probe(q, k, v, x, ctx):
            B, N, T, _ = q.shape
            S = k.size(2)
            wide = torch.promote_types(q.dtype, torch.float32)   # float32, or the model's float64
            state.update(t0=0, start=S - T, wide=wide, importance=torch.zeros(B, S, dtype=wide, device=q.device))
            y = attend(q, k, v, x, ctx)
            self.record_values(layer, v)
            if not isinstance(attn, dcmha.DCMHAttention):    # SDPA: recompute softmax(q kᵀ/√hd)
                mask = gpt.causal_mask(T, S, S - T, attn.window, q.device)
                scores = (q.to(wide) @ k.to(wide).mT) / math.sqrt(q.size(-1))
                probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)            # (B, N, T, S)
                self.check(probs @ v.to(wide), y)
                positions = torch.arange(S, device=q.device)
                self.record_attention(layer, probs, mask, positions[S - T:], positions, state["importance"])
            self.record_importance(layer, state["importance"])
            return y
        return probe

    def attend_chunk_probe(self, attn, state):
        """DCMHA's attend_chunk, recording the composed probabilities exactly as it makes them
        (checked against its output) and, once, the plain-vs-composed attention maps."""
        layer, attend_chunk = attn.layer_idx, attn.attend_chunk

        def probe(q, k, v, mask, mixes):
            y = attend_chunk(q, k, v, mask, mixes)
            raw = (q @ k.mT).transpose(1, 2)                                    # (B, Tc, N, Sc)
            logits = attn.compose(raw, *mixes["pre"]) if "pre" in mixes else raw
            hide = ~mask[:, None]
            wide = state["wide"]
            probs = logits.masked_fill(hide, float("-inf")).to(wide).softmax(-1).to(v.dtype)
            if "post" in mixes:
                probs = attn.compose(probs, *mixes["post"])
            probs = probs.transpose(1, 2)                                       # (B, N, Tc, Sc)
            self.check(probs.to(wide) @ v.to(wide), y)
            Tc, Sc = q.size(2), k.size(2)
            t0, start = state["t0"], state["start"]   # attend's chunk loop: where this chunk is
            s0 = 0 if attn.window is None else max(0, start + t0 - attn.window + 1)
            device = q.device
            self.record_attention(layer, probs, mask, torch.arange(start + t0, start + t0 + Tc, device=device),
                                    torch.arange(s0, s0 + Sc, device=device), state["importance"])
            if self.batch == 0 and t0 == 0:        # one picture: plain vs composed attention
                plain = raw.masked_fill(hide, float("-inf")).to(wide).softmax(-1).transpose(1, 2)
                n = MAP_SIZE
                self.maps[layer] = (plain[0, :, :n, :n].cpu(), probs[0, :, :n, :n].cpu())
            state["t0"] = t0 + Tc
            return y
        return probe

    def mixing_factors_probe(self, attn):
        """DCMHA's mixing_factors, recording the size of the query- and key-dependent mixes."""
        layer, mixing_factors = attn.layer_idx, attn.mixing_factors

        def probe(x, ctx):
            mixes = mixing_factors(x, ctx)   # (dc_compose=matrix builds its matrices from these)
            N = attn.n_head
            # W_ts = I + Q_t + K_s, Q_t = qw1ᵀ qw2 + diag(qdd) (+ W_b), K_s = kw1ᵀ kw2 + diag(kdd)
            for stage, (query_factors, key_factors, static) in mixes.items():
                query_mix = None if query_factors is None else dcmha.mixing_matrix(query_factors)
                if static is not None:
                    query_mix = static[None, None] if query_mix is None else query_mix + static
                key_mix = None if key_factors is None else dcmha.mixing_matrix(key_factors)
                for side, part in (("query", query_mix), ("key", key_mix)):
                    if part is not None:                        # ‖part‖_F / ‖I‖_F per token
                        size = part.float().flatten(-2).norm(dim=-1) / math.sqrt(N)
                        self.add(f"compose_{stage}_{side}", layer, size.sum(), size.numel())
            return mixes
        return probe

    def check(self, recomputed, y):
        self.recompute_error = max(self.recompute_error, (recomputed - y.to(recomputed.dtype)).abs().max().item())

    # --- hidden states: the input of every block, and the final one

    def record_state(self, index, x):
        self.states[index] = x.detach().float()

    def finish_batch(self):
        """Norms and cosine similarities of this batch's L+1 hidden states."""
        states = torch.stack([self.states[i] for i in range(self.L + 1)])     # (L+1, B, T, d)
        norms = states.norm(dim=-1)                                           # (L+1, B, T)
        unit = states / norms[..., None].clamp_min(1e-30)
        tokens = norms[0].numel()
        self.add("state_norm", None, norms.sum((1, 2)), tokens)
        self.add("state_cosine", None, torch.einsum("ibtd,jbtd->ij", unit, unit), tokens)
        self.states = {}
        self.batch += 1

    # --- each paper's own mixing

    def wrap_dca_gates(self, grn, reader):
        """How often each gate of a GRN-v3 is open (relu input > 0), per output and entry."""
        def gates_probe(module, args):
            stack = args[0]                                   # [(s_i (B, T, d), z_i (B, T, n_out))]
            for i, (s, z) in enumerate(stack):
                if grn.relu_bias:                             # relu(b + z): one gate per channel
                    opened = (grn.b[:, i] + z[..., None] > 0).float().mean((0, 1, 3))     # (n_out,)
                else:                                         # b + relu(z): one gate per token
                    opened = (z > 0).float().mean((0, 1))                                  # (n_out,)
                self.add("dca_gate_open", (reader, i), opened, 1)
        return grn.register_forward_pre_hook(gates_probe)

    def wrap_mudd(self, da, index):
        weights = da.weights

        def weights_probe(x):
            w = weights(x)                                                 # (B, T, C, m) or (C, m)
            mean = w.float().mean((0, 1)) if w.dim() == 4 else w.float()
            self.add("mudd_weights", index, mean, 1)
            return w
        da.weights = weights_probe

    def wrap_attnres(self, model):
        mix = model.mix

        def mix_probe(sources, r):
            h = mix(sources, r)
            z = torch.stack([z[..., r - first] for _, z, first in sources], dim=-1)   # as mix does
            alpha = z.softmax(-1) if model.config.attnres_gate == "softmax" else z.sigmoid()
            self.add("attnres_alpha", r, alpha.float().mean((0, 1)), 1)
            if r % 2 == 0 and r < 2 * self.L:      # reader 2l is layer l's attention: its input
                self.record_state(r // 2, h)
            return h
        model.mix = mix_probe

    @contextmanager
    def installed(self):
        """Install every probe on the model; remove them all on exit."""
        model, undo = self.model, []
        for block in model.blocks:
            attn = block.attn
            undo += [(attn, name) for name in self.wrap_attention(attn)]
        handles = [model.norm_f.register_forward_pre_hook(lambda m, args: self.record_state(self.L, args[0]))]
        if isinstance(model, dca.DCA):                # block l reads the q-GRN's output (its skip)
            for l, block in enumerate(model.blocks):
                handles.append(block.grn.register_forward_hook(
                    lambda m, args, out, l=l: self.record_state(l, out[0])))
            if model.config.grn == "v3":
                readers = [block.grn for block in model.blocks] + [model.grn_f]
                handles += [self.wrap_dca_gates(grn, r) for r, grn in enumerate(readers)]
        elif model.config.model == "attnres":         # the sublayers read the mixes, never a block
            handles.append(model.tok_emb.register_forward_hook(lambda m, args, out: self.record_state(0, out)))
            self.wrap_attnres(model)
            undo.append((model, "mix"))
        else:                                         # a block's input; MUDD's: (q, k, v, r) -> r
            for l, block in enumerate(model.blocks):
                handles.append(block.register_forward_pre_hook(
                    lambda m, args, l=l: self.record_state(l, args[0][3] if isinstance(args[0], tuple) else args[0])))
        if model.config.model == "muddformer":
            for l, da in model.das.items():
                self.wrap_mudd(da, int(l))
                undo.append((da, "weights"))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            for obj, name in undo:
                delattr(obj, name)                    # the class's own method shows again


# -----------------------------------------------------------------------------
# the analysis of one run

def tolist(x, digits=6):
    """Tensors, floats and nested lists -> JSON: floats to 6 significant digits, NaN -> None."""
    if x is None or isinstance(x, str):
        return x
    if torch.is_tensor(x):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return [tolist(v, digits) for v in x]
    x = float(x)
    return None if math.isnan(x) else float(f"{x:.{digits}g}")


def resformer_lambdas(model):
    """(λ1, λ2) of every layer, None where a layer does not mix in V_1."""
    lambdas = []
    plus = model.plus_lambda_1() if hasattr(model, "lambda_scale") else None
    for l, block in enumerate(model.blocks):
        attn = block.attn
        if not getattr(attn, "mixes", False):
            lambdas.append((None, None))
            continue
        lambda_1 = plus[l - 1] if attn.lambda_1 is None else attn.lambda_1
        lambdas.append((float(lambda_1), float(attn.lambda_2)))
    return lambdas


def dca_grns(model, probes):
    """The DCA paper's Fig. 10: for each GRN output (q, k, v), a reader x entry matrix of the static
    weights b (mean over d) and of how often the gate is open. The final GRN has one output: it
    is the last row of every panel."""
    readers = [block.grn for block in model.blocks] + [model.grn_f]
    names = ["q", "k", "v"] if readers[0].b.size(0) == 3 else ["qkv"]
    result = {"readers": [f"block {l + 1}" for l in range(len(readers) - 1)] + ["final"], "outputs": names,
              "b_mean": {}, "gate_open": {}}
    for j, name in enumerate(names):
        rows, opened = [], []
        for r, grn in enumerate(readers):
            jj = min(j, grn.b.size(0) - 1)
            rows.append(grn.b[jj] if grn.b.dim() == 2 else grn.b[jj].mean(-1))      # (entries,)
            if model.config.grn == "v3":
                opened.append([probes.mean("dca_gate_open", (r, i))[jj] for i in range(grn.b.size(1))])
        result["b_mean"][name] = padded(rows)
        if opened:
            result["gate_open"][name] = padded(opened)
    if not result["gate_open"]:
        del result["gate_open"]                   # GRN-v1 and v2 have no gates
    return result


def mudd_weights(model, probes):
    """MUDDFormer: per way, a DA x stack-entry matrix of the mixing weights (mean over tokens)."""
    das = sorted(int(l) for l in model.das)
    ways = {l: ("shared",) if model.das[str(l)].ways == "shared" else tuple(model.das[str(l)].ways) for l in das}
    weights = {}
    for way in ("q", "k", "v", "r", "shared"):
        if any(way in ways[l] for l in das):
            weights[way] = padded([probes.mean("mudd_weights", l)[ways[l].index(way)] if way in ways[l] else []
                                   for l in das])
    return {"das": [f"after block {l + 1}" for l in das], "weights": weights}


def padded(rows):
    """Rows of different lengths -> one NaN-padded (len(rows), longest) tensor."""
    out = torch.full((len(rows), max(len(r) for r in rows)), float("nan"), dtype=torch.float64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r, dtype=torch.float64).detach()
    return out


@torch.no_grad()
def analyze(model, batches, kv_context):
    """Run the batches through the model with the probes on; return the analysis as a dict."""
    c = model.config
    L = c.n_layer
    plain, _ = model(batches[0][0])
    probes = Probes(model)
    losses = []
    with probes.installed():
        for i, (x, y) in enumerate(batches):
            logits, loss = model(x, y)
            if i == 0:
                hooks_change = (logits - plain).abs().max().item()
            losses.append(loss.item())
            probes.finish_batch()
    result = {
        "model": c.model, "model_config": gpt.config_to_dict(c), "params": model.num_params(),
        "tokens": sum(x.numel() for x, _ in batches), "val_loss": sum(losses) / len(losses),
        "hooks_max_logit_change": hooks_change,                    # must be 0: the probes only read
        "attention_recompute_max_error": probes.recompute_error,   # recomputed probs @ v vs the output
        "attention": {
            "entropy": probes.per_layer("entropy"),                # (L, heads), in [0, 1]
            "first_token_share": probes.per_layer("first_token_share"),
            "token_importance_entropy": probes.per_layer("token_importance_entropy"),
        },
        "value_norm": {"mean": probes.per_layer("value_norm"), "first_token": probes.per_layer("value_norm_first")},
        "hidden": {"labels": ["embedding" if c.model != "dca" else "block 1 input"]
                   + [f"block {l + 1} input" for l in range(1, L)] + ["final"],
                   "norm": probes.mean("state_norm", None), "cosine": probes.mean("state_cosine", None)},
        "kv_cache": {"context": min(kv_context, c.block_size),
                     "bytes_per_token": gpt.kv_cache_bytes_per_token(model, kv_context)},
    }
    if isinstance(model, dca.DCA):
        result["dca"] = dca_grns(model, probes)
    if isinstance(model.blocks[0].attn, dcmha.DCMHAttention):
        result["dcmha"] = {f"{stage}_{side}": probes.per_layer(f"compose_{stage}_{side}")
                           for stage in ("pre", "post") for side in ("query", "key")}
    if c.model == "resformer":
        lambdas = resformer_lambdas(model)
        result["resformer"] = {"mode": c.value_residual, "lambda_1": [a for a, _ in lambdas],
                               "lambda_2": [b for _, b in lambdas]}
    if c.model == "muddformer":
        result["muddformer"] = mudd_weights(model, probes)
    if c.model == "attnres":
        readers = range(1, 2 * L + 1)            # reader r: sublayer r (even: attention, odd: MLP), 2L: final
        result["attnres"] = {"readers": [("final" if r == 2 * L else f"{'mlp' if r % 2 else 'attn'} {r // 2 + 1}")
                                         for r in readers],
                             "alpha": padded([probes.mean("attnres_alpha", r).tolist() for r in readers])}
    result = to_json(result)
    if probes.maps:
        result["dcmha_maps"] = probes.maps      # layer -> (plain, composed) maps: for the picture only
    return result


# -----------------------------------------------------------------------------
# plots

def pyplot():
    """matplotlib, imported only to plot: analyze() needs none."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def heatmap(fig, ax, data, title, xlabel, ylabel, vmin=None, vmax=None, cmap="viridis",
            xticks=None, yticks=None, annotate=True):
    data = np.array(data, dtype=float)
    im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(data.shape[1]), xticks if xticks is not None else range(data.shape[1]),
                  rotation=45 if xticks is not None and max(map(len, map(str, xticks))) > 3 else 0)
    ax.set_yticks(range(data.shape[0]), yticks if yticks is not None else range(1, data.shape[0] + 1))
    if annotate and data.size <= 120:
        for (i, j), v in np.ndenumerate(data):
            if not np.isnan(v):
                r, g, b, _ = im.cmap(im.norm(v))                # dark text on light cells
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def signed_range(data):
    """A color range symmetric around 0 that holds every value (at least ±1)."""
    return max(1.0, float(np.nanmax(np.abs(np.array(data, dtype=float)))))


def model_label(result):
    """"resformer learnable_plus": the model and its λ mode if any."""
    mode = result.get("resformer", {}).get("mode", "identity")
    return result["model"] + ("" if mode == "identity" else f" {mode}")


def run_label(result):
    """"resformer learnable_plus (out-plus)": the model, its λ mode if any, and the run's folder."""
    return f"{model_label(result)} ({os.path.basename(os.path.normpath(result['out_dir']))})"


def short_labels(results):
    """Each run's model label, with its folder only where two runs share a model label."""
    counts = defaultdict(int)
    for r in results:
        counts[model_label(r)] += 1
    return [model_label(r) if counts[model_label(r)] == 1 else run_label(r) for r in results]


def plot_overview(result, path):
    """The six pictures every model gets, on one page."""
    plt = pyplot()
    a, L = result["attention"], len(result["attention"]["entropy"])
    layers = range(1, L + 1)
    color = MODEL_COLORS.get(result["model"], "black")
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    heads = [f"{h + 1}" for h in range(len(a["entropy"][0]))]
    heatmap(fig, axes[0, 0], a["entropy"], "attention entropy / log(keys seen)\n(mean over queries; 1 = uniform)",
            "head", "layer", 0, 1, xticks=heads)
    top = max(0.1, float(np.nanmax(np.array(a["first_token_share"], dtype=float))))  # small shares stay visible
    heatmap(fig, axes[0, 1], a["first_token_share"], "attention on the first token (sink)\n(mean over queries)",
            "head", "layer", 0, top, cmap="magma", xticks=heads)
    hidden = result["hidden"]
    short = ["emb" if s == "embedding" else "final" if s == "final" else s.split()[1] for s in hidden["labels"]]
    heatmap(fig, axes[0, 2], hidden["cosine"], "cosine similarity of hidden states\n(mean over tokens)",
            "state (input of block ...)", "state (input of block ...)", -1, 1, cmap="RdBu_r",
            xticks=short, yticks=short)
    ax = axes[1, 0]
    ax.plot(layers, [float(np.mean(r)) for r in a["entropy"]], "o-", color=color, label="per query, mean over heads")
    ax.plot(layers, a["token_importance_entropy"], "s--", color=color, alpha=0.6,
            label="token importance (ResFormer paper)")
    ax.set(title="attention entropy per layer", xlabel="layer", ylabel="entropy / log(keys)", ylim=(0, 1.05))
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    v = result["value_norm"]
    ax.plot(layers, v["mean"], "o-", color=color, label="all tokens")
    ax.plot(layers, v["first_token"], "s--", color=color, alpha=0.6, label="first token")
    ax.set(title="value-state norm ‖v‖ per layer\n(the values attention averages)", xlabel="layer",
           ylabel="mean ‖v‖ per head")
    ax.legend(fontsize=8)
    ax = axes[1, 2]
    ax.plot(range(len(hidden["norm"])), hidden["norm"], "o-", color=color)
    ax.set_xticks(range(len(short)), short)
    ax.set(title="residual-stream norm ‖h‖\n(mean over tokens)", xlabel="state (input of block ...)",
           ylabel="‖h‖")
    for ax in axes[1, :2]:
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.suptitle(f"{run_label(result)}: val loss {result['val_loss']:.4f} on {result['tokens']:,} tokens, "
                 f"KV cache {result['kv_cache']['bytes_per_token']:,.0f} bytes/token", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dca(result, path):
    """The DCA paper's Fig. 10: the static weights b (mean over d) of every GRN, and how often
    each GRN-v3 gate is open, by reader (row) and stack entry (column)."""
    plt = pyplot()
    d = result["dca"]
    rows = 2 if "gate_open" in d else 1
    n = len(d["outputs"])
    fig, axes = plt.subplots(rows, n, figsize=(5.5 * n, 4.5 * rows), squeeze=False)
    k = result["model_config"]["dca_k"]
    entries = "entry: 0 = embedding e, j = f_j" if not k else f"entry: e, Σ older outputs, the last {k}"
    for j, name in enumerate(d["outputs"]):
        b = np.array(d["b_mean"][name], dtype=float)
        lim = max(0.05, float(np.nanmax(np.abs(b - 1))))       # colors centred on b = 1, the identity
        heatmap(fig, axes[0, j], b, f"GRN_{name}: static weight b (mean over d; 1 = plain sum)",
                entries, "reader", cmap="coolwarm", yticks=d["readers"], vmin=1 - lim, vmax=1 + lim)
        if rows == 2:
            heatmap(fig, axes[1, j], d["gate_open"][name], f"GRN_{name}: gate open (relu input > 0)",
                    entries, "reader", 0, 1, cmap="Greens", yticks=d["readers"])
    fig.suptitle(f"{run_label(result)}: the GRNs (b = 1 and closed gates = the plain residual sum)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dcmha(result, path):
    """How far each layer's W_ts moves from I, and one layer's attention before and after the
    composition."""
    plt = pyplot()
    sizes, maps = result["dcmha"], result["dcmha_maps"]
    L = len(next(iter(sizes.values())))
    # the layer whose composition moves its attention the most
    layer = max(maps, key=lambda l: (maps[l][1] - maps[l][0]).abs().sum().item())
    plain, composed = maps[layer]
    N = plain.size(0)
    fig = plt.figure(figsize=(max(12, 2.8 * N), 10), layout="constrained")
    grid = fig.add_gridspec(3, N)
    ax = fig.add_subplot(grid[0, :])
    width = 0.2
    for i, (name, values) in enumerate(sizes.items()):
        values = [np.nan if v is None else v for v in values]
        ax.bar(np.arange(1, L + 1) + (i - 1.5) * width, values, width, label=name.replace("_", ", ") + "-wise")
    ax.set(title="size of the dynamic composition, ‖W_ts − I‖_F / ‖I‖_F (mean over tokens; 0 = plain MHA)",
           xlabel="layer", ylabel="‖W − I‖ / ‖I‖")
    ax.set_xticks(range(1, L + 1))
    ax.legend(fontsize=8, ncol=4)
    lim = float(max(plain.abs().max(), composed.abs().max()))   # white = 0; composed weights can be < 0
    for h in range(N):
        for row, (m, label) in enumerate(((plain, "softmax(q kᵀ)"), (composed, "composed"))):
            axh = fig.add_subplot(grid[1 + row, h])
            im = axh.imshow(m[h].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
            axh.set_title(f"layer {layer + 1}, head {h + 1}: {label}", fontsize=9)
            axh.set_xlabel("key")
            if h == 0:
                axh.set_ylabel("query")
    fig.colorbar(im, ax=fig.axes[-2 * N:], fraction=0.02, label="attention weight")
    fig.suptitle(f"{run_label(result)}: DCMHA's head composition; below, the first {MAP_SIZE} tokens of a val "
                 f"sequence without and with Compose_pre and Compose_post")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_resformer(result, path):
    plt = pyplot()
    r = result["resformer"]
    layers = range(1, len(r["lambda_1"]) + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    nan = lambda xs: [np.nan if x is None else x for x in xs]
    ax.plot(layers, nan(r["lambda_1"]), "o-", color=MODEL_COLORS["resformer"], label="λ1 (weight of V_1)")
    ax.plot(layers, nan(r["lambda_2"]), "s--", color="#aec7e8", label="λ2 (weight of the layer's own V_n)")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set(title=f"{run_label(result)}\nV_n' = λ1·V_1 + λ2·V_n", xlabel="layer", ylabel="λ")
    ax.set_xticks(list(layers))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_depth_mixing(result, path):
    """MUDDFormer's DA weights per way, or AttnRes's α per reader: mean over tokens."""
    plt = pyplot()
    if result["model"] == "muddformer":
        m = result["muddformer"]
        ways = list(m["weights"])
        fig, axes = plt.subplots(1, len(ways), figsize=(5 * len(ways), 4.5), squeeze=False)
        for ax, way in zip(axes[0], ways):
            lim = signed_range(m["weights"][way])
            heatmap(fig, ax, m["weights"][way], f"way {way}: weight of X_j (mean over tokens)",
                    "stack entry j (0 = embedding)", "DA", cmap="coolwarm", vmin=-lim, vmax=lim, yticks=m["das"])
        title = f"{run_label(result)}: depth-wise aggregates (one-hot on the newest X = the plain residual)"
    else:
        a = result["attnres"]
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(a["readers"]) + 2))
        heatmap(fig, ax, a["alpha"], "α over the sources (mean over tokens)", "source (0 = embedding)",
                "reader", 0, 1, cmap="Oranges", yticks=a["readers"])
        title = f"{run_label(result)}: attention residuals"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_compare(results, path):
    """The models side by side: one line per run, one color per model."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    seen = defaultdict(int)
    labels = short_labels(results)
    for r, label in zip(results, labels):
        color = MODEL_COLORS.get(r["model"], "black")
        style = LINE_STYLES[seen[r["model"]] % len(LINE_STYLES)]
        seen[r["model"]] += 1
        label, a = f"{label}: val loss {r['val_loss']:.4f}", r["attention"]
        layers = range(1, len(a["entropy"]) + 1)
        kw = dict(color=color, linestyle=style, marker="o", label=label)
        axes[0, 0].plot(layers, [float(np.mean(e)) for e in a["entropy"]], **kw)
        axes[0, 1].plot(layers, a["token_importance_entropy"], **kw)
        axes[0, 2].plot(layers, [float(np.mean(s)) for s in a["first_token_share"]], **kw)
        axes[1, 0].plot(layers, r["value_norm"]["mean"], **kw)
        axes[1, 1].plot(range(len(r["hidden"]["norm"])), r["hidden"]["norm"], **kw)
    axes[0, 0].set(title="attention entropy / log(keys seen)\n(mean over queries and heads)", ylim=(0, 1.05))
    axes[0, 1].set(title="token-importance entropy (the ResFormer paper's)\n(heads averaged, summed over queries)",
                   ylim=(0, 1.05))
    axes[0, 2].set(title="attention on the first token (sink)\n(mean over queries and heads)", ylim=(0, None))
    axes[1, 0].set(title="value-state norm ‖v‖", ylabel="mean ‖v‖ per head")
    axes[1, 1].set(title="residual-stream norm ‖h‖ (0 = embedding,\nl = input of block l+1, last = final)",
                   xlabel="state", ylabel="‖h‖ (log scale)", yscale="log")  # one model's may grow 100x
    for ax in axes.flat[:4]:
        ax.set_xlabel("layer")
    for ax in axes.flat[:5]:
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    kv = [r["kv_cache"]["bytes_per_token"] for r in results]
    ax = axes[1, 2]
    bars = ax.barh(range(len(results)), kv, color=[MODEL_COLORS.get(r["model"], "black") for r in results])
    ax.bar_label(bars, [f"{b:,.0f}" for b in kv], fontsize=8, padding=2)
    ax.set_xlim(0, 1.2 * max(kv))
    ax.set_yticks(range(len(results)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(title=f"KV cache per token ({results[0]['kv_cache']['context']} tokens of context)", xlabel="bytes")
    rows = -(-len(results) // 3)  # the legend under the panels, three runs a row
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=min(3, len(results)), fontsize=9,
               frameon=False)
    fig.suptitle(f"inside the models, on the same {results[0]['tokens']:,} val tokens", fontsize=11)
    fig.tight_layout(rect=(0, 0.035 * rows + 0.01, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_run(result, out_dir):
    """analysis.json and the PNGs next to the checkpoint; returns the files written."""
    files = {"overview": plot_overview}
    if "dca" in result:
        files["dca_grn"] = plot_dca
    if "dcmha" in result:
        files["dcmha"] = plot_dcmha
    if result.get("resformer", {}).get("mode", "").startswith("learnable"):  # fixed λs need no picture
        files["resformer_lambdas"] = plot_resformer
    if "muddformer" in result or "attnres" in result:
        files["depth_mixing"] = plot_depth_mixing
    written = []
    for name, plot in files.items():
        path = os.path.join(out_dir, f"analysis_{name}.png")
        plot(result, path)
        written.append(path)
    path = os.path.join(out_dir, "analysis.json")
    with open(path, "w") as f:
        json.dump({k: v for k, v in result.items() if k != "dcmha_maps"}, f, indent=1)
    return [path] + written


def to_json(result):
    """The analysis with every tensor and float made JSON (model_config stays as it is)."""
    out = {}
    for key, value in result.items():
        if key == "model_config" or isinstance(value, (str, int, bool)):
            out[key] = value
        elif isinstance(value, dict):
            out[key] = to_json(value)
        else:
            out[key] = tolist(value)
    return out


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out_dir", action="append", help="a folder with ckpt.pt; repeat for several "
                        "(default out-gpt, where python train.py writes)")
    parser.add_argument("--data_dir", default="data", help="the folder holding <dataset>/val.bin")
    parser.add_argument("--compare_dir", default="",
                        help="where the side-by-side figure goes (default: the first out_dir)")
    parser.add_argument("--batches", type=int, default=8, help="val batches, the same for every model "
                        "(--batches=EVAL_ITERS --batch_size=BATCH_SIZE --seed=0: train.py's eval windows)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="picks the val batches")
    parser.add_argument("--kv_context", type=int, default=0,
                        help="tokens of context for the KV-cache bytes (0 = block_size)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for name in ("batches", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be >= 1")
    out_dirs = args.out_dir or ["out-gpt"]
    torch.manual_seed(args.seed)
    results = []
    for out_dir in out_dirs:
        model, ckpt = load_run(out_dir, args.device)
        dataset, batches = val_batches(ckpt, args.data_dir, args.batches, args.batch_size,
                                       model.config.block_size, args.seed)
        batches = [(x.to(args.device), y.to(args.device)) for x, y in batches]
        result = analyze(model, batches, args.kv_context or model.config.block_size)
        result.update(out_dir=out_dir, dataset=dataset, step=ckpt.get("step"))
        if result["hooks_max_logit_change"] != 0:
            print(f"warning: {out_dir}: the probes changed the logits by {result['hooks_max_logit_change']:.2e}")
        files = write_run(result, out_dir)
        a = result["attention"]
        print(f"{out_dir} ({result['model']}, step {result['step']}): val loss {result['val_loss']:.4f} | "
              f"entropy by layer {' '.join(f'{np.mean(e):.2f}' for e in a['entropy'])} | "
              f"first-token share {' '.join(f'{np.mean(s):.2f}' for s in a['first_token_share'])} | "
              f"KV cache {result['kv_cache']['bytes_per_token']:,.0f} B/token")
        print("  wrote " + ", ".join(files))
        results.append(result)
    if len(results) > 1:
        compare_dir = args.compare_dir or out_dirs[0]
        os.makedirs(compare_dir, exist_ok=True)
        path = os.path.join(compare_dir, "analysis_compare.png")
        plot_compare(results, path)
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()

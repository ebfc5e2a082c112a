"""
DCMHA's compose -> mask -> softmax -> compose as one custom op, with fused Triton kernels on CUDA
(dcmha.py, dc_compose="kernel").

    probs = Compose_post(softmax(mask(Compose_pre(logits))))           dcmha.attend_chunk, the same numbers

Compose is the factorised form of dcmha.compose_factors: at every (query t, key s) the N heads'
values x_ts are mixed as
    Compose(x)[m] = x[m] (1 + qdd[m](t) + kdd[m](s)) + Σ_i qw2[i, m](t) Σ_n qw1[i, n](t) x[n]
                                                   + Σ_i kw2[i, m](s) Σ_n kw1[i, n](s) x[n].
Under torch.compile the eager chain is a dozen passes over the (B, N, T, S) scores, each written
and read back, and DCMHA's step cost 4.18x gpt's on an H200 at GPT-2 small's shape
(results/gpu/h200-2026-11-26). Here a program holds a block of queries with all N heads, so the
heads can be mixed in registers, and walks over the keys twice (flash attention's online softmax,
then the composed probabilities): the logits are read twice and the probabilities written once.
The backward also walks twice (the softmax's row terms δ_n(t) = Σ_s p_n dp_n, then the rest) and
writes the logits' gradient once; the dynamic weights' gradients are sums over the keys (at the
query) or over the queries (at the key), added up with atomics.

The adjoint of Compose is Compose with w1 and w2 swapped (the same diagonal), so both directions
share one tile function. What a factor set gets back, with G the gradient at Compose's output:
    d qdd[m](t) = Σ_s x[m] G[m],   d qw2[i, m](t) = Σ_s (Σ_n qw1[i, n] x[n]) G[m],
    d qw1[i, n](t) = Σ_s x[n] (Σ_m qw2[i, m] G[m])             (at the key: Σ_t instead of Σ_s).

Without CUDA the op computes with torch (dcmha.compose_factors, and the same formulas for its backward);
with TRITON_INTERPRET=1 set before this module is imported, it runs the kernels in Triton's
interpreter on the CPU: the tests of the kernels without a GPU (tests/test_dcmha_kernels.py).
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (a CPU-only torch): the op computes with torch
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TILE, NUM_WARPS = 1024, 8  # values a (heads, queries, keys) tile holds: 4 a thread


def block_sizes(n_head):
    """(heads padded to a power of 2, queries, keys) of a tile of TILE values. Larger tiles spill
    registers: Triton 3.6's sm_90 code (torch 2.11's) for N = 12 with 16 x 8 x 16 tiles spilled
    436 bytes a thread backward. 16 x 8 x 8 keeps the 16 heads of a (query, key) in one warp, so
    the sums over the heads need no barrier (16 x 4 x 16 split them over warps: 244 bar.sync in
    the backward against 70)."""
    heads = triton.next_power_of_2(n_head)
    queries = min(8, max(1, 128 // heads))
    return heads, queries, max(8, TILE // (heads * queries))


def use_kernels(x):
    return triton is not None and (x.is_cuda or (INTERPRET and x.device.type == "cpu"))


# -----------------------------------------------------------------------------
# the kernels: program (query block, batch row), all heads; tiles are (heads, queries, keys)

if triton is not None:
    @triton.jit
    def factor_row(ptr, b, pos, pos_mask, row, heads, head_mask, L, N, ROWS: tl.constexpr, AT_KEY: tl.constexpr):
        """Row `row` of the factors (B, L, ROWS, N) at positions pos, as (heads, 1, keys) at the key
        or (heads, queries, 1) at the query."""
        w = tl.load(ptr + ((b * L + pos[None, :]) * ROWS + row) * N + heads[:, None],
                    mask=head_mask[:, None] & pos_mask[None, :], other=0.0)
        return w[:, None, :] if AT_KEY else w[:, :, None]

    @triton.jit
    def mix_heads(x, out, ptr, b, pos, pos_mask, heads, head_mask, L, N,
                  R: tl.constexpr, AT_KEY: tl.constexpr, ADJOINT: tl.constexpr, ACC: tl.constexpr):
        """out + one side's part of Compose(x) (ADJOINT: of its adjoint, w1 and w2 swapped)."""
        ROWS: tl.constexpr = 2 * R + 1
        out += x * factor_row(ptr, b, pos, pos_mask, 2 * R, heads, head_mask, L, N, ROWS, AT_KEY).to(ACC)
        for i in tl.static_range(R):
            w_in = factor_row(ptr, b, pos, pos_mask, R + i if ADJOINT else i, heads, head_mask, L, N, ROWS, AT_KEY).to(ACC)
            w_out = factor_row(ptr, b, pos, pos_mask, i if ADJOINT else R + i, heads, head_mask, L, N, ROWS, AT_KEY).to(ACC)
            out += w_out * tl.sum(x * w_in, axis=0)[None, :, :]
        return out

    @triton.jit
    def compose_tile(x, q_ptr, k_ptr, b, t, s, t_mask, s_mask, heads, head_mask, T, S, N,
                     R: tl.constexpr, HAS_Q: tl.constexpr, HAS_K: tl.constexpr, ADJOINT: tl.constexpr, ACC: tl.constexpr):
        """Compose (or its adjoint) of a (heads, queries, keys) tile; no factors = the identity."""
        out = x
        if HAS_Q:
            out = mix_heads(x, out, q_ptr, b, t, t_mask, heads, head_mask, T, N, R, False, ADJOINT, ACC)
        if HAS_K:
            out = mix_heads(x, out, k_ptr, b, s, s_mask, heads, head_mask, S, N, R, True, ADJOINT, ACC)
        return out

    @triton.jit
    def add_factor_grads(x, g, grad_ptr, ptr, b, pos, pos_mask, heads, head_mask, L, N,
                         R: tl.constexpr, AT_KEY: tl.constexpr, ACC: tl.constexpr):
        """One side's factor gradients from this tile (x: Compose's input, g: the gradient at its
        output), summed over the tile's keys (at the query) or queries (at the key), added to grad_ptr."""
        ROWS: tl.constexpr = 2 * R + 1
        axis: tl.constexpr = 1 if AT_KEY else 2
        where = grad_ptr + ((b * L + pos[None, :]) * ROWS) * N + heads[:, None]   # row 0's (heads, positions)
        mask = head_mask[:, None] & pos_mask[None, :]
        # relaxed: no memory fence per add (acq_rel, the default, fences and flushes L1 each time);
        # the kernel's end orders them for whoever reads the sums
        tl.atomic_add(where + 2 * R * N, tl.sum(x * g, axis=axis), mask=mask, sem="relaxed")  # d dd
        for i in tl.static_range(R):
            w1 = factor_row(ptr, b, pos, pos_mask, i, heads, head_mask, L, N, ROWS, AT_KEY).to(ACC)
            w2 = factor_row(ptr, b, pos, pos_mask, R + i, heads, head_mask, L, N, ROWS, AT_KEY).to(ACC)
            h = tl.sum(x * w1, axis=0)[None, :, :]                                 # Σ_n w1[i, n] x[n]
            e = tl.sum(g * w2, axis=0)[None, :, :]                                 # Σ_m w2[i, m] G[m]
            tl.atomic_add(where + (R + i) * N, tl.sum(h * g, axis=axis), mask=mask, sem="relaxed")  # d w2[i]
            tl.atomic_add(where + i * N, tl.sum(x * e, axis=axis), mask=mask, sem="relaxed")        # d w1[i]

    @triton.jit
    def visible(t, s, t_mask, s_mask, offset, window):
        """(1, queries, keys): may query t (at key position t + offset) see key s (causal, windowed)."""
        t_pos = t[:, None] + offset
        ok = (s[None, :] <= t_pos) & t_mask[:, None] & s_mask[None, :]
        if window > 0:
            ok = ok & (s[None, :] > t_pos - window)
        return ok[None, :, :]

    @triton.jit
    def last_blocks_first():
        """This program's block of queries, the last first: later queries see more keys, so the
        longest programs start first and the shortest fill the tail."""
        return tl.num_programs(0) - 1 - tl.program_id(0)

    @triton.jit
    def key_blocks(t0, offset, window, S, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
        """[first, end) of the keys that the queries t0 .. t0 + BLOCK_T - 1 may see, first on a block edge."""
        end = tl.minimum(S, t0 + BLOCK_T + offset)
        first = 0
        if window > 0:
            first = tl.maximum(0, t0 + offset - window + 1) // BLOCK_S * BLOCK_S
        return first, end

    @triton.jit
    def store_zeros(ptr, b, t, t_mask, heads, head_mask, lo, hi, T, S, N,
                    NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
        """Zeros in the keys [lo, hi) of the queries t: the blocks that no query of the program sees."""
        for s0 in range(lo, hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            offs = ((b * N + heads[:, None, None]) * T + t[None, :, None]) * S + s[None, None, :]
            mask = head_mask[:, None, None] & t_mask[None, :, None] & ((s < hi) & (s < S))[None, None, :]
            tl.store(ptr + offs, tl.zeros((NP, BLOCK_T, BLOCK_S), dtype=ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def composed_logits(logits_ptr, pre_q, pre_k, b, t, s, t_mask, s_mask, heads, head_mask, T, S, N, offset, window,
                        R: tl.constexpr, HAS_PRE_Q: tl.constexpr, HAS_PRE_K: tl.constexpr, ACC: tl.constexpr):
        """The tile's logits a and mask(Compose_pre(a)), -inf where the query may not see the key."""
        offs = ((b * N + heads[:, None, None]) * T + t[None, :, None]) * S + s[None, None, :]
        tile_mask = head_mask[:, None, None] & t_mask[None, :, None] & s_mask[None, None, :]
        a = tl.load(logits_ptr + offs, mask=tile_mask, other=0.0).to(ACC)
        x = compose_tile(a, pre_q, pre_k, b, t, s, t_mask, s_mask, heads, head_mask, T, S, N,
                         R, HAS_PRE_Q, HAS_PRE_K, False, ACC)
        x = tl.where(visible(t, s, t_mask, s_mask, offset, window), x, float("-inf"))
        return a, x, offs, tile_mask

    @triton.jit
    def compose_backward(x, g, q_factors, k_factors, grad_q, grad_k, b, t, s, t_mask, s_mask, heads, head_mask,
                         T, S, N, R: tl.constexpr, HAS_Q: tl.constexpr, HAS_K: tl.constexpr, ACC: tl.constexpr):
        """Compose's backward at a tile, from its input x and G = d/dCompose(x): adds the factor sets'
        gradients (at the queries, at the keys) and returns d/dx = Composeᵀ(G)."""
        if HAS_Q:
            add_factor_grads(x, g, grad_q, q_factors, b, t, t_mask, heads, head_mask, T, N, R, False, ACC)
        if HAS_K:
            add_factor_grads(x, g, grad_k, k_factors, b, s, s_mask, heads, head_mask, S, N, R, True, ACC)
        return compose_tile(g, q_factors, k_factors, b, t, s, t_mask, s_mask, heads, head_mask, T, S, N,
                            R, HAS_Q, HAS_K, True, ACC)

    @triton.jit
    def probs_and_grad(logits_ptr, lse, grad_ptr, pre_q, pre_k, b, t, s, t_mask, s_mask, heads, head_mask, T, S, N,
                       offset, window, R: tl.constexpr, HAS_PRE_Q: tl.constexpr, HAS_PRE_K: tl.constexpr,
                       ACC: tl.constexpr):
        """The backward's tile: the logits a, the probabilities p = exp(mask(Compose_pre(a)) - lse)
        from the forward's log-sum-exp (heads, queries, 1), and G = d/dprobs."""
        a, x, offs, tile_mask = composed_logits(logits_ptr, pre_q, pre_k, b, t, s, t_mask, s_mask, heads, head_mask,
                                                T, S, N, offset, window, R, HAS_PRE_Q, HAS_PRE_K, ACC)
        p = tl.exp(x - lse)
        g = tl.load(grad_ptr + offs, mask=tile_mask, other=0.0).to(ACC)
        return a, p, g, offs, tile_mask

    @triton.jit
    def compose_softmax_compose_kernel(logits_ptr, pre_q, pre_k, post_q, post_k, probs_ptr, lse_ptr,
                                       T, S, N, offset, window,
                                       R: tl.constexpr, HAS_PRE_Q: tl.constexpr, HAS_PRE_K: tl.constexpr,
                                       HAS_POST_Q: tl.constexpr, HAS_POST_K: tl.constexpr, ACC: tl.constexpr,
                                       NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
        """probs = Compose_post(softmax(mask(Compose_pre(logits)))) and the softmax's log-sum-exp,
        for BLOCK_T queries of one batch row, all heads: two walks over the keys."""
        b, t0 = tl.program_id(1), last_blocks_first() * BLOCK_T
        t = t0 + tl.arange(0, BLOCK_T)
        heads = tl.arange(0, NP)
        t_mask, head_mask = t < T, heads < N
        first, end = key_blocks(t0, offset, window, S, BLOCK_T, BLOCK_S)
        # walk 1: each head's row maximum and sum of exponentials, online (flash attention's)
        row_max = tl.full((NP, BLOCK_T), float("-inf"), ACC)
        row_sum = tl.zeros((NP, BLOCK_T), ACC)
        for s0 in range(first, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            a, x, offs, tile_mask = composed_logits(logits_ptr, pre_q, pre_k, b, t, s, t_mask, s < S, heads, head_mask,
                                                    T, S, N, offset, window, R, HAS_PRE_Q, HAS_PRE_K, ACC)
            new_max = tl.maximum(row_max, tl.max(x, axis=2))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)           # nothing seen yet: no NaN
            row_sum = row_sum * tl.exp(row_max - safe_max) + tl.sum(tl.exp(x - safe_max[:, :, None]), axis=2)
            row_max = new_max
        lse = tl.where(row_sum > 0, row_max + tl.log(tl.where(row_sum > 0, row_sum, 1.0)), 0.0)  # (heads, queries)
        lse_mask = head_mask[:, None] & t_mask[None, :]
        tl.store(lse_ptr + (b * N + heads[:, None]) * T + t[None, :], lse, mask=lse_mask)
        # walk 2: the probabilities, composed, written once
        for s0 in range(first, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_mask = s < S
            a, x, offs, tile_mask = composed_logits(logits_ptr, pre_q, pre_k, b, t, s, t_mask, s_mask, heads, head_mask,
                                                    T, S, N, offset, window, R, HAS_PRE_Q, HAS_PRE_K, ACC)
            p = tl.exp(x - lse[:, :, None])
            p = compose_tile(p, post_q, post_k, b, t, s, t_mask, s_mask, heads, head_mask, T, S, N,
                             R, HAS_POST_Q, HAS_POST_K, False, ACC)
            tl.store(probs_ptr + offs, p.to(probs_ptr.dtype.element_ty), mask=tile_mask)
        store_zeros(probs_ptr, b, t, t_mask, heads, head_mask, 0, first, T, S, N, NP, BLOCK_T, BLOCK_S)
        store_zeros(probs_ptr, b, t, t_mask, heads, head_mask, end, S, T, S, N, NP, BLOCK_T, BLOCK_S)

    @triton.jit
    def compose_softmax_compose_backward_kernel(logits_ptr, lse_ptr, grad_ptr, pre_q, pre_k, post_q, post_k,
                                                grad_logits_ptr, grad_pre_q, grad_pre_k, grad_post_q, grad_post_k,
                                                T, S, N, offset, window,
                                                R: tl.constexpr, HAS_PRE_Q: tl.constexpr, HAS_PRE_K: tl.constexpr,
                                                HAS_POST_Q: tl.constexpr, HAS_POST_K: tl.constexpr, ACC: tl.constexpr,
                                                NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
        """From G = d/dprobs: d/dlogits (written once) and the four factor sets' gradients (added to
        the zeroed grad_* buffers). Walk 1: the softmax's row terms δ_n(t) = Σ_s p_n dp_n, where
        dp = Compose_postᵀ(G); walk 2: dx = p (dp - δ), d/dlogits = Compose_preᵀ(dx), and the factors'."""
        b, t0 = tl.program_id(1), last_blocks_first() * BLOCK_T
        t = t0 + tl.arange(0, BLOCK_T)
        heads = tl.arange(0, NP)
        t_mask, head_mask = t < T, heads < N
        first, end = key_blocks(t0, offset, window, S, BLOCK_T, BLOCK_S)
        lse = tl.load(lse_ptr + (b * N + heads[:, None]) * T + t[None, :],
                      mask=head_mask[:, None] & t_mask[None, :], other=0.0).to(ACC)[:, :, None]
        delta = tl.zeros((NP, BLOCK_T), ACC)
        for s0 in range(first, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_mask = s < S
            a, p, g, offs, tile_mask = probs_and_grad(logits_ptr, lse, grad_ptr, pre_q, pre_k, b, t, s, t_mask, s_mask,
                                                      heads, head_mask, T, S, N, offset, window, R, HAS_PRE_Q, HAS_PRE_K, ACC)
            dp = compose_tile(g, post_q, post_k, b, t, s, t_mask, s_mask, heads, head_mask, T, S, N,
                              R, HAS_POST_Q, HAS_POST_K, True, ACC)
            delta += tl.sum(p * dp, axis=2)
        for s0 in range(first, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_mask = s < S
            a, p, g, offs, tile_mask = probs_and_grad(logits_ptr, lse, grad_ptr, pre_q, pre_k, b, t, s, t_mask, s_mask,
                                                      heads, head_mask, T, S, N, offset, window, R, HAS_PRE_Q, HAS_PRE_K, ACC)
            dp = compose_backward(p, g, post_q, post_k, grad_post_q, grad_post_k, b, t, s, t_mask, s_mask,
                                  heads, head_mask, T, S, N, R, HAS_POST_Q, HAS_POST_K, ACC)
            dx = p * (dp - delta[:, :, None])                                      # the softmax's backward
            da = compose_backward(a, dx, pre_q, pre_k, grad_pre_q, grad_pre_k, b, t, s, t_mask, s_mask,
                                  heads, head_mask, T, S, N, R, HAS_PRE_Q, HAS_PRE_K, ACC)
            tl.store(grad_logits_ptr + offs, da.to(grad_logits_ptr.dtype.element_ty), mask=tile_mask)
        store_zeros(grad_logits_ptr, b, t, t_mask, heads, head_mask, 0, first, T, S, N, NP, BLOCK_T, BLOCK_S)
        store_zeros(grad_logits_ptr, b, t, t_mask, heads, head_mask, end, S, T, S, N, NP, BLOCK_T, BLOCK_S)


# -----------------------------------------------------------------------------
# launching: the factor sets that are None are left out (HAS_*), their pointers stand in by another tensor

def accumulator_dtype(logits):
    """What the kernels compute in: float64 for float64 logits (the exactness tests), else float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def kernel_args(logits, factors, offset, window):
    B, N, T, S = logits.shape
    if logits.numel() >= 2**31:  # the kernels index with int32
        raise ValueError(f"the DCMHA kernel takes fewer than 2**31 scores a chunk, got {B} x {N} x {T} x {S}: "
                         f"use a smaller batch or query_chunk, or dc_compose=factors")
    present = [f for f in factors if f is not None]
    R = (present[0].size(-2) - 1) // 2 if present else 1
    flags = dict(zip(("HAS_PRE_Q", "HAS_PRE_K", "HAS_POST_Q", "HAS_POST_K"), (f is not None for f in factors)))
    wide = tl.float64 if accumulator_dtype(logits) == torch.float64 else tl.float32
    NP, BLOCK_T, BLOCK_S = block_sizes(N)
    consts = dict(R=R, **flags, ACC=wide, NP=NP, BLOCK_T=BLOCK_T, BLOCK_S=BLOCK_S)
    return (triton.cdiv(T, BLOCK_T), B), (T, S, N, offset, window), consts


def contiguous(factors, stand_in):
    return [stand_in if f is None else f.contiguous() for f in factors]


def forward_kernels(logits, factors, offset, window):
    logits = logits.contiguous()
    grid, sizes, consts = kernel_args(logits, factors, offset, window)
    probs = torch.empty_like(logits)
    lse = torch.empty(logits.shape[:3], dtype=accumulator_dtype(logits), device=logits.device)
    compose_softmax_compose_kernel[grid](logits, *contiguous(factors, logits), probs, lse, *sizes, **consts,
                                         num_warps=NUM_WARPS)
    return probs, lse


def backward_kernels(grad, logits, lse, factors, offset, window):
    logits, grad = logits.contiguous(), grad.contiguous()
    grid, sizes, consts = kernel_args(logits, factors, offset, window)
    grad_logits = torch.empty_like(logits)
    wide = accumulator_dtype(logits)
    grad_factors = [None if f is None else torch.zeros(f.shape, dtype=wide, device=f.device) for f in factors]
    compose_softmax_compose_backward_kernel[grid](logits, lse, grad, *contiguous(factors, logits), grad_logits,
                                                  *contiguous(grad_factors, lse), *sizes, **consts, num_warps=NUM_WARPS)
    return grad_logits, [None if g is None else g.to(f.dtype) for g, f in zip(grad_factors, factors)]


# -----------------------------------------------------------------------------
# the same function with torch: the CPU's path and the tests' reference

def reference(logits, factors, offset, window):
    """(probs (B, N, T, S), lse (B, N, T)) as dcmha.attend_chunk computes them (dc_compose=factors)."""
    import dcmha
    import gpt
    pre_q, pre_k, post_q, post_k = factors
    T, S = logits.shape[-2:]
    mask = gpt.causal_mask(T, S, offset, window or None, logits.device)            # (T, S)
    x = logits.transpose(1, 2)                                                      # (B, T, N, S)
    x = dcmha.compose_factors(x, pre_q, pre_k, None).masked_fill(~mask[:, None], float("-inf"))
    wide = torch.promote_types(x.dtype, torch.float32)
    lse = torch.logsumexp(x.to(wide), dim=-1)                                       # (B, T, N)
    probs = dcmha.compose_factors(torch.softmax(x, dim=-1, dtype=wide).to(logits.dtype), post_q, post_k, None)
    return probs.transpose(1, 2).to(logits.dtype), lse.transpose(1, 2)


def swap_factors(factors):
    """[w1; w2; dd] -> [w2; w1; dd]: Compose with these is the adjoint of Compose with those."""
    if factors is None:
        return None
    R = factors.size(-2) // 2
    return torch.cat([factors[..., R:2 * R, :], factors[..., :R, :], factors[..., 2 * R:, :]], dim=-2)


def factor_gradients(x, g, factors, at_key):
    """One factor set's gradient (B, T|S, 2R+1, N) from x (Compose's input) and g (the gradient at
    its output), both (B, T, N, S): sums over the keys (at the query) or the queries (at the key)."""
    import dcmha
    w1, w2, _ = dcmha.split_factors(factors)                                      # (B, L, R, N)
    pos = "s" if at_key else "t"
    h = torch.einsum(f"b{pos}in,btns->btis", w1, x)                                 # Σ_n w1[i, n] x[n]
    e = torch.einsum(f"b{pos}im,btms->btis", w2, g)                                 # Σ_m w2[i, m] G[m]
    d_w1 = torch.einsum(f"btns,btis->b{pos}in", x, e)
    d_w2 = torch.einsum(f"btis,btms->b{pos}im", h, g)
    d_dd = torch.einsum(f"btms,btms->b{pos}m", x, g)
    return torch.cat([d_w1, d_w2, d_dd[:, :, None]], dim=-2)


def reference_backward(grad, logits, lse, factors, offset, window):
    """d/dlogits and the factors' gradients with torch, the kernel's formulas (module docstring)."""
    import dcmha
    import gpt
    wide = torch.promote_types(logits.dtype, torch.float32)
    pre_q, pre_k, post_q, post_k = [None if f is None else f.to(wide) for f in factors]
    T, S = logits.shape[-2:]
    mask = gpt.causal_mask(T, S, offset, window or None, logits.device)            # (T, S)
    a, g = logits.to(wide).transpose(1, 2), grad.to(wide).transpose(1, 2)           # (B, T, N, S)
    x = dcmha.compose_factors(a, pre_q, pre_k, None).masked_fill(~mask[:, None], float("-inf"))
    p = torch.exp(x - lse.to(wide).transpose(1, 2)[..., None])                      # the softmax, 0 where masked
    dp = dcmha.compose_factors(g, swap_factors(post_q), swap_factors(post_k), None)  # Compose_postᵀ(G)
    dx = p * (dp - (p * dp).sum(-1, keepdim=True))                                  # the softmax's backward
    grad_logits = dcmha.compose_factors(dx, swap_factors(pre_q), swap_factors(pre_k), None)
    grad_factors = [None if f is None else factor_gradients(x_in, g_out, f, at_key)
                    for f, x_in, g_out, at_key in ((pre_q, a, dx, False), (pre_k, a, dx, True),
                                                   (post_q, p, g, False), (post_k, p, g, True))]
    return (grad_logits.transpose(1, 2).to(logits.dtype),
            [None if g is None else g.to(f.dtype) for g, f in zip(grad_factors, factors)])


# -----------------------------------------------------------------------------
# the custom ops: what torch.compile sees

@torch.library.custom_op("dcmha::compose_softmax_compose", mutates_args=())
def compose_softmax_compose(logits: torch.Tensor, pre_query: torch.Tensor | None, pre_key: torch.Tensor | None,
                            post_query: torch.Tensor | None, post_key: torch.Tensor | None,
                            offset: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, N, T, S), each factor set (B, T|S, 2R+1, N) = [w1; w2; dd] or None; query t sits at
    key position t + offset and sees the keys s <= t + offset (the last `window` of them, window > 0).
    -> (probs (B, N, T, S) in the logits' dtype, the softmax's log-sum-exp (B, N, T), for the backward)."""
    factors = (pre_query, pre_key, post_query, post_key)
    T, S = logits.shape[-2:]
    if not 0 <= offset <= S - T:  # every query sees a key; the kernels' zero-filled blocks assume it
        raise ValueError(f"offset={offset}: the {T} queries must sit among the {S} keys (0 <= offset <= S - T = {S - T})")
    if not use_kernels(logits):
        probs, lse = reference(logits, factors, offset, window)
        return probs.contiguous(), lse.contiguous()
    return forward_kernels(logits, factors, offset, window)


@compose_softmax_compose.register_fake
def _(logits, pre_query, pre_key, post_query, post_key, offset, window):
    return logits.new_empty(logits.shape), logits.new_empty(logits.shape[:3], dtype=accumulator_dtype(logits))


@torch.library.custom_op("dcmha::compose_softmax_compose_backward", mutates_args=())
def compose_softmax_compose_backward(grad: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor,
                                     pre_query: torch.Tensor | None, pre_key: torch.Tensor | None,
                                     post_query: torch.Tensor | None, post_key: torch.Tensor | None,
                                     offset: int, window: int) -> list[torch.Tensor]:
    """[d/dlogits, d/dpre_query, d/dpre_key, d/dpost_query, d/dpost_key] (empty for a None set)."""
    factors = (pre_query, pre_key, post_query, post_key)
    if not use_kernels(logits):
        grad_logits, grad_factors = reference_backward(grad, logits, lse, factors, offset, window)
    else:
        grad_logits, grad_factors = backward_kernels(grad, logits, lse, factors, offset, window)
    return [grad_logits.contiguous(), *(logits.new_empty(0) if g is None else g.contiguous() for g in grad_factors)]


@compose_softmax_compose_backward.register_fake
def _(grad, logits, lse, pre_query, pre_key, post_query, post_key, offset, window):
    return [logits.new_empty(logits.shape),  # all outputs contiguous, as the op's
            *(logits.new_empty(0) if f is None else f.new_empty(f.shape) for f in (pre_query, pre_key, post_query, post_key))]


def setup_context(ctx, inputs, output):
    logits, *factors, offset, window = inputs
    ctx.mark_non_differentiable(output[1])  # the log-sum-exp is for the backward only
    ctx.present = [f is not None for f in factors]
    ctx.offset, ctx.window = offset, window
    ctx.save_for_backward(logits, output[1], *factors)


def backward(ctx, grad_probs, _grad_lse):
    logits, lse, *factors = ctx.saved_tensors
    factors = [f if present else None for f, present in zip(factors, ctx.present)]
    grad_logits, *grad_factors = compose_softmax_compose_backward(grad_probs, logits, lse, *factors, ctx.offset, ctx.window)
    return (grad_logits, *(g if present else None for g, present in zip(grad_factors, ctx.present)), None, None)


compose_softmax_compose.register_autograd(backward, setup_context=setup_context)

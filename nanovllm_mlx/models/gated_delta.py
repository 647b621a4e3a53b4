"""Gated DeltaNet, the linear-attention layer of Qwen3.5 and Qwen3-Next, over the engine's
state pool (attention/state.py), in pure MLX.

Per token t and value head: the state S [key_dim, value_dim] decays by exp(g_t), is
corrected towards v_t along k_t with strength beta_t (the delta rule), and is read by q_t:
    S = exp(g_t) S;  S += k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t
with q and k L2-normalized and q scaled by key_dim^-1/2, after a causal depthwise
convolution (kernel K, SiLU) over the concatenated q/k/v projections.

Decodes take one such step, all sequences of the batch at once. A prefill chunk runs the
same recurrence chunk-wise (`chunked`): within CHUNK tokens the delta rule is a
triangular system, solved with matmuls alone, so the only sequential loop is over
chunks; it equals the token-by-token recurrence (tests/test_gated_delta.py).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from nanovllm_mlx.attention.state import Segment, StateCache, StateSteps

CHUNK = 64  # tokens per chunk of a prefill's recurrence: [heads, 64, 64] matmuls


def l2_normalize(x: mx.array, eps: float = 1e-6) -> mx.array:
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)


def recurrent_step(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> tuple[mx.array, mx.array]:
    """One token of each of B sequences: q, k [B, H, Dk], v [B, H, Dv], g, beta [B, H],
    state [B, H, Dk, Dv] -> (output [B, H, Dv], new state)."""
    state = state * mx.exp(g)[..., None, None]
    remembered = (state * k[..., None]).sum(axis=-2)
    delta = (v - remembered) * beta[..., None]
    state = state + k[..., None] * delta[..., None, :]
    return (state * q[..., None]).sum(axis=-2), state


def _unit_lower_inverse(a: mx.array) -> mx.array:
    """(I + A)^-1 for strictly lower-triangular A [H, n, n], by blocks: the inverses of
    the diagonal blocks of size s give those of size 2s, [[P, 0], [C, Q]]^-1 being
    [[P^-1, 0], [-Q^-1 C P^-1, Q^-1]], log2(n) rounds of batched matmuls. (The power
    series of -A, shorter still, loses everything to cancellation when keys repeat: a
    run of one token made it NaN. MLX's triangular solve runs on the CPU only.)"""
    heads, n = a.shape[0], a.shape[-1]
    size = 1 << max(n - 1, 0).bit_length()
    m = mx.eye(size, dtype=a.dtype)[None] + mx.pad(a, [(0, 0), (0, size - n), (0, size - n)])
    blocks = mx.ones((heads, size, 1, 1), dtype=a.dtype)  # inverses of the 1x1 blocks
    s = 1
    while s < size:
        count = size // (2 * s)
        # The diagonal 2s-blocks of m, [H, count, 2s, 2s]; their lower-left s-blocks.
        grid = m.reshape(heads, count, 2 * s, count, 2 * s).swapaxes(2, 3)
        diag = mx.take(grid.reshape(heads, count * count, 2 * s, 2 * s),
                       mx.arange(count) * (count + 1), axis=1)  # fmt: skip
        upper, lower = blocks[:, 0::2], blocks[:, 1::2]
        corner = -(lower @ diag[:, :, s:, :s] @ upper)
        top = mx.concatenate([upper, mx.zeros_like(upper)], axis=-1)
        bottom = mx.concatenate([corner, lower], axis=-1)
        blocks = mx.concatenate([top, bottom], axis=-2)
        s *= 2
    return blocks[:, 0, :n, :n]


def chunked(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array,
    chunk: int = CHUNK,
) -> tuple[mx.array, mx.array]:
    """The recurrence over L tokens of one sequence: q, k [H, L, Dk], v [H, L, Dv],
    g, beta [H, L], state [H, Dk, Dv] -> (outputs [H, L, Dv], final state).

    Within a chunk with cumulative log-decay c_i, the corrections u_i the delta rule adds
    solve (I + A) u = beta v - beta exp(c) k S0, A_ij = beta_i (k_i . k_j) exp(c_i - c_j)
    for j < i; then o_i = exp(c_i) q_i S0 + sum_{j<=i} exp(c_i - c_j)(q_i . k_j) u_j."""
    outputs = []
    length = q.shape[1]
    for lo in range(0, length, chunk):
        hi = min(lo + chunk, length)
        qc, kc, vc, bc = q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], beta[:, lo:hi, None]
        cum = mx.cumsum(g[:, lo:hi], axis=-1)  # [H, n]
        n = hi - lo
        diff = cum[:, :, None] - cum[:, None, :]  # c_i - c_j
        upper = mx.triu(mx.ones((n, n), dtype=mx.bool_), k=1)
        # Masked before exp: c_i - c_j > 0 above the diagonal and may overflow.
        decay = mx.exp(mx.where(upper, -mx.inf, diff))  # j <= i
        strict = decay * (1 - mx.eye(n, dtype=decay.dtype))
        kb = kc * bc
        solve = _unit_lower_inverse((kb @ kc.transpose(0, 2, 1)) * strict)
        grow = mx.exp(cum)[..., None]
        u = solve @ (vc * bc) - (solve @ (kb * grow)) @ state
        scores = (qc @ kc.transpose(0, 2, 1)) * decay
        outputs.append((qc * grow) @ state + scores @ u)
        last = cum[:, -1:]
        tail = mx.exp(last - cum)[..., None]  # decay from each token to the chunk's end
        state = mx.exp(last)[..., None] * state + (kc * tail).transpose(0, 2, 1) @ u
    return mx.concatenate(outputs, axis=1), state


class GatedDeltaNet(nn.Module):
    """The token mixer of a linear-attention layer: flat tokens [T, D] -> [T, D], reading
    and writing each sequence's state in its slot of `cache`."""

    def __init__(
        self,
        hidden_size: int,
        num_k_heads: int,
        num_v_heads: int,
        head_k_dim: int,
        head_v_dim: int,
        conv_kernel: int,
        eps: float,
    ):
        super().__init__()
        if num_v_heads % num_k_heads:
            raise ValueError(
                f"linear_num_value_heads {num_v_heads} is not a multiple of "
                f"linear_num_key_heads {num_k_heads}"
            )
        self.num_k_heads, self.num_v_heads = num_k_heads, num_v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.key_dim, self.value_dim = num_k_heads * head_k_dim, num_v_heads * head_v_dim
        self.conv_kernel = conv_kernel
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.in_proj_qkv = nn.Linear(hidden_size, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden_size, num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden_size, num_v_heads, bias=False)
        # MLX's Conv1d layout [channels, K, 1] (mlx-lm's too); the depthwise taps are
        # applied by hand, per sequence, with its conv state in front.
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim, bias=False
        )
        self.dt_bias = mx.ones(num_v_heads)
        self.A_log = mx.zeros(num_v_heads)
        self.norm = nn.RMSNorm(head_v_dim, eps=eps)  # then gated by silu(z)
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per slot: the conv state's and the recurrent state's shapes."""
        return (self.conv_kernel - 1, self.conv_dim), (
            self.num_v_heads,
            self.head_k_dim,
            self.head_v_dim,
        )

    def _conv(self, window: mx.array) -> mx.array:
        """window [..., n + K - 1, C] (state in front) -> silu(conv) [..., n, C]."""
        taps = self.conv1d.weight[:, :, 0].T  # [K, C]
        n = window.shape[-2] - self.conv_kernel + 1
        out = window[..., 0:n, :] * taps[0]
        for i in range(1, self.conv_kernel):
            out = out + window[..., i : i + n, :] * taps[i]
        return nn.silu(out)

    def _heads(self, mixed: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """[..., C] conv output -> q, k [..., Hv, Dk] (normalized, key heads repeated for
        their value heads) and v [..., Hv, Dv], float32."""
        lead = mixed.shape[:-1]
        q, k, v = mx.split(mixed.astype(mx.float32), [self.key_dim, 2 * self.key_dim], axis=-1)
        q = q.reshape(*lead, self.num_k_heads, self.head_k_dim)
        k = k.reshape(*lead, self.num_k_heads, self.head_k_dim)
        repeat = self.num_v_heads // self.num_k_heads
        if repeat > 1:
            q, k = mx.repeat(q, repeat, axis=-2), mx.repeat(k, repeat, axis=-2)
        q = l2_normalize(q) * self.head_k_dim**-0.5
        return q, l2_normalize(k), v.reshape(*lead, self.num_v_heads, self.head_v_dim)

    def __call__(self, x: mx.array, cache: StateCache, steps: StateSteps) -> mx.array:
        t = x.shape[0]
        mixed = self.in_proj_qkv(x)
        beta = mx.sigmoid(self.in_proj_b(x).astype(mx.float32))
        a = self.in_proj_a(x).astype(mx.float32)
        g = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(a + self.dt_bias)
        outputs = []
        d = steps.num_decode
        if d:
            outputs.append(self._decode(mixed[:d], g[:d], beta[:d], cache, steps))
        for seg in steps.prefills:
            at = slice(seg.offset, seg.offset + seg.length)
            outputs.append(self._prefill(mixed[at], g[at], beta[at], cache, seg))
        core = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)
        z = self.in_proj_z(x).reshape(t, self.num_v_heads, self.head_v_dim)
        core = self.norm(core.astype(x.dtype)) * nn.silu(z)
        return self.out_proj(core.reshape(t, self.value_dim))

    def _decode(
        self, mixed: mx.array, g: mx.array, beta: mx.array, cache: StateCache, steps: StateSteps
    ) -> mx.array:
        # Where, not a product: a slot's old contents (NaN, say) never leak into a fresh
        # state.
        fresh = steps.decode_fresh
        conv = mx.where(fresh[:, None, None], 0, cache.conv[steps.decode_slots])
        window = mx.concatenate([conv, mixed[:, None].astype(conv.dtype)], axis=1)
        q, k, v = self._heads(self._conv(window)[:, 0])
        state = mx.where(fresh[:, None, None, None], 0, cache.ssm[steps.decode_slots])
        out, state = recurrent_step(q, k, v, g, beta, state)
        new_conv = window[:, 1:]
        cache.write(steps.decode_slots, new_conv, state)
        if steps.save_rows is not None and steps.save_slots is not None:
            rows = steps.save_rows
            cache.write(steps.save_slots, new_conv[rows], state[rows])
        return out

    def _prefill(
        self, mixed: mx.array, g: mx.array, beta: mx.array, cache: StateCache, seg: Segment
    ) -> mx.array:
        k_1 = self.conv_kernel - 1
        if seg.fresh:
            conv = mx.zeros((k_1, self.conv_dim), dtype=cache.conv.dtype)
            state = mx.zeros(cache.ssm.shape[1:], dtype=cache.ssm.dtype)
        else:
            conv, state = cache.conv[seg.slot], cache.ssm[seg.slot]
        window = mx.concatenate([conv, mixed.astype(conv.dtype)], axis=0)
        q, k, v = (a.transpose(1, 0, 2) for a in self._heads(self._conv(window)))
        g, beta = g.T, beta.T
        saves = dict(seg.saves)
        cuts = sorted({0, seg.length, *saves})
        outs = []
        for lo, hi in zip(cuts, cuts[1:]):
            part = (q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g[:, lo:hi], beta[:, lo:hi])
            out, state = chunked(*part, state)
            outs.append(out)
            if hi in saves:  # a snapshot: the state after hi tokens
                slot = mx.array([saves[hi]], dtype=mx.int32)
                cache.write(slot, window[None, hi : hi + k_1], state[None])
        cache.write(mx.array([seg.slot], dtype=mx.int32), window[None, -k_1:], state[None])
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)
        return out.transpose(1, 0, 2)


def split_qwen3_next(
    weights: dict[str, mx.array], prefix: str, hk: int, dk: int, dv: int, hv: int
) -> dict[str, mx.array]:
    """Qwen3-Next's in_proj_qkvz / in_proj_ba are grouped by key head (each group: q, k,
    then its value heads' v and z; b then a): -> GatedDeltaNet's four projections
    (Qwen3.5's layout). Used by Qwen3.5's sanitize and the GGUF loader, whose files keep
    them fused."""
    qkvz = weights.pop(f"{prefix}.in_proj_qkvz.weight", None)
    ba = weights.pop(f"{prefix}.in_proj_ba.weight", None)
    if qkvz is None or ba is None:
        return weights
    per = hv // hk
    groups = qkvz.reshape(hk, 2 * dk + 2 * per * dv, -1)
    q, k, v, z = mx.split(groups, [dk, 2 * dk, 2 * dk + per * dv], axis=1)
    flat = [part.reshape(-1, qkvz.shape[-1]) for part in (q, k, v, z)]
    weights[f"{prefix}.in_proj_qkv.weight"] = mx.concatenate(flat[:3], axis=0)
    weights[f"{prefix}.in_proj_z.weight"] = flat[3]
    b, a_ = mx.split(ba.reshape(hk, 2 * per, -1), 2, axis=1)
    weights[f"{prefix}.in_proj_b.weight"] = b.reshape(-1, ba.shape[-1])
    weights[f"{prefix}.in_proj_a.weight"] = a_.reshape(-1, ba.shape[-1])
    return weights

"""Straightforward reference math, written independently of the package (per-head loops, explicit masks).

Everything follows the official MoSA code's layout: router ``r (E, h)``, ``qkv (E, h, 3d)`` with columns
``[q | k | v]``, ``o (E, d, h)``, dense heads ``W_QKV (3·d·n, h)`` head-major ``[q|k|v]``, ``W_O (h, d·n)``.
"""

import math

import torch


def ref_rope(x, pos, n_rot, base):
    """Rotate the first n_rot dims of x (..., T, d) at positions pos (T,), split-halves layout, float64 angles."""
    if n_rot == 0:
        return x
    j = torch.arange(n_rot // 2, dtype=torch.float64)
    inv = base ** (-2.0 * j / n_rot)
    ang = pos.to(torch.float64)[:, None] * inv[None, :]  # (T, R/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2, rest = x[..., : n_rot // 2], x[..., n_rot // 2 : n_rot], x[..., n_rot:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def n_rotate(d, fraction):
    n = int(fraction * d)
    return n - n % 2


def ref_k(T, sparsity):
    return min(max(int(T // sparsity), 2), T)


def ref_selection(scores_row, k, include_first):
    """Top-k of one head's sigmoid scores (T,), in torch.topk order, as the official code does."""
    if include_first:
        vals, idx = scores_row[1:].topk(k - 1)
        return torch.cat((scores_row[:1], vals)), torch.cat((torch.zeros(1, dtype=torch.long), idx + 1))
    return scores_row.topk(k)


def ref_mosa(x, r, qkv, o, sparsity, include_first=False, rotate_fraction=0.5, base=10000, gate="sigmoid"):
    """Per-batch, per-head loop over the MoSA heads; returns (B, T, h)."""
    B, T, h = x.shape
    E, d = r.shape[0], o.shape[1]
    k = ref_k(T, sparsity)
    nr = n_rotate(d, rotate_fraction)
    scores = torch.sigmoid(x @ r.t())  # (B, T, E)
    y = torch.zeros_like(x)
    for b in range(B):
        for e in range(E):
            vals, I = ref_selection(scores[b, :, e], k, include_first)
            if gate == "straight_through":
                vals = vals / vals.detach()
            X = x[b, I]  # (k, h)
            Q, K, V = X @ qkv[e][:, :d], X @ qkv[e][:, d : 2 * d], X @ qkv[e][:, 2 * d :]
            Q, K = ref_rope(Q, I, nr, base), ref_rope(K, I, nr, base)
            att = (Q @ K.t()) / math.sqrt(d)
            allowed = I[:, None] >= I[None, :]  # the paper's mask on original positions
            att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
            out = ((att @ V) * vals[:, None]) @ o[e]  # (k, h)
            y[b] = y[b].index_add(0, I, out)
    return y


def ref_dense(x, W_QKV, W_O, n_heads, rotate_fraction=0.5, base=10000, window=None):
    """Causal dense heads (partial RoPE), or with ``window`` the local-attention package's banded pattern
    (keys from the start of the previous window: max(0, (i // w - 1) * w) <= j <= i) with full-d RoPE."""
    B, T, h = x.shape
    d = W_QKV.shape[0] // (3 * n_heads)
    qkv = (x @ W_QKV.t()).view(B, T, n_heads, 3, d)
    pos = torch.arange(T)
    i, j = pos[:, None], pos[None, :]
    if window is None:
        allowed, nr, base = j <= i, n_rotate(d, rotate_fraction), base
    else:
        allowed, nr, base = (j <= i) & (j >= ((i // window - 1) * window).clamp(min=0)), d, 10000
    outs = []
    for hd in range(n_heads):
        Q, K, V = qkv[:, :, hd, 0], qkv[:, :, hd, 1], qkv[:, :, hd, 2]  # (B, T, d)
        Q, K = ref_rope(Q, pos, nr, base), ref_rope(K, pos, nr, base)
        att = (Q @ K.transpose(1, 2)) / math.sqrt(d)
        att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
        outs.append(att @ V)
    return torch.cat(outs, dim=-1) @ W_O.t()


def naive_layer(x, W, dense, mosa_heads, router, sparsity, scale, include_first, cos, sin, group, fill=None):
    """Reference for one converted Llama-style layer without biases/norms: dense heads by the explicit causal
    formula, each MoSA head with its own top-k (group heads share one selection when group > 1). ``fill``
    {head: (d,)}: a skipped token gets fill @ W_o, a selected one fill @ W_o + gate·(attention − fill) @ W_o."""
    B, T, D = x.shape
    H, KV, d = W.num_heads, W.num_kv_heads, W.head_dim
    kv_of = [h // (H // KV) for h in range(H)]
    R = cos.shape[-1]

    def rope(t, pos):  # t (n, d) at positions pos
        c, s = cos[0, pos], sin[0, pos]
        t1, t2 = t[:, : R // 2], t[:, R // 2: R]
        return torch.cat((t1 * c[:, : R // 2] - t2 * s[:, : R // 2], t2 * c[:, : R // 2] + t1 * s[:, : R // 2], t[:, R:]), -1)

    y = torch.zeros(B, T, D)
    for b in range(B):
        for h in dense:
            pos = torch.arange(T)
            q, k, v = x[b] @ W.wq[h].t(), x[b] @ W.wk[kv_of[h]].t(), x[b] @ W.wv[kv_of[h]].t()
            q, k = rope(q, pos), rope(k, pos)
            att = (q @ k.t() * scale).masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf).softmax(-1)
            y[b] += att @ v @ W.wo[:, h].t()
        for u, heads in enumerate([mosa_heads[i: i + group] for i in range(0, len(mosa_heads), group)]):
            logits = x[b] @ router[u]
            kk = min(max(int(T // sparsity), 2), T)
            if include_first:
                rest = logits[1:].topk(kk - 1).indices + 1
                I = torch.cat((torch.zeros(1, dtype=torch.long), rest))
            else:
                I = logits.topk(kk).indices
            gate = torch.sigmoid(logits[I])
            for h in heads:
                X = x[b, I]
                q, k, v = X @ W.wq[h].t(), X @ W.wk[kv_of[h]].t(), X @ W.wv[kv_of[h]].t()
                q, k = rope(q, I), rope(k, I)
                att = (q @ k.t() * scale).masked_fill(~(I[:, None] >= I[None, :]), -math.inf).softmax(-1)
                f = torch.zeros(d) if fill is None else fill[h]
                y[b] += f @ W.wo[:, h].t()
                y[b].index_add_(0, I, ((att @ v - f) * gate[:, None]) @ W.wo[:, h].t())
    return y

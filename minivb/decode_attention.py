"""The attention of a decode step, one of fast.py's speed paths (LLaMA's and T5's): F.scaled_dot_product_attention,
with a compiled path for one bf16 query a row on processors where compiled kernels pay (fast.compiled_rows_pay)."""

import functools

import torch
import torch.nn.functional as F

from .compiling import compiled_or_plain
from .fast import compiled_rows_pay


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))  # a decode token always sees itself
        else:
            scores = scores + mask.float()
    return scores.softmax(dim=-1)


def _attention_rows(q, k, v, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v in fp32, the batch folded into the heads: q (N, G, Dh), k and v (N, S, Dh)
    with N = batch x kv heads and G query heads per kv head; mask (N, G or 1, S), bool (True = attend) or added to
    the scores (T5's position bias). The plain path, where nothing compiles."""
    scores = q.float() @ k.float().transpose(-1, -2) * scale  # (N, G, S)
    return (_masked_softmax(scores, mask) @ v.float()).to(q.dtype)  # (N, G, Dh)


def _attention_rows_summed(q, k, v, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """_attention_rows with its products written as multiply-and-sum, what is compiled: faster loops over the bf16
    cache (native-bf16 machine, us a layer, matrix products / these: flan-t5-xl cross-attention, 32 heads of 64,
    160 keys: 136 / 91 at 1 row, 410 / 217 at 5 beams; a 7B's, 32 heads of 128, 160 keys: 153 / 139, 600 keys:
    361 / 329). Op by op they would hold (N, G, S, Dh) products in memory: the plain path keeps matrix products."""
    scores = (q[:, :, None].float() * k[:, None].float()).sum(-1) * scale  # (N, G, S): each query . each key
    weights = _masked_softmax(scores, mask)  # (N, G, S)
    return (weights[..., None] * v[:, None].float()).sum(-2).to(q.dtype)  # (N, G, Dh)


_compiled_attention_rows = functools.partial(compiled_or_plain, _attention_rows_summed, plain=_attention_rows)


def _explicit_attention(q, k, v, mask: torch.Tensor | None, scale: float | None = None, kernel=None):
    """F.scaled_dot_product_attention for one query a row, written out: q (B, H, 1, Dh), k and v (B, Hkv, S, Dh),
    mask (B or 1, 1 or H, 1, S) -> (B, H, 1, Dh). `kernel` runs _attention_rows (by default, op by op).

    The batch is folded into the kv heads (views of k and v held contiguous, as the caches hold them; the small mask
    is copied): a kernel sees the same kind of shapes for 1 row and 5 beams, where dynamo specialised a batch of 1
    and compiled again at the first beam step (7B 4 + 4 cut: 720 of its 848 ms; see `_compiled` on duck sizing)."""
    B, H, L, Dh = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    # .detach(): the same memory, no longer a view in dynamo's eyes, which would otherwise guard on the tensor each
    # comes from (the cache's buffer, whose batch and length differ between greedy decoding and beams).
    queries = q.reshape(B * Hkv, H // Hkv, Dh).detach()  # (N, G, Dh): query heads grouped by kv head
    keys, values = k.flatten(0, 1).detach(), v.flatten(0, 1).detach()  # (N, S, Dh)
    if mask is not None:
        heads = (Hkv, H // Hkv) if mask.shape[1] == H else (Hkv, 1)
        mask = mask.expand(B, heads[0] * heads[1], L, S).reshape(B * Hkv, heads[1], S)  # (N, G or 1, S)
        mask = mask.contiguous()  # the same strides for any batch: an expanded view would compile again
    out = (kernel or _attention_rows)(queries, keys, values, mask, Dh**-0.5 if scale is None else scale)
    return out.view(B, H, L, Dh)


def attention(q, k, v, mask: torch.Tensor | None = None, enable_gqa: bool = False,
              scale: float | None = None) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=..., scale=...), faster for one bf16
    query a row: q (B, H, L, Dh), k and v (B, Hkv, S, Dh); mask (B or 1, 1 or H, L, S), bool (True = attend: LLaMA)
    or added to the scores (T5's position bias, masked keys at the dtype's lowest value).
    PyTorch's CPU flash-attention kernel is slow for a single bf16 query, and so is the fp32 softmax run op by op;
    compiled, it reads the bf16 cache in a few fused passes (native-bf16 machine, 1 thread, 160 keys, 32 heads of
    128, a layer: one row SDPA 1.14 ms, op by op 1.30, compiled 0.17; 5 beams 6.9, 6.6 and 2.2 ms: ~35 ms of every
    7B token, ~140 ms of every 5-beam step; flan-t5-xl int8: 25 of a greedy step's ~97 ms). The error against fp32 is
    one bf16 rounding (~1e-3). That is on AMD; on the Intel Xeon measured PyTorch's kernel is the faster (2 threads,
    same shapes: one row SDPA 0.05 ms, compiled 0.20; 5 beams 0.33 and 0.69; 600 keys 0.23 and 0.57), so like the
    one-row products, this kernel is taken where `compiled_rows_pay`. The prompt (L > 1), fp32 and GPUs keep the
    fused kernel."""
    L = q.shape[2]
    if (L != 1 or q.dtype == torch.float32 or q.device.type != "cpu" or torch.is_grad_enabled()
            or not compiled_rows_pay()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa, scale=scale)
    return _explicit_attention(q, k, v, mask, scale, kernel=_compiled_attention_rows)


"""The attention of a decode step, one of fast.py's speed paths (LLaMA's and T5's): F.scaled_dot_product_attention,
with a compiled path for one bf16 query a row on AMD processors (`compiled_attention_pays`); and LLaMA's beams,
which attend to the prompt they share once for all of them (attention_after_shared_prompt)."""

import torch
import torch.nn.functional as F

from . import compiling, fast
from .compiling import bytes_of, compiled_or_plain


def compiled_attention_pays() -> bool:
    """Whether one bf16 query a row takes the compiled kernel (`attention`): on AMD processors, whose vector width
    inductor builds for (AVX-512, or AVX2 on Zen 2 and 3; measured at both, `attention`); not on the Intel Xeon
    measured, where PyTorch's own kernel was the faster. MINIVB_FUSED=0 or 1 overrides it, as fast.compiled_rows_pay."""
    forced = compiling.override("MINIVB_FUSED")
    if forced is not None:
        return forced
    return "AuthenticAMD" in fast._cpu_flags() and compiling._vector_width() >= 256


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


# What the compiled kernel saves over _attention_rows, its plain route (compiling.py rents it until that pays), for
# each byte of keys and values it reads: 2-50 us a MB (AMD EPYC, 2 threads, 32 layers' caches cycled: `attention`'s
# figures, and flan-t5-xl's cross-attention, 136 keys x 32 heads of 64, 0.135 / 0.114 ms; its self-attention, 20
# keys, 0.075 / 0.067).
ATTENTION_SAVES_PER_BYTE = 15e-12  # s


def _compiled_attention_rows(q, k, v, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """_attention_rows through the compiled _attention_rows_summed, where compiling has paid (compiling.py)."""
    saves = ATTENTION_SAVES_PER_BYTE * bytes_of([k, v])
    return compiled_or_plain(_attention_rows_summed, q, k, v, mask, scale, plain=_attention_rows, saves=saves)


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
    same shapes: one row SDPA 0.05 ms, compiled 0.20; 5 beams 0.33 and 0.69; 600 keys 0.23 and 0.57), so this kernel
    is taken on AMD (`compiled_attention_pays`). Measured again on AMD at 2 threads, with the batch folded into the
    heads as below, ms a layer, SDPA / written out op by op / compiled: 160 keys 0.61 / 0.23 / 0.22, 600 keys 2.28 /
    0.74 / 0.58, 5 beams' own 20 tokens 0.39 / 0.18 / 0.16: writing the softmax out gains the most there, compiling it
    a little more (which compiling.py rents until it pays). Without AVX-512 (emulated on the AMD EPYC: 256-bit
    kernels; 32 layers' caches cycled, one row): 160 keys 0.62 / 0.26 / 0.28, 600 keys 2.49 / 1.02 / 0.75; make
    bench's 12 heads of 64, 160 keys, 0.18 / 0.20 / 0.13. The prompt (L > 1), fp32 and GPUs keep the fused kernel."""
    L = q.shape[2]
    if (L != 1 or q.dtype == torch.float32 or q.device.type != "cpu" or torch.is_grad_enabled()
            or not compiled_attention_pays()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa, scale=scale)
    # Several queries a key/value head (T5's beams, attending to the encoder output they share: t5.T5Attention.attend)
    # or one key (T5's first decode step): the matrix products are the faster, and compile nothing (dynamo compiled
    # the kernel again for these shapes, 0.1-0.3 s each at a process's first steps). AMD EPYC, 2 threads, 5 beams on
    # 136 keys, written out / compiled: flan-t5-xl 176 / 277 us a layer, flan-t5-xxl 347 / 447; 400 keys 418 / 549.
    compiled = q.shape[1] == k.shape[1] and k.shape[2] > 1  # one query a key/value head, more than one key
    return _explicit_attention(q, k, v, mask, scale, kernel=_compiled_attention_rows if compiled else None)


def _attention_and_logsumexp(q, k, v, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(Dh), masked) v for q (N, Hkv, M, Dh), k and v (N, Hkv, S, Dh), mask bool (True = attend)
    broadcasting to (N, Hkv, M, S): the attended values (N, Hkv, M, Dh) in q's dtype, and each query's log-sum-exp
    of its scores (N, Hkv, M) in fp32, which lets two parts of the keys be attended apart and joined exactly.
    On a CPU, PyTorch's own flash-attention kernel, which computes both (F.scaled_dot_product_attention calls it
    and keeps the first), but for one query a head; elsewhere, and there, written out. One query a head (a beam's
    own tokens, below) is slow in the kernel, and grows with the keys: 5 rows x 32 heads of 128, AMD EPYC, us a call,
    10 / 50 / 100 / 200 keys, the kernel 329 / 1030 / 1899 / 3871, written out 148 / 351 / 750 / 1112 (a 7B's 32
    layers at 200 tokens: 124 against 36 ms a step); with 5 queries a head (the prompt's part: a row's 5 beams) the
    kernel is the faster, 257 against 370 us over 136 keys. A query that may see no key at all (a prompt of nothing
    but padding) attends to nothing: zeros, and a log-sum-exp of -inf (the kernel gives 0, as if it had seen one)."""
    if q.device.type != "cpu" or q.shape[-2] == 1:
        out, logsumexp = _written_out_attention_and_logsumexp(q, k, v, mask)
    else:
        additive = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=additive)[:2]
    if mask is not None:
        blind = ~mask.any(-1)  # (N or 1, 1 or Hkv, 1 or M): queries that see no key
        out, logsumexp = out.masked_fill(blind[..., None], 0), logsumexp.masked_fill(blind, float("-inf"))
    return out, logsumexp


def _written_out_attention_and_logsumexp(q, k, v, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """_attention_and_logsumexp in fp32, op by op."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (N, Hkv, M, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    logsumexp = scores.logsumexp(-1)  # (N, Hkv, M)
    return ((scores - logsumexp[..., None]).exp() @ v.float()).to(q.dtype), logsumexp


def attention_after_shared_prompt(q, prompt_k, prompt_v, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """A decode step of rows that share their prompt (llama.KVCache.share_prompt: beams, several samples) -> (R, H, 1,
    Dh), equal to F.scaled_dot_product_attention over the prompt's keys and values copied to every row, followed by
    the row's own. q (R, H, 1, Dh); the prompt's prompt_k, prompt_v (B, Hkv, P, Dh), one row for each R / B rows in
    a row; the tokens since, k and v (R, Hkv, t, Dh); mask bool (R or 1, 1, 1, P + t), True = attend, each row
    seeing at least its new token.

    Each example's copies attend to its prompt as extra queries of one row, (B, Hkv, G * copies, Dh), which reads
    the prompt once instead of once a copy; then every row attends to its own tokens; the two parts are joined by
    their log-sum-exps: softmax over all keys = each part's softmax weighted by exp(its log-sum-exp - the whole's).
    Native-bf16 Intel Xeon, 2 threads, 7B widths (32 heads of 128), 5 beams, 10 generated tokens, all 32 layers,
    ms: prompt of 136 tokens (4 frames) 29 -> 21, 560 (16 frames) 97 -> 38, 1552 (48 frames) 290 -> 100."""
    R, H, _, Dh = q.shape
    B, Hkv, P, _ = prompt_k.shape
    G, copies = H // Hkv, R // B  # query heads a kv head serves, rows a prompt serves
    prompt_mask = own_mask = None
    if mask is not None:
        prompt_mask, own_mask = mask[..., :P], mask[..., P:]  # (R or 1, 1, 1, P) and (R or 1, 1, 1, t)
        if prompt_mask.shape[0] == R:
            prompt_mask = prompt_mask[::copies]  # (B, 1, 1, P): equal across the copies of a prompt
    # The prompt: row r = (b, c), head h = (j, g) -> query (g, c) of row b, kv head j
    queries = q.view(B, copies, Hkv, G, Dh).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * copies, Dh)
    prompt_out, prompt_lse = _attention_and_logsumexp(queries, prompt_k, prompt_v, prompt_mask)
    prompt_out = prompt_out.view(B, Hkv, G, copies, Dh).permute(0, 3, 1, 2, 4).reshape(R, Hkv, G, Dh)
    prompt_lse = prompt_lse.view(B, Hkv, G, copies).permute(0, 3, 1, 2).reshape(R, Hkv, G)
    # Each row's own tokens: head h = (j, g) -> query g of kv head j
    own_out, own_lse = _attention_and_logsumexp(q.view(R, Hkv, G, Dh), k, v, own_mask)  # (R, Hkv, G, Dh), (R, Hkv, G)
    lse = torch.logaddexp(prompt_lse, own_lse)  # (R, Hkv, G): the log-sum-exp over all P + t keys
    out = prompt_out.float() * (prompt_lse - lse).exp()[..., None] + own_out.float() * (own_lse - lse).exp()[..., None]
    return out.to(q.dtype).view(R, H, 1, Dh)

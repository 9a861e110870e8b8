"""A greedy decode step's blocks, each compiled whole: one of fast.py's speed paths (LLaMA's and T5's decoder).

A decode step of one row reads every weight of the language model once, and the compiled kernels of fast.py and
quant.py read them near the memory rate. What is left is calls: a block of T5's decoder is ~8 compiled calls and ~30
ops run one by one (~1 ms a block on the AMD EPYC, each compiled call ~40 us of dynamo's and AOT's Python wrappers),
where its int8 weights take ~1.6 ms to read at 40 GB/s. Here a whole block is one function of its weights, the
cache and the row, traced once by torch.compile (inductor fuses each block into one C++ loop nest, which calls
native.py's kernels for the products where they are taken, else int8pack_mm for int8 weights wider than
quant.INT8_FUSED_MAX_IN), and every block of the model calls the same compiled code.
Greedy steps alternated in one process, AMD EPYC, ms a step, blocks one by one / whole:
    full flan-t5-xl      int8 75.0-76.2 / 65.2-68.6 (1.09-1.17x)   bf16 92.4-127.1 / 76.8-101.5 (1.02-1.29x, drift)
    full vicuna-7b       int8 225-261 / 225-262 (0.97-1.08x)        bf16 370-486 / 341-444 (1.08-1.10x; once 0.86x)
(the 7B's layers read 200-400 MB each: their calls weigh less than flan-t5-xl's 65-130 MB; profiled, its int8 block
takes what its kernels one by one take, 6.9-7.5 ms). The same tokens, but for the 7B in bf16, whose greedy tokens
part at a tie: two candidates of equal bf16 logits at the third token (before it, logits cosine 0.99974).

It computes what the block's forward computes for that row, with the same kernels (fast._row_times_matrix,
native.int8_rows or quant._int8_row_times_matrix, decode_attention._attention_rows_summed) and the same norms and
activations, so the plain forward stays the reference (tests/test_decode_blocks.py compares them). Taken where the
decode attention compiles (decode_attention.compiled_attention_pays: AMD) and one row's products take compiled or
native.py's kernels: AVX-512, and AVX2 (Zen 2 and 3), where the blocks call the AVX2 build's kernels (make bench's
medium model, emulated on the AMD EPYC, bf16 greedy steps alternated in one process, median of 10 rounds' medians:
blocks one by one with PyTorch's attention 11.2 ms, whole 9.0; make bench 1.28-1.34x transformers, was 0.91-0.98x).
Rented like the kernels, for longer: compiling a block costs 5-15 s cold (compiling.BLOCK_COMPILE_SECONDS).

Three things the code below does because the generated code or dynamo's guards showed them:
  - each block's keys and values come in as tensors of their own and the new token's slot as an argument (`end`):
    read through the block's layer_idx, as KVCache.update does, they made one graph a layer (17 s each);
  - the cache's last slot is filled block by block (`_write`);
  - the products of the attention's output add their int8 terms in groups that stay inside a head (`_heads_product`):
    quant's groups of 128 cut across T5's heads of 64, which inductor read through a gather (72 -> 57 ms a step).
"""

import torch
import torch.nn.functional as F

from . import compiling, fast, native, packing, quant
from .decode_attention import _attention_rows_summed, compiled_attention_pays


def _product(x: torch.Tensor, layer) -> torch.Tensor:
    """layer(x) for one row x (1, in), fast.Linear or quant.Int8Linear without a bias -> (1, out) in the layer's
    dtype (int8: its scales'), through the kernels a decode step's row takes. x is fp32 holding the block's bf16
    values, converted once for all the products that read it: given in bf16, each product converted it again at every
    weight it read (the 7B's int8 q, k, v: 3 conversions a weight vector where the products make 1), and the block ran
    slower than its kernels one by one."""
    weight = layer.weight
    if weight.dtype == torch.int8:
        scales = layer.weight_scale
        if native.fits(weight):  # VNNI, at the memory rate (native.py)
            return native.int8_rows(x, weight, scales)
        if weight.shape[1] > quant.INT8_FUSED_MAX_IN:  # wide: int8pack_mm is the faster (quant.py)
            return torch._weight_int8pack_mm(x.to(scales.dtype), weight, scales)
        return quant._int8_row_times_matrix(x, weight, scales)
    if native.fits(weight):  # vdpbf16ps or vfmadd, at the memory rate (native.py)
        return native.float_rows(x, weight)
    chunks = fast._chunks(weight.shape[1])
    rows = x.reshape(1, chunks, -1)  # (1, chunks, in / chunks)
    return fast._row_times_matrix(rows, weight.reshape(weight.shape[0], chunks, -1)).to(weight.dtype)


def _heads_product(out: torch.Tensor, layer) -> torch.Tensor:
    """The attention's output (Hq, 1, Dh) times the o projection -> (1, D): int8 terms added in groups inside each
    head (the module docstring)."""
    heads, _, head_dim = out.shape
    weight, out = layer.weight, out.float()
    if weight.dtype == torch.int8 and head_dim % quant.LANES == 0 and not native.fits(weight):
        return quant._int8_row_times_matrix(out, weight, layer.weight_scale, groups=head_dim // quant.LANES)
    return _product(out.reshape(1, heads * head_dim), layer)


def _write(cache: torch.Tensor, new: torch.Tensor, end: int) -> torch.Tensor:
    """new (1, heads, 1, Dh) into slot end - 1 of a block's cache (1, heads, K, Dh); its slots up to `end`, (heads,
    end, Dh). The graph holds for end < K: at end == K those slots are the whole cache, contiguous, which compiles
    another graph (seconds, for one step), so the step that fills the last slot runs block by block (`takes`)."""
    cache[:, :, end - 1 : end] = new
    return cache[0, :, :end]


def t5_block(block, h: torch.Tensor, end: int, keys, values, bias, cross_keys, cross_values, cross_bias):
    """t5.T5Block.forward for one row after the first step: h (1, 1, D) -> (1, 1, D). keys, values (1, H, K, Dk)
    the block's self-attention cache, written at slot end - 1 and read up to `end`; bias (1, H, 1, end) the position
    bias; cross_keys, cross_values (1, H, S, Dk) and cross_bias (1, 1, 1, S) or None the cross-attention's."""
    attn, cross, ffn = block.attn, block.cross_attn, block.ffn
    H, Dk = attn.num_heads, attn.d_kv
    x = block.attn_norm(h).reshape(1, -1).float()  # (1, D)
    q, k, v = (_product(x, p) for p in (attn.q, attn.k, attn.v))  # (1, H * Dk) each
    keys, values = _write(keys, k.view(1, H, 1, Dk), end), _write(values, v.view(1, H, 1, Dk), end)  # (H, end, Dk)
    out = _attention_rows_summed(q.view(H, 1, Dk), keys, values, bias[0], 1.0)  # (H, 1, Dk)
    h = h + _heads_product(out, attn.o).view_as(h)
    x = block.cross_attn_norm(h).reshape(1, -1).float()
    mask = None if cross_bias is None else cross_bias[0]  # (1, 1, S)
    out = _attention_rows_summed(_product(x, cross.q).view(H, 1, Dk), cross_keys[0], cross_values[0], mask, 1.0)
    h = h + _heads_product(out, cross.o).view_as(h)
    x = block.ffn_norm(h).reshape(1, -1).float()
    gated = ffn.act(_product(x, ffn.wi_0)) * _product(x, ffn.wi_1)  # (1, F)
    return h + _product(gated.float(), ffn.wo).view_as(h)


def llama_block(block, h: torch.Tensor, end: int, keys, values, cos, sin, mask):
    """llama.LlamaBlock.forward for one row: h (1, 1, D) -> (1, 1, D). keys, values (1, Hkv, K, Dh) the block's
    cache, written at slot end - 1 and read up to `end`; cos, sin (1, 1, 1, Dh); mask (1, 1, 1, end) bool."""
    from .llama import apply_rope

    attn, mlp = block.attn, block.mlp
    H, Hkv, Dh = attn.num_heads, attn.num_kv_heads, attn.head_dim
    x = block.attn_norm(h).reshape(1, -1).float()  # (1, D)
    q, k, v = (_product(x, p) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    q = apply_rope(q.view(1, H, 1, Dh), cos, sin)  # (1, H, 1, Dh)
    keys = _write(keys, apply_rope(k.view(1, Hkv, 1, Dh), cos, sin), end)  # (Hkv, end, Dh)
    values = _write(values, v.view(1, Hkv, 1, Dh), end)
    # grouped-query attention: the query heads of each key/value head are its rows (decode_attention)
    out = _attention_rows_summed(q.view(Hkv, H // Hkv, Dh), keys, values, mask[0], Dh**-0.5)  # (Hkv, G, Dh)
    h = h + _heads_product(out.view(H, 1, Dh), attn.o_proj).view_as(h)
    x = block.mlp_norm(h).reshape(1, -1).float()
    gated = F.silu(_product(x, mlp.gate_proj)) * _product(x, mlp.up_proj)  # (1, I)
    return h + _product(gated.float(), mlp.down_proj).view_as(h)


# ----------------------------------------------------------------------------- which steps take it, and the rent

# What a block compiled whole saves over its forward, a step (the module docstring's table): flan-t5-xl int8 0.3-0.4
# ms, bf16 0.6-1.1; the 7B's bf16 ~1 ms, int8 ~0.
BLOCK_SAVES = 0.4e-3  # s a block a step


def takes(blocks, h: torch.Tensor, cache) -> bool:
    """Whether this step's blocks run compiled whole: one row of one new token (greedy decoding) on a CPU where the
    decode attention compiles (decode_attention.compiled_attention_pays), outside autograd, every product one that a
    whole block computes (`_fits`: a row's compiled or native kernel), T5's cross-attention in the cache (from the
    second step on), and a cache slot to spare beyond the new token's (`_write`). MINIVB_BLOCKS=0: never; 1: compiled
    at first use (by default, rented until it pays: compiling.BLOCKS)."""
    if compiling.override("MINIVB_BLOCKS") is False or cache is None or h.shape[:2] != (1, 1):
        return False
    if torch.is_grad_enabled() or h.device.type != "cpu" or not compiled_attention_pays():
        return False
    if cache.length + 1 >= cache.max_length or cache.prompt_keys is not None:
        return False
    if not hasattr(blocks[0], "mlp") and (not blocks[0].ffn.gated or any(kv is None for kv in cache.cross)):
        return False  # T5: a gated feed-forward (Flan-T5's); the first step projects the encoder output
    native.available(h.dtype)  # loads the kernels: sets native.ready, which the traced _product reads
    # The blocks of a model are built alike, and allowed to pack alike (packing.allow_packing): only where packed
    # copies take the weights' places ("instead") may one (made by beams) have replaced a weight, in any block; the
    # look through every block costs ~1 ms a step (flan-t5-xl's 24 x 9 layers), so it is made only there.
    first = _products(blocks[0])
    replacing = first[0].packed is not None and first[0].packed.replaces
    return (all(_fits(layer, h) for layer in first)
            and not (replacing and any(packing.copy_replaced_a_weight(_products(block)) for block in blocks)))


def _products(block) -> list:
    """The linear layers a decode step of `block` multiplies by (llama.LlamaBlock, t5.T5Block: its cross-attention's
    keys and values are in the cache)."""
    if hasattr(block, "mlp"):
        a, m = block.attn, block.mlp
        return [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
    a, c, f = block.attn, block.cross_attn, block.ffn
    return [a.q, a.k, a.v, a.o, c.q, c.o, f.wi_0, f.wi_1, f.wo]


def _fits(layer, h: torch.Tensor) -> bool:
    """Whether one row h times `layer` is a product `_product` computes: fast.Linear on the compiled or native route,
    or quant.Int8Linear with bf16 rows and a width its kernels take; no bias (none in the official checkpoints)."""
    if not isinstance(layer, (fast.Linear, quant.Int8Linear)) or layer.bias is not None:
        return False
    if isinstance(layer, quant.Int8Linear):
        weight = layer.weight
        return (h.dtype == torch.bfloat16 and weight.shape[1] % quant.INT8PACK_WIDTHS == 0
                and weight.numel() >= fast.FUSED_MIN_WEIGHTS)
    return fast.decode_route(h, layer.weight) in ("fused", "native")


def _run(function, block, *args, grouped: bool, plain):
    """function(block, *args) compiled whole, or plain() (the block's own forward) while it is rented, or where
    nothing compiles. One graph serves every block of the model: its weights are inputs, not constants. grouped: the
    block's int8 products are quant.py's kernels, which add their terms in groups (`_grouped`)."""
    saves = None if compiling.override("MINIVB_BLOCKS") else BLOCK_SAVES
    return compiling.compiled_or_plain(function, block, *args, plain=lambda *_: plain(), normed=True, grouped=grouped,
                                       block=not grouped, saves=saves, rent=compiling.BLOCKS)


def _grouped(layer) -> bool:
    """Whether a block's products are int8 through quant.py's grouped kernels (where native.py's is not taken), whose
    sums the block options would store whole (compiling._GROUPED_NORMED_OPTIONS). Through native.py's, an int8 block
    takes the bf16 blocks' options, whose operation count stores LLaMA's rotated query once: without it, inductor
    rotated it again for every key of the cache (full vicuna-7b int8: a block's own loops 234 -> 45 us; greedy steps
    alternated in one process, 217-283 -> 185-229 ms, the same tokens)."""
    return isinstance(layer, quant.Int8Linear) and not native.fits(layer.weight)


def t5_step(block, h, bias, cache, encoder_hidden, cross_bias):
    """A step of t5.T5Stack's decoder `block` through t5_block (where `takes` said so: from the second decode call on,
    the cross-attention's keys and values are in the cache)."""
    i, end = block.layer_idx, cache.length + 1
    # .detach(): the same memory, no longer a view of the cache in dynamo's eyes (see decode_attention)
    return _run(t5_block, block, h, end, cache.keys[i].detach(), cache.values[i].detach(), bias, *cache.cross[i],
                cross_bias, grouped=_grouped(block.attn.q),
                plain=lambda: block(h, bias, cache, encoder_hidden, cross_bias))


def llama_step(block, h, cos, sin, mask, cache):
    """A step of llama.Llama's `block` through llama_block (where `takes` said so)."""
    i, end = block.attn.layer_idx, cache.length + 1
    return _run(llama_block, block, h, end, cache.keys[i].detach(), cache.values[i].detach(), cos, sin, mask,
                grouped=_grouped(block.attn.q_proj), plain=lambda: block(h, cos, sin, mask, cache))

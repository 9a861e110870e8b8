"""Products whose weight is stored in another dtype than they compute in, the weight converted a block of rows at a
time into one buffer kept between calls: a bf16 weight in a prompt computed in fp32 (fast.computing_in, CPUs
without native bf16) and an int8 weight in a prompt (quant.int8_linear). A speed path, listed in fast.py's overview.
And a frozen bf16 weight that gradients cross in fp32, converted again for the backward pass (`FrozenLinear`).
"""

import functools
import glob
import threading

import torch
import torch.nn.functional as F


@functools.cache
def last_level_cache_bytes() -> int:
    """The size of the CPU's largest cache (Linux's sysfs: 307200K on the Intel Xeon measured, 32768K on the AMD
    EPYC); 0 where unknown."""
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(index, encoding="utf-8") as f:
                text = f.read().strip()  # "307200K"
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        number, unit = (text[:-1], units[text[-1]]) if text[-1:] in units else (text, 1)
        if number.isdigit():
            sizes.append(int(number) * unit)
    return max(sizes, default=0)


# A product whose weight is stored in another dtype than it computes in (a bf16 weight in a prompt computed in fp32,
# an int8 weight, quant.int8_linear) converts the weight first. Converted whole, a fresh 180 MB fp32 copy of an
# 11008 x 4096 matrix on every call pays its page faults and goes out to memory and back; converted a block of output
# rows at a time into one buffer kept between calls, each block is still in cache when multiplied. Blocks of 8 MB
# where the last-level cache is small (AMD EPYC, 32 MB: 8 and 16 MB measured alike), 32 MB where it is large (the
# Intel Xeon's 300 MB). Measured, ms a matrix, 2 threads, best of 5-7 alternating:
#   int8 weights, 150 bf16 rows, AMD (quiet machine): 11008 x 4096 whole copy 74.4, 8 MB fresh blocks 41.2, bf16
#     F.linear 34.4; 4096 x 11008: 72.9, 44.0, 35.5; 4096 x 4096: 29.1, 15.4, 13.2 (2 MB blocks: 56.0, 41.0, 15.4;
#     16 MB: 41.6, 42.0, 15.2).
#   int8 weights, 150 bf16 rows, Intel Xeon, three runs (the machine drifting ~1.5x between them):
#       matrix            bf16 F.linear   fresh 8 MB blocks   one buffer, 8 MB   16 MB            32 MB
#       11008 x 4096      19.1-25.8       19.6-39.1           18.9-38.2          21.7-33.3        28.7-34.6
#       4096 x 11008      20.2-21.4       32.1-34.6           24.2-34.0          22.0-32.4        24.7-29.1
#       4096 x 4096        4.2-8.3         7.3-15.7            6.8-14.9           6.3-12.2         7.5-12.4
#     and the prompt of vicuna-7b cut to 4 + 4 layers (~145 rows, three runs): fresh 8 MB blocks 0.393 / 0.433 /
#     0.590 s, one buffer of 8 MB 0.397 / 0.378 / 0.574, 16 MB 0.371 / 0.352 / 0.532, 32 MB 0.349 / 0.327 / 0.484
#     (bf16 weights: 0.442-0.446 in the slow phase of the third).
#   Without native bf16 (AVX2 emulated on the Intel Xeon), fp32 products, 32 MB blocks: bf16 weights upcast whole
#     against in blocks, 150 rows: 11008 x 4096 135.5 -> 97.1, 4096 x 11008 156.9 -> 103.2, 4096 x 4096 52.6 ->
#     37.6; the ViT's 1028 rows x 6144 x 1408 132.7 / 134.6 (alike: there the product outweighs the copy). int8
#     weights against quant.Int8Linear.reference's two whole fp32 copies: 195 -> 99, 204 -> 101, 82 -> 42.
BLOCK_BYTES = 32 * 2**20 if last_level_cache_bytes() >= 128 * 2**20 else 8 * 2**20


def linear_in_blocks(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight.to(x.dtype)) for x (..., in) and a weight (out, in) of another dtype, without bias: the
    weight converted BLOCK_BYTES at a time into this thread's buffer, kept between calls (fresh tensors where autograd
    may keep them for the backward pass)."""
    block = max(64, BLOCK_BYTES // (x.element_size() * weight.shape[1]) // 64 * 64)  # output rows converted at a time
    fresh = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    products = [F.linear(x, weight[i : i + block].to(x.dtype) if fresh else _converted(weight[i : i + block], x.dtype))
                for i in range(0, weight.shape[0], block)]
    return torch.cat(products, dim=-1)  # (..., out)


def _converted(block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """block (rows, in) in `dtype`, written into this thread's buffer (grown to the largest block so far)."""
    buffer = getattr(_conversions, "buffer", None)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < block.numel():
        buffer = _conversions.buffer = torch.empty(block.numel(), dtype=dtype)
    return buffer[: block.numel()].view(block.shape).copy_(block)


_conversions = threading.local()  # each thread's buffer for _converted


class FrozenLinear(torch.autograd.Function):
    """F.linear(x, weight upcast to x's dtype, bias) for a frozen weight that gradients cross to reach x (a
    fine-tune's language model, finetune.py): the backward pass upcasts the weight again. F.linear would keep the
    upcast copy from the forward to the backward pass: a whole fp32 copy of the language model, 27 GB for a 7B. The
    weight stays bf16 but the product does not (fast.computing_in): a bf16 backward pass would be no choice without
    native bf16 (170 x 4096 x 11008, AVX2 emulated on the Intel Xeon: 48 s in bf16, 0.14 s in fp32; forward 0.70
    and 0.18 s)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)  # the parameter as stored (bf16): no memory of its own
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None  # (..., out) @ (out, in) -> (..., in)

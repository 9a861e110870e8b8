/* minivb's hand-written kernels (why: native.py): one row times an int8 matrix with AVX-512 VNNI (int8_row), and a
   few bf16 rows times a bf16 matrix with AVX-512 BF16 (bf16_rows, at the end).

   int8_row computes exactly what quant.integer_linear computes for one row, in one pass over the weight:
     1. the row x (in,) goes on a grid of 2 x GRID + 1 steps of its largest magnitude, q = round(x / step), and each
        q is cut in two int8 halves, q = HALF * high + low, high in [-128, 127], low in [0, HALF);
     2. vpdpbusd multiplies 64 unsigned bytes by 64 signed bytes and adds each 4 products into 16 int32 sums, so the
        halves go in unsigned (high + 128, low) against the signed weights, and a third sum, of the weights alone
        (ones against them), takes the 128 back out: sum(high * w) = sum((high + 128) * w) - 128 * sum(w);
     3. y[o] = (HALF * sum(high * w) + sum(low * w)) * step * scales[o], in the order quant._sum_halves computes it
        (built with -ffp-contract=off: no fused multiply-add where that code makes two roundings).
   The sums are exact in int32 for rows of up to 65536 inputs (255 x 127 x 65536 < 2^31); native.py checks it. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define HALF 128
#define GRID (HALF * HALF - 1)

/* The row's halves (step 1 above): high + 128 and low, each (in,) bytes, and the grid's step; 16 values at a time,
   with the same roundings as quant._int8_halves (division and rounding are exact operations, vector or not). */
static float halves(const float *x, int64_t in, uint8_t *high, uint8_t *low) {
    __m512 largest = _mm512_setzero_ps();
    for (int64_t k = 0; k < in; k += 16) largest = _mm512_max_ps(largest, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
    const float step = fmaxf(_mm512_reduce_max_ps(largest), 1e-30f) / GRID; /* an all-zero row stays zero */
    const __m512 steps = _mm512_set1_ps(step), half = _mm512_set1_ps(HALF), offset = _mm512_set1_ps(128.0f);
    for (int64_t k = 0; k < in; k += 16) {
        __m512 q = _mm512_div_ps(_mm512_loadu_ps(x + k), steps);
        q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); /* half to even: torch.round */
        __m512 h = _mm512_roundscale_ps(_mm512_div_ps(q, half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        __m512 l = _mm512_sub_ps(q, _mm512_mul_ps(half, h));
        _mm_store_si128((__m128i *)(high + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_add_ps(h, offset))));
        _mm_store_si128((__m128i *)(low + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(l)));
    }
    return step;
}

/* The sums of one weight row w (in,) against the halves (step 2 above): sum(high * w) and sum(low * w). One row at a
   time, in memory order: each thread reads its half of the matrix as one stream, which the hardware prefetches (4
   rows at a time, sharing each load of the halves, read 4 streams of a row's length: 2048 x 2048, 2 threads, 22 against
   33 GB/s). */
static void sums(const int8_t *w, int64_t in, const uint8_t *high, const uint8_t *low, int32_t *high_sum,
                 int32_t *low_sum) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i h = _mm512_setzero_si512(), l = h, s = h;
    for (int64_t k = 0; k < in; k += 64) {
        const __m512i wk = _mm512_loadu_si512(w + k);
        h = _mm512_dpbusd_epi32(h, _mm512_load_si512(high + k), wk);
        l = _mm512_dpbusd_epi32(l, _mm512_load_si512(low + k), wk);
        s = _mm512_dpbusd_epi32(s, ones, wk); /* sum(w), for the 128 of high + 128 */
    }
    *high_sum = _mm512_reduce_add_epi32(h) - 128 * _mm512_reduce_add_epi32(s);
    *low_sum = _mm512_reduce_add_epi32(l);
}

/* x (in,) fp32, w (out, in) int8, scales (out,) fp32 -> y (out,) fp32; in a multiple of 64. Returns 0, or -1 where
   the halves' buffers could not be allocated. */
int int8_row(const float *x, const int8_t *w, const float *scales, float *y, int64_t out, int64_t in, int threads) {
    uint8_t *high = (uint8_t *)aligned_alloc(64, in), *low = (uint8_t *)aligned_alloc(64, in);
    if (high == NULL || low == NULL) {
        free(high);
        free(low);
        return -1;
    }
    const float step = halves(x, in, high, low);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < out; o++) {
        int32_t high_sum, low_sum;
        sums(w + o * in, in, high, low, &high_sum, &low_sum);
        y[o] = (HALF * (float)high_sum + (float)low_sum) * step * scales[o]; /* step 3 */
    }
    free(high);
    free(low);
    return 0;
}

/* A few bf16 rows times a bf16 matrix: one row (greedy decoding) or a beam search's few, for the same reason
   (native.py): x (rows, in) bf16, w (out, in) bf16 -> y (rows, out) fp32; rows 1 to MAX_ROWS, in a multiple of 32.
   vdpbf16ps multiplies 32 pairs of bf16 (exactly, in fp32) and adds each 2 products into 16 fp32 sums, where
   converting both to fp32 first takes 3 more instructions. TILE weight rows at a time, each against every row of x:
   each weight load serves `rows` sums and each load of x TILE sums (TILE x rows sums in registers: 24 of the 32 at 6
   rows), and the next TILE weight rows are prefetched into the second-level cache while these are summed, so that a
   thread keeps 2 x TILE streams of memory in flight (5 rows x 11008 x 4096, AMD EPYC, 2 threads, the 1 GB sum at ~31
   GB/s: 1 weight row at a time 5.4 ms, 4 at a time 3.4, and 3.1 with the next 4 prefetched; 8 at a time, whose 40
   sums cannot stay in registers, 3.1-3.2; F.linear 4.7, oneDNN's packed copy 2.8).
   Its sums are made in another order than a compiled kernel's or oneDNN's: fp32 rounding apart. */
#define MAX_ROWS 6
#define TILE 4

static inline __attribute__((always_inline)) void bf16_tile(const uint16_t *x, const uint16_t *w, float *y,
                                                            int64_t out, int64_t in, const int rows, const int tile,
                                                            int64_t o) {
    __m512 sums[TILE][MAX_ROWS];
    for (int t = 0; t < tile; t++)
        for (int r = 0; r < rows; r++) sums[t][r] = _mm512_setzero_ps();
    const uint16_t *next = w + (o + 2 * tile <= out ? o + tile : o) * in; /* the next tile's rows, while there is one */
    for (int64_t k = 0; k < in; k += 32) {
        __m512bh wk[TILE];
        for (int t = 0; t < tile; t++) {
            _mm_prefetch((const char *)(next + t * in + k), _MM_HINT_T1); /* 32 bf16: one 64-byte line */
            wk[t] = (__m512bh)_mm512_loadu_si512(w + (o + t) * in + k);
        }
        for (int r = 0; r < rows; r++) {
            const __m512bh xr = (__m512bh)_mm512_loadu_si512(x + r * in + k);
            for (int t = 0; t < tile; t++) sums[t][r] = _mm512_dpbf16_ps(sums[t][r], xr, wk[t]);
        }
    }
    for (int t = 0; t < tile; t++)
        for (int r = 0; r < rows; r++) y[r * out + o + t] = _mm512_reduce_add_ps(sums[t][r]);
}

/* Returns 0, or -1 where rows is not 1 to MAX_ROWS. Each count of rows is its own loop (the switch), so that the
   compiler keeps the sums in registers. */
int bf16_rows(const uint16_t *x, const uint16_t *w, float *y, int64_t rows, int64_t out, int64_t in, int threads) {
    if (rows < 1 || rows > MAX_ROWS) return -1;
    const int64_t tiled = out - out % TILE;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < tiled; o += TILE) {
        switch (rows) {
            case 1: bf16_tile(x, w, y, out, in, 1, TILE, o); break;
            case 2: bf16_tile(x, w, y, out, in, 2, TILE, o); break;
            case 3: bf16_tile(x, w, y, out, in, 3, TILE, o); break;
            case 4: bf16_tile(x, w, y, out, in, 4, TILE, o); break;
            case 5: bf16_tile(x, w, y, out, in, 5, TILE, o); break;
            default: bf16_tile(x, w, y, out, in, 6, TILE, o); break;
        }
    }
    for (int64_t o = tiled; o < out; o++) bf16_tile(x, w, y, out, in, (int)rows, 1, o); /* the last out % TILE */
    return 0;
}

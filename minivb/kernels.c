/* minivb's hand-written kernels (why: native.py): a few rows (1 to MAX_ROWS: greedy decoding's one, a beam search's
   few) times an int8 matrix with AVX-512 VNNI (int8_rows), and times a bf16 or fp32 matrix (bf16_rows with AVX-512
   BF16, f32_rows; at the end). All read the matrix once for all the rows, a tile of its rows at a time against every
   row of x, with the next tile prefetched into the second-level cache meanwhile (more streams of memory in flight
   than one row's). Built twice, by the vector width PyTorch's own kernels use (native.py): with AVX-512, and with AVX2
   and FMA only (laptops, AMD before Zen 4: the three loops 256 bits wide, after the AVX-512 ones; int8 with vpmaddwd
   on q whole, the same numbers).

   int8_rows computes exactly what quant.integer_linear computes, in one pass over the weight:
     1. each row x (in,) goes on a grid of 2 x GRID + 1 steps of its largest magnitude, q = round(x / step), and each
        q is cut in two int8 halves, q = HALF * high + low, high in [-128, 127], low in [0, HALF);
     2. vpdpbusd multiplies 64 unsigned bytes by 64 signed bytes and adds each 4 products into 16 int32 sums, so the
        halves go in unsigned (high + 128, low) against the signed weights, and a third sum, of the weights alone
        (ones against them), takes the 128 back out: sum(high * w) = sum((high + 128) * w) - 128 * sum(w);
     3. y[r, o] = sum(q * w) * step[r] * scales[o], where the integer sum(q * w) = HALF * sum(high * w) + sum(low * w)
        (int64) is rounded once to fp32, in the order quant._sum_halves computes it (built with -ffp-contract=off: no
        fused multiply-add where that code makes two roundings).
   The sums are exact in int32 for rows of up to 65536 inputs (255 x 127 x 65536 < 2^31); native.py checks it. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_ROWS 6 /* a tile's sums stay in the vector registers up to this many rows */

#define HALF 128
#define GRID (HALF * HALF - 1)

#if defined(__AVX512F__) /* ------------------------------------------------ the AVX-512 build: int8, bf16, fp32 */
#define INT8_TILE 2 /* weight rows a tile: 2 x 6 x 2 sums of the halves, 2 of the weights */
#define CHUNK 64 /* inputs a chunk */
#define ROW_CHUNK 128 /* bytes of one row's halves for a chunk of 64 inputs: 64 of high + 128, 64 of low */

/* One row's halves (step 1 above) and its grid's step, 16 values at a time, with the same roundings as
   quant._int8_halves (division and rounding are exact operations, vector or not). The halves of all the rows are
   interleaved by 64 inputs, in the order the sums read them: for the inputs 64c to 64c + 63, row r's high + 128 at
   chunks + c * stride + 128 r and its low 64 bytes after (stride = 128 x rows). */
static float grid_row(const float *x, int64_t in, uint8_t *chunks, int64_t stride) {
    __m512 largest = _mm512_setzero_ps();
    for (int64_t k = 0; k < in; k += 16) largest = _mm512_max_ps(largest, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
    const float step = fmaxf(_mm512_reduce_max_ps(largest), 1e-30f) / GRID; /* an all-zero row stays zero */
    const __m512 steps = _mm512_set1_ps(step), half = _mm512_set1_ps(HALF), offset = _mm512_set1_ps(128.0f);
    for (int64_t k = 0; k < in; k += 16) {
        __m512 q = _mm512_div_ps(_mm512_loadu_ps(x + k), steps);
        q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); /* half to even: torch.round */
        __m512 h = _mm512_roundscale_ps(_mm512_div_ps(q, half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        __m512 l = _mm512_sub_ps(q, _mm512_mul_ps(half, h));
        uint8_t *high = chunks + (k / 64) * stride + k % 64;
        _mm_store_si128((__m128i *)high, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_add_ps(h, offset))));
        _mm_store_si128((__m128i *)(high + 64), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(l)));
    }
    return step;
}

/* The sums of `tile` weight rows from o against every row's halves (step 2), then y (step 3). */
static inline __attribute__((always_inline)) void int8_tile(const int8_t *w, const uint8_t *chunks, const float *step,
                                                            const float *scales, float *y, int64_t out, int64_t in,
                                                            const int rows, const int tile, int64_t o) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i high[INT8_TILE][MAX_ROWS], low[INT8_TILE][MAX_ROWS], weights[INT8_TILE];
    for (int t = 0; t < tile; t++) {
        weights[t] = _mm512_setzero_si512();
        for (int r = 0; r < rows; r++) high[t][r] = low[t][r] = weights[t];
    }
    const int8_t *next = w + (o + 2 * tile <= out ? o + tile : o) * in; /* the next tile's rows, while there is one */
    for (int64_t k = 0; k < in; k += 64) {
        __m512i wk[INT8_TILE];
        for (int t = 0; t < tile; t++) {
            _mm_prefetch((const char *)(next + t * in + k), _MM_HINT_T1); /* 64 int8: one 64-byte line */
            wk[t] = _mm512_loadu_si512(w + (o + t) * in + k);
            weights[t] = _mm512_dpbusd_epi32(weights[t], ones, wk[t]); /* sum(w), for the 128 of high + 128 */
        }
        const uint8_t *chunk = chunks + (k / 64) * rows * 128;
        for (int r = 0; r < rows; r++) {
            const __m512i h = _mm512_load_si512(chunk + r * 128), l = _mm512_load_si512(chunk + r * 128 + 64);
            for (int t = 0; t < tile; t++) {
                high[t][r] = _mm512_dpbusd_epi32(high[t][r], h, wk[t]);
                low[t][r] = _mm512_dpbusd_epi32(low[t][r], l, wk[t]);
            }
        }
    }
    for (int t = 0; t < tile; t++) {
        const int32_t offset = 128 * _mm512_reduce_add_epi32(weights[t]);
        for (int r = 0; r < rows; r++) {
            const int32_t high_sum = _mm512_reduce_add_epi32(high[t][r]) - offset;
            const int32_t low_sum = _mm512_reduce_add_epi32(low[t][r]);
            y[r * out + o + t] = (float)((int64_t)HALF * high_sum + low_sum) * step[r] * scales[o + t]; /* step 3 */
        }
    }
}

/* A few float rows times a float matrix, bf16 (bf16_rows) or fp32 (f32_rows): one row (greedy decoding) or a beam
   search's few, for the same reason (native.py): x (rows, in), w (out, in) of one dtype -> y (rows, out) fp32; rows 1
   to MAX_ROWS, in a multiple of a vector's values (32 bf16, 16 fp32; AVX2 16 and 8). bf16: vdpbf16ps multiplies 32
   pairs of bf16 (exactly, in fp32) and adds each 2 products into 16 fp32 sums, where converting both to fp32 first
   takes 3 more instructions; fp32: vfmadd, 16 products into 16 sums (F.linear's MKL takes a slow generic path for a few
   fp32 rows on AMD: native.py's table). FLOAT_TILE weight rows at a time, each against every row of x: each weight load
   serves `rows` sums and each load of x FLOAT_TILE sums, and the next FLOAT_TILE weight rows are prefetched while these
   are summed, so that a thread keeps 2 x FLOAT_TILE streams of memory in flight (bf16, 5 rows x 11008 x 4096, AMD EPYC,
   2 threads, the 1 GB sum at ~31 GB/s: 1 weight row at a time 5.4 ms, 4 at a time 3.4, and 3.1 with the next 4
   prefetched; 8 at a time, whose 40 sums cannot stay in registers, 3.1-3.2; F.linear 4.7, oneDNN's packed copy 2.8).
   Its sums are made in another order than a compiled kernel's, oneDNN's or MKL's: fp32 rounding apart. */
#define FLOAT_TILE 4 /* weight rows a tile: 4 x 6 sums */

static inline __attribute__((always_inline)) void float_tile(const char *x, const char *w, float *y, int64_t out,
                                                             int64_t in, const int rows, const int tile, int64_t o,
                                                             const int bf16) {
    const int64_t size = bf16 ? 2 : 4, step = 64 / size; /* bytes a value, values a 64-byte vector */
    __m512 sums[FLOAT_TILE][MAX_ROWS];
    for (int t = 0; t < tile; t++)
        for (int r = 0; r < rows; r++) sums[t][r] = _mm512_setzero_ps();
    const char *next = w + (o + 2 * tile <= out ? o + tile : o) * in * size; /* the next tile's rows, while any */
    for (int64_t k = 0; k < in; k += step) {
        __m512 wk[FLOAT_TILE];
        for (int t = 0; t < tile; t++) {
            _mm_prefetch(next + (t * in + k) * size, _MM_HINT_T1); /* one 64-byte line */
            wk[t] = _mm512_loadu_ps(w + ((o + t) * in + k) * size); /* 32 bf16 or 16 fp32, as 64 bytes */
        }
        for (int r = 0; r < rows; r++) {
            const __m512 xr = _mm512_loadu_ps(x + (r * in + k) * size);
            for (int t = 0; t < tile; t++)
                sums[t][r] = bf16 ? _mm512_dpbf16_ps(sums[t][r], (__m512bh)xr, (__m512bh)wk[t])
                                  : _mm512_fmadd_ps(xr, wk[t], sums[t][r]);
        }
    }
    for (int t = 0; t < tile; t++)
        for (int r = 0; r < rows; r++) y[r * out + o + t] = _mm512_reduce_add_ps(sums[t][r]);
}

#else /* ------------------------------------------------------- the AVX2 build: int8, bf16 and fp32, 256 bits */
/* int8_rows without VNNI: vpmaddwd multiplies 16 pairs of int16 and adds each 2 products into 8 int32 sums. The row's
   q itself is int16 (|q| <= GRID < 2^14: no halves), and so is each int8 weight once widened (exact): one vpmaddwd a
   row for 16 weights, where the two halves took two (and as many additions). |q x w| <= 2^21, so a lane's int32 sum
   stays exact over BLOCK inputs; each block's total goes into int64: the integer sum(q * w) that step 3 rounds once
   to fp32, the same numbers as the AVX-512 build's and quant.integer_linear's, bit for bit. A tile of 2 weight rows
   (2 x 6 sums, 2 widened weights and a row's q: 15 of the 16 registers). The 4 chunks of a 64-byte line of the
   weight rows are unrolled after its prefetch, with no branch between (a branch a chunk made the loop as many scalar
   instructions as vector ones). AMD EPYC (this build), 2 threads, G weights/s, weights in the caches (1024 x 4096,
   512 x 11008, 2048 x 768, 768 x 2048), the halves with a branch a chunk / the halves unrolled / q whole: one row
   35-43 / 44-51 / 64-81, 2 rows 17 / 20-23 / 38-45, 5 rows 8.4-9.2 / 8.6-9.5 / 17-19 (bf16's 5 rows: ~10).
   Integer additions may be reordered, and gcc 12 did: it summed the 4 unrolled chunks' products among themselves
   before adding them to the sums, which needs twice the registers there are, so 5 rows spilled ~60 vectors to the
   stack a line; an empty asm statement after each addition keeps the sum in a register at that point, in order (the
   same integers). AMD EPYC Zen 3, 2 threads, G weights/s, a 7B checkpoint's own mapped matrices (11008 x 4096, 4096 x
   11008, 4096 x 4096) read from memory, the two builds alternating in one process, best of 4 rounds, two runs: 5 rows
   11.3-14.7 -> 16.1-22.2 (bf16's 7.9-9.5), one row unchanged (25-36; bf16's 14-18). */
#define INT8_TILE 2 /* weight rows a tile */
#define CHUNK 16 /* inputs a chunk */
#define ROW_CHUNK 32 /* bytes of one row's q for a chunk: 16 int16 */
#define BLOCK 8192 /* inputs a lane's int32 sum stays exact over: 8192 / 16 chunks x 2 products x 16383 x 128 < 2^31 */

/* One row on its grid (step 1) as int16 q, and the grid's step, 8 values at a time (the roundings of
   quant._int8_halves). The rows' q are interleaved by 16 inputs, in the order the sums read them: for the inputs 16c
   to 16c + 15, row r's at chunks + c * stride + 32 r (stride = 32 x rows). */
static float grid_row(const float *x, int64_t in, uint8_t *chunks, int64_t stride) {
    __m256 largest = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t k = 0; k < in; k += 8)
        largest = _mm256_max_ps(largest, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k))); /* |x|: the sign bit off */
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(largest), _mm256_extractf128_ps(largest, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float step = fmaxf(_mm_cvtss_f32(m), 1e-30f) / GRID; /* an all-zero row stays zero */
    const __m256 steps = _mm256_set1_ps(step);
    for (int64_t k = 0; k < in; k += 8) {
        __m256 q = _mm256_div_ps(_mm256_loadu_ps(x + k), steps);
        q = _mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); /* half to even: torch.round */
        const __m256i whole = _mm256_cvtps_epi32(q);
        uint8_t *at = chunks + (k / CHUNK) * stride + (k % CHUNK) * 2; /* 8 int16 (packs: exact, all in range) */
        _mm_store_si128((__m128i *)at,
                        _mm_packs_epi32(_mm256_castsi256_si128(whole), _mm256_extracti128_si256(whole, 1)));
    }
    return step;
}

static inline int64_t sum8(__m256i v) { /* the 8 int32 lanes' total, in int64 (each lane may be near 2^31) */
    const __m256i wide = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                          _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
    const __m128i s = _mm_add_epi64(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
    return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}

/* One chunk of 16 inputs (at k) of `tile` weight rows from o against every row's q: the sums of step 2. */
static inline __attribute__((always_inline)) void int8_chunk(const int8_t *w, const uint8_t *chunk, int64_t in,
                                                             const int rows, const int tile, int64_t o, int64_t k,
                                                             __m256i sums[][MAX_ROWS]) {
    __m256i wk[INT8_TILE];
    for (int t = 0; t < tile; t++)
        wk[t] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + (o + t) * in + k))); /* 16 int16 */
    for (int r = 0; r < rows; r++) {
        const __m256i q = _mm256_load_si256((const __m256i *)(chunk + r * ROW_CHUNK));
        for (int t = 0; t < tile; t++) {
            sums[t][r] = _mm256_add_epi32(sums[t][r], _mm256_madd_epi16(q, wk[t]));
            __asm__("" : "+x"(sums[t][r])); /* each sum added to in this order: see above */
        }
    }
}

static inline __attribute__((always_inline)) void int8_tile(const int8_t *w, const uint8_t *chunks, const float *step,
                                                            const float *scales, float *y, int64_t out, int64_t in,
                                                            const int rows, const int tile, int64_t o) {
    int64_t totals[INT8_TILE][MAX_ROWS] = {{0}};
    const int8_t *next = w + (o + 2 * tile <= out ? o + tile : o) * in; /* the next tile's rows, while there is one */
    for (int64_t start = 0; start < in; start += BLOCK) {
        const int64_t end = start + BLOCK < in ? start + BLOCK : in;
        __m256i sums[INT8_TILE][MAX_ROWS];
        for (int t = 0; t < tile; t++)
            for (int r = 0; r < rows; r++) sums[t][r] = _mm256_setzero_si256();
        int64_t k = start;
        for (; k + 64 <= end; k += 64) { /* 4 chunks a 64-byte line of each weight row, unrolled: no branch between */
            for (int t = 0; t < tile; t++) _mm_prefetch((const char *)(next + t * in + k), _MM_HINT_T1);
            const uint8_t *chunk = chunks + (k / CHUNK) * rows * ROW_CHUNK;
            for (int c = 0; c < 4; c++)
                int8_chunk(w, chunk + c * rows * ROW_CHUNK, in, rows, tile, o, k + c * CHUNK, sums);
        }
        for (; k < end; k += CHUNK) int8_chunk(w, chunks + (k / CHUNK) * rows * ROW_CHUNK, in, rows, tile, o, k, sums);
        for (int t = 0; t < tile; t++)
            for (int r = 0; r < rows; r++) totals[t][r] += sum8(sums[t][r]);
    }
    for (int t = 0; t < tile; t++)
        for (int r = 0; r < rows; r++) y[r * out + o + t] = (float)totals[t][r] * step[r] * scales[o + t]; /* step 3 */
}

/* The float loops without AVX-512: 8 fp32 a vector, 16 vector registers, vfmadd. AVX2 has no bf16 arithmetic, but a
   bf16 is the upper half of the bits of the fp32 of the same value, so 16 bf16 loaded at once (x's and the weights'
   alike) are 8 fp32 twice over, exactly: the even ones shifted left by 16, the odd ones with their lower half masked
   off; each half of x then multiplies the same half of the weights. Tiles of 2 weight rows, whose 2 x 6 sums and the
   values they multiply fit the 16 registers. AMD EPYC Zen 3, 2 threads, G weights/s from memory (12 random matrices
   a shape, 11008 x 4096, 4096 x 11008 and 4096 x 4096, the two builds alternating, best of 4, five runs), 5 bf16
   rows, where x was first widened into an fp32 copy and each weight by a zero-extending load and a shift, 8 at a
   time (x's bytes read twice over, one more instruction a weight vector): 5.7-12.2 -> 6.5-14.1, faster in 14 of the
   15 pairs by 1.1-1.6x (one 5.4 against 7.3); one row the same (12-18: the memory's rate). 5 rows are bound by the
   vfmadds (10 for 16 weights: at most ~15.7 G weights/s at 2.45 GHz). */
#define FLOAT_TILE 2 /* weight rows a tile: 2 x 6 sums */

/* The tile's sums (t, r) as y's values: the 8 lanes' total, halves, then quarters, then the last two. */
static inline __attribute__((always_inline)) void store_sums(__m256 sums[][MAX_ROWS], float *y, int64_t out,
                                                             const int rows, const int tile, int64_t o) {
    for (int t = 0; t < tile; t++)
        for (int r = 0; r < rows; r++) {
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(sums[t][r]), _mm256_extractf128_ps(sums[t][r], 1));
            s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            y[r * out + o + t] = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
        }
}

/* bf16's loop, apart from fp32's (float_tile): written as one loop with a branch on bf16, gcc 12 kept 5 rows' sums
   partly on the stack (10 stack accesses in the loop, `gcc -S`); apart, neither loop touches the stack. */
static inline __attribute__((always_inline)) void bf16_tile(const uint16_t *x, const uint16_t *w, float *y,
                                                            int64_t out, int64_t in, const int rows, const int tile,
                                                            int64_t o) {
    const __m256i upper = _mm256_set1_epi32((int)0xffff0000u); /* the odd bf16 of a pair: the upper half */
    __m256 sums[FLOAT_TILE][MAX_ROWS];
    for (int t = 0; t < tile; t++)
        for (int r = 0; r < rows; r++) sums[t][r] = _mm256_setzero_ps();
    /* the tile after next's rows, while any (short rows need the lead: 32000 x 768, one bf16 row, 1.78 -> 1.50 ms) */
    const uint16_t *next = w + (o + 3 * tile <= out ? o + 2 * tile : o) * in;
    for (int64_t k = 0; k < in; k += 16) {
        __m256 even[FLOAT_TILE], odd[FLOAT_TILE]; /* 16 weights of row o + t as 8 fp32 twice */
        for (int t = 0; t < tile; t++) {
            if (k % 32 == 0) _mm_prefetch((const char *)(next + t * in + k), _MM_HINT_T1); /* a 64-byte line */
            const __m256i wk = _mm256_loadu_si256((const __m256i *)(w + (o + t) * in + k));
            even[t] = _mm256_castsi256_ps(_mm256_slli_epi32(wk, 16));
            odd[t] = _mm256_castsi256_ps(_mm256_and_si256(wk, upper));
        }
        for (int r = 0; r < rows; r++) {
            const __m256i xk = _mm256_loadu_si256((const __m256i *)(x + r * in + k));
            const __m256 xe = _mm256_castsi256_ps(_mm256_slli_epi32(xk, 16));
            for (int t = 0; t < tile; t++) sums[t][r] = _mm256_fmadd_ps(xe, even[t], sums[t][r]);
            const __m256 xo = _mm256_castsi256_ps(_mm256_and_si256(xk, upper));
            for (int t = 0; t < tile; t++) sums[t][r] = _mm256_fmadd_ps(xo, odd[t], sums[t][r]);
        }
    }
    store_sums(sums, y, out, rows, tile, o);
}

static inline __attribute__((always_inline)) void float_tile(const char *x, const char *w, float *y, int64_t out,
                                                             int64_t in, const int rows, const int tile, int64_t o,
                                                             const int bf16) {
    if (bf16) return bf16_tile((const uint16_t *)x, (const uint16_t *)w, y, out, in, rows, tile, o);
    const float *xf = (const float *)x, *wf = (const float *)w;
    __m256 sums[FLOAT_TILE][MAX_ROWS];
    for (int t = 0; t < tile; t++)
        for (int r = 0; r < rows; r++) sums[t][r] = _mm256_setzero_ps();
    const float *next = wf + (o + 3 * tile <= out ? o + 2 * tile : o) * in; /* as bf16_tile's */
    for (int64_t k = 0; k < in; k += 8) {
        __m256 wk[FLOAT_TILE];
        for (int t = 0; t < tile; t++) {
            if (k % 16 == 0) _mm_prefetch((const char *)(next + t * in + k), _MM_HINT_T1); /* a 64-byte line */
            wk[t] = _mm256_loadu_ps(wf + (o + t) * in + k);
        }
        for (int r = 0; r < rows; r++) {
            const __m256 xr = _mm256_loadu_ps(xf + r * in + k);
            for (int t = 0; t < tile; t++) sums[t][r] = _mm256_fmadd_ps(xr, wk[t], sums[t][r]);
        }
    }
    store_sums(sums, y, out, rows, tile, o);
}
#endif

/* x (rows, in) fp32, w (out, in) int8, scales (out,) fp32 -> y (rows, out) fp32; in a multiple of a chunk's inputs
   (AVX-512 64, AVX2 16). Returns 0, -1 where the rows' grid (halves, or q) could not be allocated, -2 where rows is
   not 1 to MAX_ROWS. Each count of rows is its own loop (the switch), so that the compiler keeps the sums in registers.
   5 rows x 11008 x 4096, AMD EPYC, 2 threads, AVX-512: 1 weight row a tile 3.8 ms, 2 (with the next 2 prefetched)
   2.6, 3 (whose 30 sums and 9 more do not fit) 3.5. */
int int8_rows(const float *x, const int8_t *w, const float *scales, float *y, int64_t rows, int64_t out, int64_t in,
              int threads) {
    if (rows < 1 || rows > MAX_ROWS) return -2;
    const int64_t bytes = ROW_CHUNK / CHUNK * rows * in; /* AVX2, one row of 16 inputs: 32 bytes, where */
    uint8_t *chunks = (uint8_t *)aligned_alloc(64, (bytes + 63) / 64 * 64); /* aligned_alloc asks a multiple of 64 */
    if (chunks == NULL) return -1;
    float step[MAX_ROWS];
    for (int64_t r = 0; r < rows; r++) step[r] = grid_row(x + r * in, in, chunks + ROW_CHUNK * r, ROW_CHUNK * rows);
    const int64_t tiled = out - out % INT8_TILE;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < tiled; o += INT8_TILE) {
        switch (rows) {
            case 1: int8_tile(w, chunks, step, scales, y, out, in, 1, INT8_TILE, o); break;
            case 2: int8_tile(w, chunks, step, scales, y, out, in, 2, INT8_TILE, o); break;
            case 3: int8_tile(w, chunks, step, scales, y, out, in, 3, INT8_TILE, o); break;
            case 4: int8_tile(w, chunks, step, scales, y, out, in, 4, INT8_TILE, o); break;
            case 5: int8_tile(w, chunks, step, scales, y, out, in, 5, INT8_TILE, o); break;
            default: int8_tile(w, chunks, step, scales, y, out, in, 6, INT8_TILE, o); break;
        }
    }
    for (int64_t o = tiled; o < out; o++) int8_tile(w, chunks, step, scales, y, out, in, (int)rows, 1, o); /* odd out */
    free(chunks);
    return 0;
}

/* Returns 0, or -2 where rows is not 1 to MAX_ROWS (each count of rows its own loop, as int8_rows'). */
static int float_rows(const char *x, const char *w, float *y, int64_t rows, int64_t out, int64_t in, int threads,
                      const int bf16) {
    if (rows < 1 || rows > MAX_ROWS) return -2;
    const int64_t tiled = out - out % FLOAT_TILE;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < tiled; o += FLOAT_TILE) {
        switch (rows) {
            case 1: float_tile(x, w, y, out, in, 1, FLOAT_TILE, o, bf16); break;
            case 2: float_tile(x, w, y, out, in, 2, FLOAT_TILE, o, bf16); break;
            case 3: float_tile(x, w, y, out, in, 3, FLOAT_TILE, o, bf16); break;
            case 4: float_tile(x, w, y, out, in, 4, FLOAT_TILE, o, bf16); break;
            case 5: float_tile(x, w, y, out, in, 5, FLOAT_TILE, o, bf16); break;
            default: float_tile(x, w, y, out, in, 6, FLOAT_TILE, o, bf16); break;
        }
    }
    for (int64_t o = tiled; o < out; o++) float_tile(x, w, y, out, in, (int)rows, 1, o, bf16); /* the last few */
    return 0;
}

/* Returns 0, or -2 as float_rows. */
int bf16_rows(const uint16_t *x, const uint16_t *w, float *y, int64_t rows, int64_t out, int64_t in, int threads) {
    return float_rows((const char *)x, (const char *)w, y, rows, out, in, threads, 1);
}

int f32_rows(const float *x, const float *w, float *y, int64_t rows, int64_t out, int64_t in, int threads) {
    return float_rows((const char *)x, (const char *)w, y, rows, out, in, threads, 0);
}

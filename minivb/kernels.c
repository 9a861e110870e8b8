/* minivb's hand-written kernels (why: native.py): a few rows (1 to MAX_ROWS: greedy decoding's one, a beam search's
   few) times an int8 matrix (int8_rows), and times a bf16 or fp32 matrix (bf16_rows, f32_rows; after it). All read
   the matrix once for all the rows, a tile of its rows at a time against every row of x, with the next tile
   prefetched into the second-level cache meanwhile (more streams of memory in flight than one row's). Built twice, by
   the vector width PyTorch's own kernels use (native.py): with AVX-512 (VNNI for int8, BF16 for bf16), and with AVX2
   and FMA only (laptops, AMD before Zen 4), each loop 256 bits wide there; int8's numbers are the same, bit for bit.

   int8_rows computes exactly what quant.integer_linear computes, in one pass over the weight:
     1. each row x (in,) goes on a grid of 2 x GRID + 1 steps of its largest magnitude: q = round(x / step), an
        integer of at most GRID = 16383 in magnitude, so an int16 (quant.integer_linear cuts it in two int8 halves
        for oneDNN's int8 x int8 products; the sums below are the same integers);
     2. each int8 weight is widened to int16 (exact), and one instruction multiplies pairs of int16 and adds each
        pair's two products into an int32 lane (AVX-512 VNNI's vpdpwssd: 32 pairs into 16 lanes; AVX2's vpmaddwd,
        16 pairs into 8, then vpaddd; one row with AVX-512 takes q's two int8 halves instead: halves_rows).
        |q x w| <= 16383 x 128 < 2^21, so a lane stays exact over BLOCK inputs; each block's lanes are summed into
        int64: the integer sum(q * w);
     3. y[r, o] = sum(q * w) * step[r] * scales[o], the integer rounded once to fp32, in the order quant._sum_halves
        computes it (built with -ffp-contract=off: no fused multiply-add where that code makes two roundings).
   Rows of up to 65536 inputs (native.MAX_INPUTS; the int64 sums have room for far more). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_ROWS 6 /* a tile's sums stay in the vector registers up to this many rows */

#define HALF 128
#define GRID (HALF * HALF - 1)
#define BLOCK 8192 /* inputs a lane's int32 sum stays exact over: it adds BLOCK / 8 products at most (AVX2's 8 lanes;
                      AVX-512's 16 add half as many), 1024 x 16383 x 128 < 2^31 */

/* A row's grid step (step 1): its largest magnitude over GRID, 8 values at a time (the maximum is exact, vector or
   not: quant._int8_halves' step); an all-zero row stays zero. Once a call, not once a weight: 256 bits in both
   builds. */
static float grid_step(const float *x, int64_t in) {
    __m256 largest = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t k = 0; k < in; k += 8)
        largest = _mm256_max_ps(largest, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k))); /* |x|: the sign bit off */
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(largest), _mm256_extractf128_ps(largest, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return fmaxf(_mm_cvtss_f32(m), 1e-30f) / GRID;
}

/* The int8 loop's vectors, by build: a chunk of CHUNK inputs is one vector of int16 (q, or widened weights). */
#if defined(__AVX512F__)
/* 32 registers: a tile of 4 weight rows, whose 4 x 6 sums, 4 widened weights and a row's q take 29. AMD EPYC Zen 4,
   2 threads, G weights/s read from memory (8 random matrices a shape: 11008 x 4096, 4096 x 11008, 4096 x 4096), the
   builds alternating, best of 4, 5 rows: the loop before this one, on the two int8 halves of q with vpdpbusd (two
   instructions a row for 64 weights, as this one's two vpdpwssd, and a third for the weights' own sum), tiles of 2:
   18.4-19.0; q whole, tiles of 2: 17.4-19.3; tiles of 4: 29.5-33.9 (bf16's 5 rows: 16.5-16.9). 6 rows 14.4-15.0 ->
   28.9-32.8. One and 2 rows the same (34-36) while the memory reads ~35 GB/s; in minutes when it reads 50-70, one row
   42-48 against the halves' 50-54 (why is not understood: read from the third-level cache, this loop is the faster
   one, 103-126 against 88-89; vpmovsxbw, 32 weights widened, runs ~0.5 a cycle), so one row keeps the halves
   (below). */
#define INT8_TILE 4
#define CHUNK 32
typedef __m512i ivec;
static inline ivec zero(void) { return _mm512_setzero_si512(); }
static inline ivec load_q(const uint8_t *q) { return _mm512_load_si512(q); }
static inline ivec widen(const int8_t *w) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)w)); }
static inline ivec multiply_add(ivec sum, ivec q, ivec w) { return _mm512_dpwssd_epi32(sum, q, w); }
static inline int64_t lanes_total(ivec v) { /* the 16 int32 lanes' total, in int64 (each lane may be near 2^31) */
    return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
                                                    _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1))));
}
/* One row (greedy decoding) keeps the loop this build had before, on the row's two int8 halves, q = HALF x high + low
   (quant._int8_halves: high in [-128, 127], low in [0, HALF)): vpdpbusd multiplies 64 unsigned bytes by 64 signed
   ones and adds each 4 products into 16 int32 lanes, so a half goes in unsigned (high + 128, low) against the int8
   weights as they are, and a third sum, of the weights alone, takes the 128 back out: sum(high x w) = sum((high +
   128) x w) - 128 x sum(w). No widening: one row streams ~10 % faster than through the loop above (AMD EPYC Zen 4, the
   7B checkpoint's 225 mapped matrices, 150-200 passes each alternating: the median pass 1.08-1.11x the time there;
   2 rows 0.96x). */
static float halves_row(const float *x, int64_t in, uint8_t *halves) { /* high + 128, then low, 64 inputs at a time */
    const float step = grid_step(x, in);
    const __m512 steps = _mm512_set1_ps(step), half = _mm512_set1_ps(HALF), offset = _mm512_set1_ps(128.0f);
    for (int64_t k = 0; k < in; k += 16) {
        __m512 q = _mm512_div_ps(_mm512_loadu_ps(x + k), steps);
        q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); /* half to even: torch.round */
        __m512 h = _mm512_roundscale_ps(_mm512_div_ps(q, half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        __m512 l = _mm512_sub_ps(q, _mm512_mul_ps(half, h));
        uint8_t *high = halves + (k / 64) * 128 + k % 64;
        _mm_store_si128((__m128i *)high, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_add_ps(h, offset))));
        _mm_store_si128((__m128i *)(high + 64), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(l)));
    }
    return step;
}

static inline __attribute__((always_inline)) void halves_tile(const int8_t *w, const uint8_t *halves, float step,
                                                              const float *scales, float *y, int64_t out, int64_t in,
                                                              const int tile, int64_t o) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i high[2], low[2], weights[2]; /* a tile of up to 2 weight rows */
    for (int t = 0; t < tile; t++) high[t] = low[t] = weights[t] = _mm512_setzero_si512();
    const int8_t *next = w + (o + 2 * tile <= out ? o + tile : o) * in; /* the next tile's rows, while there is one */
    for (int64_t k = 0; k < in; k += 64) {
        const __m512i h = _mm512_load_si512(halves + 2 * k), l = _mm512_load_si512(halves + 2 * k + 64);
        for (int t = 0; t < tile; t++) {
            _mm_prefetch((const char *)(next + t * in + k), _MM_HINT_T1);
            const __m512i wk = _mm512_loadu_si512(w + (o + t) * in + k);
            weights[t] = _mm512_dpbusd_epi32(weights[t], ones, wk); /* sum(w), for the 128 of high + 128 */
            high[t] = _mm512_dpbusd_epi32(high[t], h, wk);
            low[t] = _mm512_dpbusd_epi32(low[t], l, wk);
        }
    }
    for (int t = 0; t < tile; t++) { /* |sums| <= 255 x 128 x 65536 < 2^31 */
        const int64_t high_sum = (int64_t)_mm512_reduce_add_epi32(high[t]) - 128 * _mm512_reduce_add_epi32(weights[t]);
        y[o + t] = (float)(HALF * high_sum + _mm512_reduce_add_epi32(low[t])) * step * scales[o + t]; /* step 3 */
    }
}

/* x (1, in), in a multiple of 64: as int8_rows. */
static int halves_rows(const float *x, const int8_t *w, const float *scales, float *y, int64_t out, int64_t in,
                       int threads) {
    uint8_t *halves = (uint8_t *)aligned_alloc(64, 2 * in);
    if (halves == NULL) return -1;
    const float step = halves_row(x, in, halves);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < out - out % 2; o += 2) halves_tile(w, halves, step, scales, y, out, in, 2, o);
    if (out % 2) halves_tile(w, halves, step, scales, y, out, in, 1, out - 1);
    free(halves);
    return 0;
}
#else
/* 16 registers: a tile of 2 weight rows, whose 2 x 6 sums, 2 widened weights and a row's q take 15. Integer
   additions may be reordered, and gcc 12 did: it summed the 4 unrolled chunks of a line (int8_tile) among themselves
   before adding them to the sums, which needs twice the registers there are, so 5 rows spilled ~60 vectors to the
   stack a line; an empty asm statement after each addition keeps the sum in a register at that point, in order (the
   same integers). AMD EPYC Zen 3, 2 threads, G weights/s, a 7B checkpoint's own mapped matrices (11008 x 4096, 4096 x
   11008, 4096 x 4096) read from memory, the two builds alternating in one process, best of 4 rounds, two runs: 5 rows
   11.3-14.7 -> 16.1-22.2 (bf16's 7.9-9.5), one row unchanged (25-36; bf16's 14-18). Before, the loop took the two
   halves of q as the VNNI one did, with a branch a chunk: weights in the caches, 2 threads, G weights/s, one row
   35-43, 2 rows 17, 5 rows 8.4-9.2; q whole, 64-81, 38-45, 17-19. */
#define INT8_TILE 2
#define CHUNK 16
typedef __m256i ivec;
static inline ivec zero(void) { return _mm256_setzero_si256(); }
static inline ivec load_q(const uint8_t *q) { return _mm256_load_si256((const __m256i *)q); }
static inline ivec widen(const int8_t *w) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w)); }
static inline ivec multiply_add(ivec sum, ivec q, ivec w) {
    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(q, w));
    __asm__("" : "+x"(sum)); /* each sum added to in this order: see above */
    return sum;
}
static inline int64_t lanes_total(ivec v) { /* the 8 int32 lanes' total, in int64 (each lane may be near 2^31) */
    const __m256i wide = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                          _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
    const __m128i s = _mm_add_epi64(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
    return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}
#endif
#define ROW_CHUNK (2 * CHUNK) /* bytes of one row's q for a chunk */

/* One row on its grid (step 1) as int16 q, and the grid's step, 8 values at a time (the roundings of
   quant._int8_halves: division and rounding are exact operations, vector or not). The rows' q are interleaved by
   CHUNK inputs, in the order the sums read them: for the inputs c x CHUNK on, row r's at chunks + c * stride + r x
   ROW_CHUNK (stride = ROW_CHUNK x rows). 256 bits wide in both builds, as grid_step. */
static float grid_row(const float *x, int64_t in, uint8_t *chunks, int64_t stride) {
    const float step = grid_step(x, in);
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

/* One chunk of CHUNK inputs (at k) of `tile` weight rows from o against every row's q: the sums of step 2. */
static inline __attribute__((always_inline)) void int8_chunk(const int8_t *w, const uint8_t *chunk, int64_t in,
                                                             const int rows, const int tile, int64_t o, int64_t k,
                                                             ivec sums[][MAX_ROWS]) {
    ivec wk[INT8_TILE];
    for (int t = 0; t < tile; t++) wk[t] = widen(w + (o + t) * in + k);
    for (int r = 0; r < rows; r++) {
        const ivec q = load_q(chunk + r * ROW_CHUNK);
        for (int t = 0; t < tile; t++) sums[t][r] = multiply_add(sums[t][r], q, wk[t]);
    }
}

/* The sums of `tile` weight rows from o against every row's q (step 2), then y (step 3). */
static inline __attribute__((always_inline)) void int8_tile(const int8_t *w, const uint8_t *chunks, const float *step,
                                                            const float *scales, float *y, int64_t out, int64_t in,
                                                            const int rows, const int tile, int64_t o) {
    int64_t totals[INT8_TILE][MAX_ROWS] = {{0}};
    const int8_t *next = w + (o + 2 * tile <= out ? o + tile : o) * in; /* the next tile's rows, while there is one */
    for (int64_t start = 0; start < in; start += BLOCK) {
        const int64_t end = start + BLOCK < in ? start + BLOCK : in;
        ivec sums[INT8_TILE][MAX_ROWS];
        for (int t = 0; t < tile; t++)
            for (int r = 0; r < rows; r++) sums[t][r] = zero();
        int64_t k = start;
        for (; k + 64 <= end; k += 64) { /* the chunks of a 64-byte line of each weight row, unrolled: no branch */
            for (int t = 0; t < tile; t++) _mm_prefetch((const char *)(next + t * in + k), _MM_HINT_T1);
            const uint8_t *chunk = chunks + (k / CHUNK) * rows * ROW_CHUNK;
            for (int c = 0; c < 64 / CHUNK; c++)
                int8_chunk(w, chunk + c * rows * ROW_CHUNK, in, rows, tile, o, k + c * CHUNK, sums);
        }
        for (; k < end; k += CHUNK) int8_chunk(w, chunks + (k / CHUNK) * rows * ROW_CHUNK, in, rows, tile, o, k, sums);
        for (int t = 0; t < tile; t++)
            for (int r = 0; r < rows; r++) totals[t][r] += lanes_total(sums[t][r]);
    }
    for (int t = 0; t < tile; t++)
        for (int r = 0; r < rows; r++) y[r * out + o + t] = (float)totals[t][r] * step[r] * scales[o + t]; /* step 3 */
}

/* gcc's loop-header copying (-ftree-ch, in -O3) left the loops above moving every sum to another register and back
   on each pass, and 4 to 6 rows spilling them to the stack (AVX-512: 5 rows ~50 stack accesses a line, read off
   `gcc -S`); without it, none. Other compilers take no such attribute. */
#if defined(__GNUC__) && !defined(__clang__)
#define NO_HEADER_COPY __attribute__((optimize("no-tree-ch")))
#else
#define NO_HEADER_COPY
#endif

/* x (rows, in) fp32, w (out, in) int8, scales (out,) fp32 -> y (rows, out) fp32; in a multiple of CHUNK (AVX-512 32,
   AVX2 16). Returns 0, -1 where the rows' grid could not be allocated, -2 where rows is not 1 to MAX_ROWS. Each count
   of rows is its own loop (the switch), so that the compiler keeps the sums in registers. */
NO_HEADER_COPY int int8_rows(const float *x, const int8_t *w, const float *scales, float *y, int64_t rows, int64_t out,
                             int64_t in, int threads) {
    if (rows < 1 || rows > MAX_ROWS) return -2;
#if defined(__AVX512F__)
    if (rows == 1 && in % 64 == 0) return halves_rows(x, w, scales, y, out, in, threads);
#endif
    const int64_t bytes = 2 * rows * in; /* the rows' q, int16 */
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

#if defined(__AVX512F__) /* ----------------------------------------------------- the float loops, AVX-512 */
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

#else /* ---------------------------------------------------------------- the float loops, AVX2 */
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

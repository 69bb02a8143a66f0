/* llmq's int4_avx2 kernel path: 2-4-bit weights times float32 activations on x86 CPUs with AVX2.
 *
 * Built once per machine by llmq/kernels/native.py (cc -O3 -mavx2 -mfma -mf16c -fopenmp) and called
 * through ctypes; llmq/kernels/avx2.py packs the layout below and holds the reference comparison.
 *
 * Layout: output rows in blocks of 64; block b is K columns of 8 uint32 words, and nibble i of word l
 * at column k is the code of output row 64 b + 8 i + l. One 32-byte load gives a column's 64 codes, and a
 * shift and a mask per 8 of them give 8 int32 lanes with no byte shuffles: a kernel that widens bytes
 * (vpmovzxbd) is bound by the shuffle port at half this one's rate (measured on a 2-core EPYC).
 *
 * With W[n, k] = (q[n, k] - z[g, n]) s[g, n] and g = k / group (groups contiguous: act-order columns are
 * permuted by the caller):
 *     y[m, n] = sum_g s[g, n] (sum_{k in g} q[n, k] x[m, k] - z[g, n] sum_{k in g} x[m, k])
 * in float32; scales and zeros are float16 (exact: checkpoint scales are float16, zeros small integers).
 * Decoding at batch 1 is bound by memory bandwidth: this reads 0.5 byte per weight where bf16 reads 2.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 64
/* codes prefetched this many bytes ahead: 10 -> 13 GB/s over weights that miss the cache (2-core EPYC) */
#define PREFETCH 2048

static inline __m256 half8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* codes i of a column's 8 words (output rows 8 i .. 8 i + 7 of the block) as floats */
static inline __m256 codes8(__m256i words, int i) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(words, 4 * i), _mm256_set1_epi32(15)));
}

/* y[0:64] = one row of activations x[0:K] times block `words` (K x 8 words) */
static void block_row(const float *x, const float *xsum, int64_t K, int64_t group, const uint32_t *words,
                      const uint16_t *scales, const uint16_t *zeros, int64_t N, float *y) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / group; ++g) {
        __m256 dot[8];  /* sum_{k in g} q x, per output row */
        for (int i = 0; i < 8; ++i) dot[i] = _mm256_setzero_ps();
        for (int64_t k = g * group; k < (g + 1) * group; ++k) {
            _mm_prefetch((const char *)(words + 8 * k + PREFETCH / 4), _MM_HINT_T0);
            __m256i w = _mm256_loadu_si256((const __m256i *)(words + 8 * k));
            __m256 xk = _mm256_broadcast_ss(x + k);
            for (int i = 0; i < 8; ++i) dot[i] = _mm256_fmadd_ps(codes8(w, i), xk, dot[i]);
        }
        __m256 xs = _mm256_set1_ps(xsum[g]);
        for (int i = 0; i < 8; ++i) {
            __m256 centred = _mm256_fnmadd_ps(half8(zeros + g * N + 8 * i), xs, dot[i]);  /* dot - z xsum */
            acc[i] = _mm256_fmadd_ps(half8(scales + g * N + 8 * i), centred, acc[i]);
        }
    }
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(y + 8 * i, acc[i]);
}

/* A packed layer, as llmq/kernels/avx2.py describes it once per layer (one ctypes argument, not six). */
struct layer {
    const uint32_t *packed;  /* [N / 64, K, 8] */
    const uint16_t *scales;  /* [K / group, N] float16 */
    const uint16_t *zeros;   /* [K / group, N] float16 */
    int64_t K, N, group;
};

enum { FLOAT32 = 0, BFLOAT16 = 1 };

static inline float from_bf16(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}

static inline uint16_t to_bf16(float f) {  /* round to nearest even, as torch's .to(torch.bfloat16) */
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  /* NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* y[M, N] = x[M, K] W^T, x and y float32 or bfloat16 (`dtype`) */
void llmq_int4_mm(const struct layer *L, const void *x, int64_t M, int dtype, void *y, int threads) {
    const int64_t K = L->K, N = L->N, group = L->group, G = K / group;
    float *xf = malloc(sizeof(float) * M * K), *xsum = malloc(sizeof(float) * M * G);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < G; ++g) {
            float s = 0.f;
            for (int64_t k = g * group; k < (g + 1) * group; ++k) {
                const int64_t i = m * K + k;
                xf[i] = dtype == BFLOAT16 ? from_bf16(((const uint16_t *)x)[i]) : ((const float *)x)[i];
                s += xf[i];
            }
            xsum[m * G + g] = s;
        }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < N / BLOCK; ++b)
        for (int64_t m = 0; m < M; ++m) {  /* the block's codes stay in cache across rows */
            float out[BLOCK];
            block_row(xf + m * K, xsum + m * G, K, group, L->packed + b * K * 8, L->scales + b * BLOCK,
                      L->zeros + b * BLOCK, N, out);
            for (int j = 0; j < BLOCK; ++j) {
                if (dtype == BFLOAT16)
                    ((uint16_t *)y)[m * N + b * BLOCK + j] = to_bf16(out[j]);
                else
                    ((float *)y)[m * N + b * BLOCK + j] = out[j];
            }
        }
    free(xsum);
    free(xf);
}

/* 8 floats rounded to bfloat16 (to nearest even, as to_bf16; the products here are finite) in 8 int32 lanes */
static inline __m256i bf16x8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
}

/* out[K, N] = W^T, (q - z) s in float32 exactly as the reference computes it, stored in float32 or rounded to
 * bfloat16 (`dtype`): a bf16 GEMM reads it without another pass over a float32 copy */
void llmq_int4_dequant_t(const struct layer *L, void *out, int dtype, int threads) {
    const int64_t K = L->K, N = L->N, group = L->group;
    const uint16_t *scales = L->scales, *zeros = L->zeros;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < N / BLOCK; ++b) {
        const uint32_t *words = L->packed + b * K * 8;
        for (int64_t k = 0; k < K; ++k) {
            const int64_t g = k / group;
            __m256i w = _mm256_loadu_si256((const __m256i *)(words + 8 * k));
            __m256 v[8];
            for (int i = 0; i < 8; ++i) {
                const int64_t n = b * BLOCK + 8 * i;
                v[i] = _mm256_mul_ps(_mm256_sub_ps(codes8(w, i), half8(zeros + g * N + n)), half8(scales + g * N + n));
            }
            if (dtype == BFLOAT16) {
                uint16_t *row = (uint16_t *)out + k * N + b * BLOCK;
                for (int i = 0; i < 8; i += 2) {  /* packus interleaves 128-bit lanes; the permute restores order */
                    __m256i pair = _mm256_packus_epi32(bf16x8(v[i]), bf16x8(v[i + 1]));
                    _mm256_storeu_si256((__m256i *)(row + 8 * i), _mm256_permute4x64_epi64(pair, 0xD8));
                }
            } else {
                for (int i = 0; i < 8; ++i) _mm256_storeu_ps((float *)out + k * N + b * BLOCK + 8 * i, v[i]);
            }
        }
    }
}

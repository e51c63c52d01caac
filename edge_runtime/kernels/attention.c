/* Attention of a few query rows over one KV head's blocks, reading the stored codes where they lie.
 *
 * One portable C11 source for aarch64 and x86_64, written with GCC's vector extensions (8-float vectors: two NEON
 * registers on aarch64, one AVX register on x86-64-v3, two SSE ones on baseline x86_64) and no library calls at
 * all, so that the built object loads anywhere: glibc, musl or Android alike. tools/build_kernels.py builds it;
 * edge_runtime/attention_kernel.py loads it with ctypes and lays its arguments out; edge_runtime/attention.py keeps
 * the numpy path that the tests compare it with.
 *
 * Query rows come in blocks of 8, transposed ([width][8]), so that one vector holds a dimension of all 8 rows. A
 * head's blocks are walked once, CHUNK rows at a time:
 * - keys, 4 rows at a time: each part's rows (edge_runtime/quant/code_parts.py) are widened into a small float
 *   tile, and scored against the query block with 8 independent vector sums (4 keys x 2 dimensions in flight): 4
 *   broadcasts and 2 vector loads feed 8 fused multiply-adds of 8 rows each;
 * - the chunk's scores are masked by position and folded into a running softmax per query row (maximum and sum; the
 *   accumulators are rescaled when the maximum grows);
 * - values: the chunk's rows are widened into a tile and summed into the accumulators by 4 query rows x 16
 *   dimensions held in registers across the whole chunk (8 vector sums; 2 loads feed 8 multiply-adds).
 * Each value part has its own accumulator, in its own domain (the caller takes it back); exact float32 blocks (the
 * recent ring, the step's own tokens, an fp32 cache) are read in place into one more. Nothing the size of the
 * context is ever written.
 */

#include <stddef.h>
#include <stdint.h>

#define GROUP 4       /* key rows scored together: the register blocking of score_block is written for 4 */
#define CHUNK 32      /* rows scored before their weights meet the values: amortizes rescaling */
#define ROW_BLOCK 8   /* query rows per vector */
#define MAX_WIDTH 1024
#define MAX_ROWS 256
#define MAX_PARTS 4
/* floats of scratch a call needs (the caller's, one buffer per thread): key tile, value tile, scores, weights */
#define SCRATCH_FLOATS (GROUP * MAX_WIDTH + CHUNK * MAX_WIDTH + 2 * CHUNK * MAX_ROWS)
#define EXPORT __attribute__((visibility("default")))

typedef float vf __attribute__((vector_size(32)));
typedef float vf_unaligned __attribute__((vector_size(32), aligned(4))); /* how vectors are loaded and stored */

/* The compiler may turn copies and clears into these calls even here; the object links against nothing, so it
 * brings its own, hidden (never interposed on the process's). */
__attribute__((visibility("hidden"))) void *memcpy(void *restrict dst, const void *restrict src, size_t n) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--) *d++ = *s++;
    return dst;
}

__attribute__((visibility("hidden"))) void *memset(void *dst, int c, size_t n) {
    unsigned char *d = dst;
    while (n--) *d++ = (unsigned char)c;
    return dst;
}

static inline vf load8(const float *p) { return *(const vf_unaligned *)p; }

static inline void store8(float *p, vf v) { *(vf_unaligned *)p = v; }

static inline int64_t padded(int64_t width) { return (width + 15) / 16 * 16; }

static void copy_floats(float *restrict dst, const float *restrict src, int64_t n) {
    for (int64_t j = 0; j < n; j++) dst[j] = src[j];
}

static void zero_floats(float *dst, int64_t n) {
    for (int64_t j = 0; j < n; j++) dst[j] = 0.0f;
}

enum { F32 = 0, F16 = 1, I8 = 2, PACKED = 3 };

typedef struct {
    const uint8_t *codes; /* [n, stride] rows */
    int64_t stride;       /* bytes per row */
    const float *scale;   /* [n] per-row factor, or NULL */
    const float *lookup;  /* PACKED: the codec's byte table (packing.py's LookupTable.table) */
    float coef;
    int32_t kind, bits, width;
} Part;

typedef struct {
    const float *keys, *values; /* [n, dim] */
    const int64_t *positions;   /* [n] */
    int64_t n;
} ExactBlock;

/* One call: a head's coded block (its parts; none when the cache is exact) and some float32 blocks. Row i of block
 * b is seen by token t when bounds[b][0][t] <= positions[i] <= bounds[b][1][t], block 0 being the coded one. Query
 * row r belongs to token min(r / groups, tokens - 1); rows is a multiple of 8 (padding rows' results are junk).
 * Widths below are padded to 16 (P(w)). The outputs go to `out`, in this order: m [rows] (running maximum), s [rows]
 * (sum of exp(score - m)), then per value part p [rows][P(width_p)] and for the exact blocks [rows][P(dim)] the sums
 * of exp(score - m) * value, each value part in its own domain. */
typedef struct {
    const float *const *queries; /* per key part: [rows / 8][P(width_p)][8], its domain's query rows, transposed */
    const Part *key_parts, *value_parts;
    int32_t n_key_parts, n_value_parts, n_exact, _pad;
    const int64_t *coded_positions;
    int64_t coded_n;
    const float *query; /* [rows / 8][P(dim)][8], for the exact blocks */
    int64_t dim, rows, groups, tokens;
    const ExactBlock *exact;
    const int64_t *bounds; /* [1 + n_exact][2][tokens] */
    float *out;
    float *scratch; /* SCRATCH_FLOATS of the calling thread's */
} Call;

/* The SHA-256 of this file when it was built, which the loader compares with the source it ships beside. */
#ifndef SOURCE_SHA256
#define SOURCE_SHA256 "unknown"
#endif
EXPORT const char edge_runtime_attention_source[] = SOURCE_SHA256;
EXPORT const int64_t edge_runtime_attention_scratch_floats = SCRATCH_FLOATS;
EXPORT const int64_t edge_runtime_attention_max_width = MAX_WIDTH;
EXPORT const int64_t edge_runtime_attention_max_rows = MAX_ROWS;

/* exp(x) in float32 to about 1 ulp without libm: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial
 * (Cephes' expf coefficients), times 2**n built in the exponent bits; exp(-inf) and anything below -87.3 is 0. */
static inline float exp_f32(float x) {
    if (x < -87.33654f) return 0.0f;
    if (x > 88.72283f) x = 88.72283f;
    float n = (float)(int32_t)(x * 1.44269504088896341f + (x >= 0 ? 0.5f : -0.5f));
    float r = x - n * 0.693359375f;
    r -= n * -2.12194440e-4f;
    float r2 = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;
    union { float f; int32_t i; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f;
}

/* One stored row of a part -> out[0:P(width)] float32, zeros past width. */
static void widen(const Part *part, int64_t row, float *restrict out) {
    const uint8_t *bytes = part->codes + row * part->stride;
    const int32_t width = part->width;
    switch (part->kind) {
    case F32:
        copy_floats(out, (const float *)bytes, width);
        break;
    case F16: {
#if defined(__F16C__) || defined(__aarch64__)
        /* the hardware converts: vcvtph2ps (x86-64-v3's F16C), fcvtl (every Armv8-A core) */
        const _Float16 *h = (const _Float16 *)bytes;
        for (int32_t j = 0; j < width; j++) out[j] = (float)h[j];
#else
        /* binary16 -> binary32 by its bits: magnitude shifted and rebiased by a multiply (subnormals too), sign */
        const uint16_t *h = (const uint16_t *)bytes;
        uint32_t *bits = (uint32_t *)out;
        for (int32_t j = 0; j < width; j++) bits[j] = (uint32_t)(h[j] & 0x7FFF) << 13;
        for (int32_t j = 0; j < width; j++) out[j] *= 5.192296858534828e+33f; /* 2**112 */
        for (int32_t j = 0; j < width; j++) bits[j] |= (uint32_t)(h[j] & 0x8000) << 16;
#endif
        break;
    }
    case I8: {
        const int8_t *c = (const int8_t *)bytes;
        for (int32_t j = 0; j < width; j++) out[j] = (float)c[j];
        break;
    }
    default: { /* packing.py's layouts, through the codec's byte table: each byte (for 3 bits: each low byte and its
                * high nibble) to its 8/bits values at once; a row is codes for a multiple of 8 values */
        const float *lookup = part->lookup;
        const int32_t bytes_per_plane = (width + 7) / 8;
        switch (part->bits) {
        case 4:
            for (int32_t b = 0; b < 4 * bytes_per_plane; b++)
                for (int k = 0; k < 2; k++) out[2 * b + k] = lookup[2 * bytes[b] + k];
            break;
        case 2:
            for (int32_t b = 0; b < 2 * bytes_per_plane; b++)
                for (int k = 0; k < 4; k++) out[4 * b + k] = lookup[4 * bytes[b] + k];
            break;
        case 1:
            for (int32_t b = 0; b < bytes_per_plane; b++)
                for (int k = 0; k < 8; k++) out[8 * b + k] = lookup[8 * bytes[b] + k];
            break;
        default: { /* 3 bits: a 2-bit plane of the low bits (4 codes a byte), then a 1-bit plane of the high bits */
            const uint8_t *high = bytes + 2 * bytes_per_plane;
            for (int32_t g = 0; g < 2 * bytes_per_plane; g++) {
                const int index = bytes[g] | (((high[g >> 1] >> ((g & 1) << 2)) & 15) << 8);
                for (int k = 0; k < 4; k++) out[4 * g + k] = lookup[4 * index + k];
            }
        }
        }
    }
    }
    zero_floats(out + width, padded(width) - width);
}

/* Factor of a part's row: its constant times its per-row scale. */
static inline float factor(const Part *part, int64_t row) {
    return part->coef * (part->scale ? part->scale[row] : 1.0f);
}

/* scores[column + g][block rows] += factors[g] * <query rows of the block, key g> for the 4 keys k0..k3, every row
 * block. qT is [rows / 8][width][8] (width a multiple of 16). */
static void score_group(const float *qT, int64_t rows, int64_t width, const float *k0, const float *k1,
                        const float *k2, const float *k3, const float *factors, float *scores, int column) {
    for (int64_t block = 0; block < rows / ROW_BLOCK; block++) {
        const float *q = qT + block * width * ROW_BLOCK;
        vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
        for (int64_t j = 0; j < width; j += 2) {
            const vf q0 = load8(q + j * ROW_BLOCK), q1 = load8(q + (j + 1) * ROW_BLOCK);
            a0 += q0 * k0[j];
            a1 += q0 * k1[j];
            a2 += q0 * k2[j];
            a3 += q0 * k3[j];
            b0 += q1 * k0[j + 1];
            b1 += q1 * k1[j + 1];
            b2 += q1 * k2[j + 1];
            b3 += q1 * k3[j + 1];
        }
        const vf sums[GROUP] = {a0 + b0, a1 + b1, a2 + b2, a3 + b3};
        for (int g = 0; g < GROUP; g++) {
            float *s = scores + (column + g) * rows + block * ROW_BLOCK;
            store8(s, load8(s) + sums[g] * factors[g]);
        }
    }
}

/* acc[r][0:width] += sum over k < count of weights[k][r] * values[k][0:width], every row r: 4 rows x 16 dimensions
 * held in 8 vector sums across the chunk. values rows are `stride` floats apart; width is a multiple of 16. */
static void accumulate(float *acc, int64_t rows, int64_t width, const float *values, int64_t stride,
                       const float *weights, int count) {
    for (int64_t r = 0; r < rows; r += 4) {
        for (int64_t j = 0; j < width; j += 16) {
            float *c = acc + r * width + j;
            vf c00 = load8(c), c01 = load8(c + 8), c10 = load8(c + width), c11 = load8(c + width + 8);
            vf c20 = load8(c + 2 * width), c21 = load8(c + 2 * width + 8);
            vf c30 = load8(c + 3 * width), c31 = load8(c + 3 * width + 8);
            for (int k = 0; k < count; k++) {
                const vf v0 = load8(values + k * stride + j), v1 = load8(values + k * stride + j + 8);
                const float *w = weights + k * rows + r;
                c00 += w[0] * v0;
                c01 += w[0] * v1;
                c10 += w[1] * v0;
                c11 += w[1] * v1;
                c20 += w[2] * v0;
                c21 += w[2] * v1;
                c30 += w[3] * v0;
                c31 += w[3] * v1;
            }
            store8(c, c00);
            store8(c + 8, c01);
            store8(c + width, c10);
            store8(c + width + 8, c11);
            store8(c + 2 * width, c20);
            store8(c + 2 * width + 8, c21);
            store8(c + 3 * width, c30);
            store8(c + 3 * width + 8, c31);
        }
    }
}

typedef struct {
    int64_t rows, groups, tokens;
    float *m, *s;
    float *accs[MAX_PARTS + 1]; /* the value parts', then the exact blocks' */
    int64_t widths[MAX_PARTS + 1];
    int n_accs;
} State;

/* Mask a chunk's scores ([CHUNK][rows]) by position, fold them into the running softmax, leave their weights. */
static void softmax_chunk(State *st, float *scores, const int64_t *positions, int64_t start, int count,
                          const int64_t *lower, const int64_t *upper) {
    const int64_t rows = st->rows;
    for (int64_t r = 0; r < rows; r++) {
        int64_t t = r / st->groups;
        if (t >= st->tokens) t = st->tokens - 1;
        const int64_t lo = lower[t], hi = upper[t];
        float top = st->m[r];
        for (int i = 0; i < count; i++) {
            const int64_t p = positions[start + i];
            if (p < lo || p > hi) scores[i * rows + r] = -__builtin_inff();
            else if (scores[i * rows + r] > top) top = scores[i * rows + r];
        }
        if (top == -__builtin_inff()) {
            for (int i = 0; i < CHUNK; i++) scores[i * rows + r] = 0.0f;
            continue;
        }
        if (top > st->m[r]) {
            const float rescale = exp_f32(st->m[r] - top);
            st->s[r] *= rescale;
            for (int p = 0; p < st->n_accs; p++) {
                float *acc = st->accs[p] + r * st->widths[p];
                for (int64_t j = 0; j < st->widths[p]; j++) acc[j] *= rescale;
            }
            st->m[r] = top;
        }
        float sum = 0.0f;
        for (int i = 0; i < count; i++) {
            const float weight = exp_f32(scores[i * rows + r] - top);
            scores[i * rows + r] = weight;
            sum += weight;
        }
        st->s[r] += sum;
        for (int i = count; i < CHUNK; i++) scores[i * rows + r] = 0.0f;
    }
}

/* Runs one call (see Call). Returns 0, or -1 for a part wider than MAX_WIDTH, more than MAX_ROWS rows, rows not a
 * multiple of 8, or more than MAX_PARTS value parts (the caller checks first; this is a guard). */
EXPORT int edge_runtime_attend_head(const Call *call) {
    const int64_t rows = call->rows, dim = call->dim, tokens = call->tokens, pdim = padded(dim);
    float *const ktile = call->scratch, *const vtile = ktile + GROUP * MAX_WIDTH;
    float *const scores = vtile + CHUNK * MAX_WIDTH, *const weights = scores + CHUNK * MAX_ROWS;
    float factors[GROUP];
    if (pdim > MAX_WIDTH || rows > MAX_ROWS || rows % ROW_BLOCK || call->n_value_parts > MAX_PARTS) return -1;
    for (int p = 0; p < call->n_key_parts; p++) if (padded(call->key_parts[p].width) > MAX_WIDTH) return -1;
    State st = {.rows = rows, .groups = call->groups, .tokens = tokens, .m = call->out, .s = call->out + rows};
    float *next = call->out + 2 * rows;
    for (int p = 0; p <= call->n_value_parts; p++) {
        const int64_t width = p < call->n_value_parts ? padded(call->value_parts[p].width) : pdim;
        if (width > MAX_WIDTH) return -1;
        st.accs[p] = next;
        st.widths[p] = width;
        next += rows * width;
    }
    st.n_accs = call->n_value_parts + 1;
    float *const acc_exact = st.accs[call->n_value_parts];
    for (int64_t r = 0; r < rows; r++) {
        st.m[r] = -__builtin_inff();
        st.s[r] = 0.0f;
    }
    zero_floats(call->out + 2 * rows, next - (call->out + 2 * rows));

    for (int64_t start = 0; start < call->coded_n; start += CHUNK) {
        const int count = (int)(call->coded_n - start < CHUNK ? call->coded_n - start : CHUNK);
        zero_floats(scores, CHUNK * rows);
        for (int column = 0; column < count; column += GROUP) {
            for (int p = 0; p < call->n_key_parts; p++) {
                const Part *part = &call->key_parts[p];
                for (int g = 0; g < GROUP; g++) {
                    float *row = ktile + g * MAX_WIDTH;
                    if (column + g < count) {
                        widen(part, start + column + g, row);
                        factors[g] = factor(part, start + column + g);
                    } else {
                        zero_floats(row, padded(part->width));
                        factors[g] = 0.0f;
                    }
                }
                score_group(call->queries[p], rows, padded(part->width), ktile, ktile + MAX_WIDTH,
                            ktile + 2 * MAX_WIDTH, ktile + 3 * MAX_WIDTH, factors, scores, column);
            }
        }
        softmax_chunk(&st, scores, call->coded_positions, start, count, call->bounds, call->bounds + tokens);
        for (int p = 0; p < call->n_value_parts; p++) {
            const Part *part = &call->value_parts[p];
            for (int k = 0; k < count; k++) {
                widen(part, start + k, vtile + k * MAX_WIDTH);
                const float f = factor(part, start + k);
                for (int64_t r = 0; r < rows; r++) weights[k * rows + r] = scores[k * rows + r] * f;
            }
            accumulate(st.accs[p], rows, padded(part->width), vtile, MAX_WIDTH, weights, count);
        }
    }
    static const float ones[GROUP] = {1.0f, 1.0f, 1.0f, 1.0f}, zeros[MAX_WIDTH];
    for (int b = 0; b < call->n_exact; b++) {
        const ExactBlock *block = &call->exact[b];
        const int64_t *lower = call->bounds + (b + 1) * 2 * tokens, *upper = lower + tokens;
        for (int64_t start = 0; start < block->n; start += CHUNK) {
            const int count = (int)(block->n - start < CHUNK ? block->n - start : CHUNK);
            zero_floats(scores, CHUNK * rows);
            for (int column = 0; column < count; column += GROUP) {
                const float *k[GROUP];
                for (int g = 0; g < GROUP; g++) {
                    if (column + g >= count) {
                        k[g] = zeros;
                    } else if (pdim == dim) {
                        k[g] = block->keys + (start + column + g) * dim;
                    } else {
                        float *row = ktile + g * MAX_WIDTH;
                        copy_floats(row, block->keys + (start + column + g) * dim, dim);
                        zero_floats(row + dim, pdim - dim);
                        k[g] = row;
                    }
                }
                score_group(call->query, rows, pdim, k[0], k[1], k[2], k[3], ones, scores, column);
            }
            softmax_chunk(&st, scores, block->positions, start, count, lower, upper);
            const float *values = block->values + start * dim;
            int64_t stride = dim;
            if (pdim != dim) {
                for (int i = 0; i < count; i++) {
                    copy_floats(vtile + i * MAX_WIDTH, values + i * dim, dim);
                    zero_floats(vtile + i * MAX_WIDTH + dim, pdim - dim);
                }
                values = vtile;
                stride = MAX_WIDTH;
            }
            accumulate(acc_exact, rows, pdim, values, stride, scores, count);
        }
    }
    return 0;
}

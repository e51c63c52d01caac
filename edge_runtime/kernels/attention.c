/* Attention of a few query rows over one KV head's blocks, reading the stored codes where they lie.
 *
 * One portable C11 source for aarch64 and x86_64, written with GCC's vector extensions and no library calls at all,
 * so that the built object loads anywhere: glibc, musl or Android alike. tools/build_kernels.py builds it;
 * edge_runtime/attention_kernel.py loads it with ctypes and lays its arguments out; edge_runtime/attention.py keeps
 * the numpy path that the tests compare it with. The loops that do the multiply-adds use the machine's own vector
 * (16 floats with AVX-512, 8 with AVX, 4 with NEON or SSE): GCC keeps a vector wider than the machine's in memory,
 * and an 8-float sum went through the stack at every multiply-add on aarch64 (baseline x86_64 ran 8-9 ns a value,
 * now ~0.9).
 *
 * A head's blocks are walked once, CHUNK rows at a time, the query rows ([rows][width], padded to 8, or to 16 with
 * AVX-512) in place:
 * - keys, 4 rows at a time: each part's rows (edge_runtime/quant/code_parts.py) are widened into a small float
 *   tile and scored along the dimensions, 2 query rows x 4 keys in 8 independent vector sums (6 vector loads feed
 *   8 fused multiply-adds; with 32 registers, AVX-512's or NEON's, 4 query rows in 16 sums), summed across their
 *   lanes once per row pair; a part with integer levels (TurboQuant's Hadamard-rotated ones) is decoded to bytes
 *   instead and scored against the query's integers in exact integer sums (score_group_int);
 * - the chunk's scores are masked by position and folded into a running softmax per query row (maximum and sum, a
 *   vector of rows at a time; the accumulators are rescaled when the maximum grows); a chunk no token sees is
 *   skipped;
 * - values: the chunk's rows are widened into a tile (an integer part's to bytes, converted as loaded, on x86-64-v3
 *   and up) and summed into the accumulators by 4 query rows x 16 dimensions held in registers across the whole chunk (with AVX 8 vector sums, 2 loads and 4 broadcasts feed 8
 *   multiply-adds; with NEON 16, 5 loads feed 16 multiply-adds by lane; AVX-512 holds 8 rows x 32 dimensions).
 * Each value part has its own accumulator, in its own domain, taken back to the value's once at the end (its
 * transform, its channels; the transforms run through the same two register blockings); exact float32 blocks (the
 * recent ring, the step's own tokens, an fp32 cache) have their keys read in place and their values copied a chunk
 * at a time into the tile, into one more. Nothing the size of the context is ever written.
 */

#include <stddef.h>
#include <stdint.h>

#define GROUP 4       /* key rows scored together: the register blocking of dot_2x4 is written for 4 */
#define CHUNK 32      /* rows scored before their weights meet the values: amortizes rescaling */
#define MAX_WIDTH 1024
/* Tile rows are a part's padded width plus 16 floats apart: at a power-of-two stride, the same dimension of
 * every row of a tile maps to the same few L1 sets, and accumulate's column walks would evict each other. */
#define SKEW 16
#define MAX_ROWS 64    /* a step of 4 tokens (attention.py's KERNEL_TOKENS) with 16 query heads per KV head */
#define MAX_PARTS 4
/* floats of scratch a call needs (the caller's, one buffer per thread): key tile, value tile, scores, weights,
 * running maximum and sum, the query rows of each key part and of the exact blocks, an accumulator for each value
 * part and the exact blocks, each integer key part's query integers (16-bit at most) with their steps and sums, the
 * query's channels gathered for a transform */
#define SCRATCH_USED ((GROUP + CHUNK) * (MAX_WIDTH + SKEW) + 2 * CHUNK * MAX_ROWS + 2 * MAX_ROWS \
                        + 2 * (MAX_PARTS + 1) * MAX_ROWS * MAX_WIDTH + MAX_PARTS * MAX_ROWS * (MAX_WIDTH / 2 + 2) \
                        + MAX_ROWS * MAX_WIDTH)
/* and 16 floats to start at a cache line: the caller's buffer (numpy's) may be 16 bytes past one, and then every
 * other vector load of a tile would straddle two lines */
#define SCRATCH_FLOATS (SCRATCH_USED + 16)
#define EXPORT __attribute__((visibility("default")))

/* Half-precision and int8 conversion and the code lookups are written with each machine's intrinsics (GCC 12 turns a
 * vector conversion of _Float16 into one instruction per value, its generic shuffles and int8 conversions into more
 * than the machine needs); the headers are inline functions only. */
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#else
#include <emmintrin.h>
#endif

typedef float vf __attribute__((vector_size(32)));
typedef float vf_unaligned __attribute__((vector_size(32), aligned(4))); /* how vectors are loaded and stored */
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));

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

/* The two loops that do the multiply-adds are written for the machine's own registers (16 floats with AVX-512, 8
 * with AVX, 4 with NEON or SSE): GCC lowers a vector wider than the machine's to pieces kept in memory, so on
 * aarch64 every multiply-add of an 8-float sum went through the stack. */
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
/* Keys scored against 4 query rows at a time (dot_4x4: 16 sums and 4 keys held) where the machine has 32 vector
 * registers: AVX-512, and every Armv8-A core; AVX2 and SSE2 have 16 and score 2 rows (dot_2x4). */
#if LANES == 16 || defined(__aarch64__)
#define WIDE_SCORING 1
#else
#define WIDE_SCORING 0
#endif
/* query rows are padded to a multiple of this: the softmax takes a vector of rows at a time */
#define ROW_BLOCK (LANES < 8 ? 8 : LANES)
typedef float vn __attribute__((vector_size(4 * LANES)));
typedef float vn_unaligned __attribute__((vector_size(4 * LANES), aligned(4)));
typedef int32_t vni __attribute__((vector_size(4 * LANES)));
static inline vn loadn(const float *p) { return *(const vn_unaligned *)p; }
static inline void storen(float *p, vn v) { *(vn_unaligned *)p = v; }

static inline vf load8(const float *p) { return *(const vf_unaligned *)p; }

/* x86-64-v3 scores and sums half-precision keys and values where they lie, converting 8 (16 with AVX-512) as they
 * are loaded (one vcvtph2ps): a row widened into a float tile first costs a conversion, a store and then a load at
 * every use, and that was a fifth of a call (one core, 2k fp16 rows of 512, with the prefetching below: 0.24 -> 0.21
 * ns a value; the AVX-512 build, 32k rows: 6.69 ms a call in place against 7.41 through the tile). Arm keeps the
 * tile: its conversion (fcvtl, 4 at a time) issues where the multiply-adds do, and a key is read by each group of
 * query rows; not measured on an Arm core (emulation cannot time). */
#if defined(__F16C__)
#define HALF_IN_PLACE 1
#if LANES == 16
static inline vn loadh(const uint16_t *p) { return (vn)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
#else
static inline vn loadh(const uint16_t *p) { return (vn)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
#endif
#else
#define HALF_IN_PLACE 0
#endif
#define INLINE static inline __attribute__((always_inline))

/* x86-64-v3 and up also sum an integer part's values from a tile of bytes (their levels, decode_levels'), converted 8
 * or 16 at a time as they are loaded, like half precision: a quarter of a float tile's stores and loads. */
#define BYTES_IN_PLACE HALF_IN_PLACE
enum { FORM_F32 = 0, FORM_F16 = 1, FORM_I8 = 2 }; /* how a row's elements are stored: float, half, signed byte */

/* Element j of a row in `form` (a constant at every call: each caller gets its own loop). */
INLINE vn load_row(const void *row, int64_t j, int form) {
#if HALF_IN_PLACE
    if (form == FORM_F16) return loadh((const uint16_t *)row + j);
#if LANES == 16
    if (form == FORM_I8)
        return (vn)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)row + j))));
#else
    if (form == FORM_I8)
        return (vn)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)row + j))));
#endif
#endif
    (void)form;
    return loadn((const float *)row + j);
}

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
    const float *transform;  /* [n_channels][width] (code_parts.py's T_p), or NULL for the identity */
    const int64_t *channels; /* [n_channels]: the channels of the vector the part covers, or NULL for all */
    /* [rounds][width], or NULL: the transform is diag(hadamard[0]) H diag(hadamard[1]) H ..., H the Sylvester
     * Hadamard matrix of a power-of-two width (turboquant.py's hadamard_rotation), applied as fast transforms */
    const float *hadamard;
    int64_t n_channels;
    float coef;
    int32_t kind, bits, width, rounds;
    /* a key part's [2**bits] int8 values, lookup's divided by `step`, or NULL: where given, the part's keys are
     * scored in integers (score_group_int) */
    const int8_t *levels;
    float step;
} Part;

typedef struct {
    const float *keys, *values;               /* [n, dim] */
    const int64_t *positions, *lower, *upper; /* [n]; [tokens], [tokens] */
    int64_t n;
} ExactBlock;

/* One call: a head's coded block (its parts; none when the cache is exact) and some float32 blocks. Row i of a block
 * is seen by token t when lower[t] <= positions[i] <= upper[t]. Query row r ([rows][dim]) belongs to token
 * min(r / groups, tokens - 1). With `finish` (no other share of the head to merge), `out` gets the attention output
 * [rows][dim]. Without, it gets the partial softmax: m [rows] (running maximum), s [rows] (sum of exp(score - m)),
 * then [rows][dim] the sum of exp(score - m) * value. */
typedef struct {
    const Part *key_parts, *value_parts;
    const ExactBlock *exact;
    const int64_t *coded_positions, *coded_lower, *coded_upper;
    int64_t coded_n;
    const float *query; /* [rows][dim] */
    int64_t dim, rows, groups, tokens;
    int32_t n_key_parts, n_value_parts, n_exact, finish;
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

typedef uint16_t u16_unaligned __attribute__((aligned(1), may_alias));
typedef uint32_t u32_unaligned __attribute__((aligned(1), may_alias));
static inline uint32_t load_u16(const uint8_t *p) { return *(const u16_unaligned *)p; }
static inline uint32_t load_u32(const uint8_t *p) { return *(const u32_unaligned *)p; }
typedef uint64_t u64_unaligned __attribute__((aligned(1), may_alias));
static inline uint64_t load_u64(const uint8_t *p) { return *(const u64_unaligned *)p; }

/* A packed part's 2**bits values (centroids, signs), read back from its byte table (entry 0 of byte c is value c;
 * for 3 bits the table is indexed by a low byte and a high nibble: packing.py's LookupTable), held where one
 * variable shuffle finds them: two vectors for x86-64-v3's vpermps, 64 bytes for NEON's tbl; baseline x86_64 (SSE2,
 * no variable shuffle of floats: GCC's generic one spilled every lane) looks them up one at a time. */
typedef struct {
#if defined(__aarch64__)
    uint8x16x4_t bytes;
#elif defined(__AVX2__)
    vf low, high;
#if LANES == 16
    vn all; /* all 16 in one register, for AVX-512's one-register vpermps */
#endif
#else
    float values[16];
#endif
} Centroids;

static Centroids centroids(const Part *part) {
    float values[16] = {0};
    const int count = 1 << part->bits;
    for (int c = 0; c < count; c++)
        values[c] = part->bits == 3 ? part->lookup[4 * ((c & 3) | (c >> 2) << 8)] : part->lookup[8 / part->bits * c];
    Centroids t;
#if defined(__aarch64__)
    t.bytes = vld1q_u8_x4((const uint8_t *)values);
#elif defined(__AVX2__)
    t.low = load8(values);
    t.high = load8(values + 8);
#if LANES == 16
    t.all = loadn(values);
#endif
#else
    copy_floats(t.values, values, 16);
#endif
    return t;
}

/* out[0:8] = the values of 8 codes (each < 16). NEON's tbl looks up bytes: code c becomes the byte indices 4c .. 4c + 3 of
 * its float (c * 0x04040404 + 0x03020100, little-endian lanes). GCC's generic shuffle is scalar code there. AVX2
 * looks each code up in both halves (vpermps reads the low 3 bits) and picks by bit 3 moved to the sign (vblendvps):
 * GCC's two-vector shuffle took a mask and a compare more. */
static inline void lookup8(const Centroids *t, vu codes, float *out) {
#if defined(__aarch64__)
    union { vu v; uint32x4_t q[2]; } c = {codes};
    for (int h = 0; h < 2; h++) {
        const uint32x4_t index = vmlaq_n_u32(vdupq_n_u32(0x03020100u), c.q[h], 0x04040404u);
        vst1q_f32(out + 4 * h, vreinterpretq_f32_u8(vqtbl4q_u8(t->bytes, vreinterpretq_u8_u32(index))));
    }
#elif defined(__AVX2__)
    const __m256i index = (__m256i)codes;
    const __m256 low = _mm256_permutevar8x32_ps((__m256)t->low, index);
    const __m256 high = _mm256_permutevar8x32_ps((__m256)t->high, index);
    store8(out, (vf)_mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(index, 28))));
#else
    for (int l = 0; l < 8; l++) out[l] = t->values[codes[l]];
#endif
}

/* lookup8 for codes < 8 (3 bits and fewer): half the table, one shuffle (x86's vpermps) or a two-register tbl. */
static inline void lookup8_low(const Centroids *t, vu codes, float *out) {
#if defined(__aarch64__)
    union { vu v; uint32x4_t q[2]; } c = {codes};
    const uint8x16x2_t low = {{t->bytes.val[0], t->bytes.val[1]}};
    for (int h = 0; h < 2; h++) {
        const uint32x4_t index = vmlaq_n_u32(vdupq_n_u32(0x03020100u), c.q[h], 0x04040404u);
        vst1q_f32(out + 4 * h, vreinterpretq_f32_u8(vqtbl2q_u8(low, vreinterpretq_u8_u32(index))));
    }
#elif defined(__AVX2__)
    store8(out, __builtin_shuffle(t->low, (vi)codes));
#else
    for (int l = 0; l < 8; l++) out[l] = t->values[codes[l]];
#endif
}

#if LANES == 16
typedef uint32_t vnu __attribute__((vector_size(64)));

/* out[0:16] = the values of 16 codes: AVX-512's vpermps looks all 16 up in the one register that holds the table (it
 * reads an index's low 4 bits only, so 4-bit codes need no mask). */
static inline void lookup16(const Centroids *t, vnu codes, float *out) {
    storen(out, (vn)_mm512_permutexvar_ps((__m512i)codes, (__m512)t->all));
}
#endif

/* One stored row of a packed part -> out[0:width]: packing.py's layouts, code t of a byte at bit bits * t, so the
 * codes of 8 values lie in `bits` bytes (for 3 bits: 2 bytes of the low 2-bit plane and 1 of the high 1-bit
 * plane); each group of 8 is shifted apart in the lanes of one integer vector and looked up in the centroids by one
 * variable shuffle (lookup8). AVX-512 takes two groups at a time, 16 lanes and one shuffle (lookup16): 4 bits,
 * each byte twice, zero-extended to the lanes; fewer bits, their bytes broadcast. */
static inline void widen_packed(const uint8_t *bytes, int32_t bits, int32_t width, const Centroids *table,
                                float *restrict out) {
    const int32_t groups = (width + 7) / 8;
    int32_t g = 0;
    switch (bits) {
    case 4: {
#if LANES == 16
        const vnu shift16 = {0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4};
        for (; g + 2 <= groups; g += 2) {
            const __m128i b = _mm_loadl_epi64((const __m128i *)(bytes + 4 * g));
            lookup16(table, (vnu)_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)) >> shift16, out + 8 * g);
        }
#endif
        const vu shift = {0, 4, 8, 12, 16, 20, 24, 28};
        for (; g < groups; g++)
            lookup8(table, ((vu){0} + load_u32(bytes + 4 * g)) >> shift & 15, out + 8 * g);
        break;
    }
    case 2: {
#if LANES == 16
        const vnu shift16 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
        for (; g + 2 <= groups; g += 2)
            lookup16(table, ((vnu){0} + load_u32(bytes + 2 * g)) >> shift16 & 3, out + 8 * g);
#endif
        const vu shift = {0, 2, 4, 6, 8, 10, 12, 14};
        for (; g < groups; g++)
            lookup8_low(table, ((vu){0} + load_u16(bytes + 2 * g)) >> shift & 3, out + 8 * g);
        break;
    }
    case 1: {
#if LANES == 16
        const vnu shift16 = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        for (; g + 2 <= groups; g += 2)
            lookup16(table, ((vnu){0} + load_u16(bytes + g)) >> shift16 & 1, out + 8 * g);
#endif
        const vu shift = {0, 1, 2, 3, 4, 5, 6, 7};
        for (; g < groups; g++)
            lookup8_low(table, ((vu){0} + bytes[g]) >> shift & 1, out + 8 * g);
        break;
    }
    default: { /* 3 bits: a 2-bit plane of the low bits, then a 1-bit plane of the high bits; 16 codes a step (4 bytes
                * of one plane, 2 of the other: half the broadcasts; one core, 32k rows of tq3.5 at 512: -9%) */
        const vu shift_low = {0, 2, 4, 6, 8, 10, 12, 14}, shift_high = {0, 1, 2, 3, 4, 5, 6, 7};
        const uint8_t *high_plane = bytes + 2 * groups;
#if LANES == 16
        const vnu low16 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
        const vnu high16 = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        for (; g + 2 <= groups; g += 2) {
            const vnu low = (vnu){0} + load_u32(bytes + 2 * g), high = (vnu){0} + (load_u16(high_plane + g) << 2);
            lookup16(table, (low >> low16 & 3) | (high >> high16 & 4), out + 8 * g);
        }
#endif
        for (; g + 2 <= groups; g += 2) {
            const vu low = (vu){0} + load_u32(bytes + 2 * g), high = (vu){0} + (load_u16(high_plane + g) << 2);
            lookup8_low(table, (low >> shift_low & 3) | (high >> shift_high & 4), out + 8 * g);
            lookup8_low(table, (low >> (shift_low + 16) & 3) | (high >> (shift_high + 8) & 4), out + 8 * g + 8);
        }
        for (; g < groups; g++) {
            const vu low = (vu){0} + load_u16(bytes + 2 * g), high = (vu){0} + (high_plane[g] << 2);
            lookup8_low(table, (low >> shift_low & 3) | (high >> shift_high & 4), out + 8 * g);
        }
    }
    }
}

/* One stored row of a half-precision part -> out[0:width]. */
static inline void widen_f16(const uint8_t *bytes, int32_t width, float *restrict out) {
#if defined(__F16C__) || defined(__aarch64__)
    /* the hardware converts 8 (x86-64-v3's F16C vcvtph2ps) or 4 (every Armv8-A core's fcvtl) at a time */
    const _Float16 *h = (const _Float16 *)bytes;
    int32_t j = 0;
#if defined(__F16C__)
    for (; j + LANES <= width; j += LANES) storen(out + j, loadh((const uint16_t *)(h + j)));
#else
    for (; j + 4 <= width; j += 4) vst1q_f32(out + j, vcvt_f32_f16(vld1_f16((const __fp16 *)(h + j))));
#endif
    for (; j < width; j++) out[j] = (float)h[j];
#else
    /* binary16 -> binary32 by its bits: a normal magnitude shifted and rebiased in the exponent field by an integer
     * add (infinities and NaNs to an all-ones exponent), a subnormal one (mantissa x 2**-24) converted from the
     * integer, then the sign. No float subnormal on the way: the call treats those as zero (flush_subnormals), and a
     * multiply by 2**112 of the shifted bits lost every subnormal half (the ring test: 7e-6 of the output, against
     * 5e-7 from the hardware's conversion). */
    const uint16_t *h = (const uint16_t *)bytes;
    for (int32_t j = 0; j < width; j++) {
        const uint32_t magnitude = h[j] & 0x7FFFu, exponent = magnitude >> 10;
        union { uint32_t bits; float value; } v;
        if (exponent == 0)
            v.value = (float)(int32_t)magnitude * 5.9604644775390625e-8f; /* 2**-24 */
        else
            v.bits = (magnitude << 13) + (exponent == 31 ? 224u << 23 : 112u << 23);
        v.bits |= (uint32_t)(h[j] & 0x8000u) << 16;
        out[j] = v.value;
    }
#endif
}

/* One stored row of an int8 part -> out[0:width], 8 at a time with each machine's sign extensions (GCC's generic
 * conversion moved 2 values at a time, and the plain loop converted one value an instruction): one core, int8 rows of
 * d 256 and 512 on an Intel Xeon, 1-6% of a call. */
static inline void widen_i8(const int8_t *bytes, int32_t width, float *restrict out) {
    int32_t j = 0;
#if LANES == 16
    for (; j + 16 <= width; j += 16)
        storen(out + j, (vn)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(bytes + j)))));
#endif
    for (; j + 8 <= width; j += 8) {
#if defined(__AVX2__)
        store8(out + j, (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(bytes + j)))));
#elif defined(__aarch64__)
        const int16x8_t h = vmovl_s8(vld1_s8(bytes + j));
        vst1q_f32(out + j, vcvtq_f32_s32(vmovl_s16(vget_low_s16(h))));
        vst1q_f32(out + j + 4, vcvtq_f32_s32(vmovl_s16(vget_high_s16(h))));
#else
        /* SSE2: each byte into the high byte of a 16-bit lane, each of those into the high half of a 32-bit lane,
         * then arithmetic shifts back down */
        const __m128i b = _mm_loadl_epi64((const __m128i *)(bytes + j)), h = _mm_unpacklo_epi8(b, b);
        _mm_storeu_ps(out + j, _mm_cvtepi32_ps(_mm_srai_epi32(_mm_unpacklo_epi16(h, h), 24)));
        _mm_storeu_ps(out + j + 4, _mm_cvtepi32_ps(_mm_srai_epi32(_mm_unpackhi_epi16(h, h), 24)));
#endif
    }
    for (; j < width; j++) out[j] = (float)bytes[j];
}

/* One stored row of a part -> out[0:P(width)] float32, zeros past width. A packed part's centroids are the
 * caller's, read from its table once a call (per row they cost as much as a row of 256 codes). */
static void widen(const Part *part, const Centroids *table, int64_t row, float *restrict out) {
    const uint8_t *bytes = part->codes + row * part->stride;
    const int32_t width = part->width;
    switch (part->kind) {
    case F32:
        copy_floats(out, (const float *)bytes, width);
        break;
    case F16:
        widen_f16(bytes, width, out);
        break;
    case I8:
        widen_i8((const int8_t *)bytes, width, out);
        break;
    default:
        widen_packed(bytes, part->bits, width, table, out);
    }
    zero_floats(out + width, padded(width) - width);
}

/* Whether a part's keys are scored in integers (score_group_int). */
static inline int integer(const Part *part) { return part->kind == PACKED && part->levels != NULL; }

/* Whether a part's rows are read where they lie rather than widened into a tile (HALF_IN_PLACE): half precision, a
 * whole number of 16-value strips (the loops' step; no padding to supply). */
static inline int in_place(const Part *part) {
    return HALF_IN_PLACE && part->kind == F16 && part->width % 16 == 0 && part->stride % 2 == 0;
}

/* Factor of a part's row: its constant times its per-row scale. */
static inline float factor(const Part *part, int64_t row) {
    return part->coef * (part->scale ? part->scale[row] : 1.0f);
}

/* The horizontal sums of 2 x 4 vectors into out[0:8]: rounds of adding pairs of lanes (shuffles within the
 * vectors, then across them), no scalar code. AVX-512 first adds each vector's two halves. */
#if LANES >= 8
static inline void sums8_of8(vf a0, vf a1, vf a2, vf a3, vf b0, vf b1, vf b2, vf b3, float *out) {
    const vi even = {0, 8, 2, 10, 4, 12, 6, 14}, odd = {1, 9, 3, 11, 5, 13, 7, 15};
    const vf t0 = __builtin_shuffle(a0, a1, even) + __builtin_shuffle(a0, a1, odd);
    const vf t1 = __builtin_shuffle(a2, a3, even) + __builtin_shuffle(a2, a3, odd);
    const vf t2 = __builtin_shuffle(b0, b1, even) + __builtin_shuffle(b0, b1, odd);
    const vf t3 = __builtin_shuffle(b2, b3, even) + __builtin_shuffle(b2, b3, odd);
    const vi low = {0, 1, 8, 9, 4, 5, 12, 13}, high = {2, 3, 10, 11, 6, 7, 14, 15};
    const vf u0 = __builtin_shuffle(t0, t1, low) + __builtin_shuffle(t0, t1, high);
    const vf u1 = __builtin_shuffle(t2, t3, low) + __builtin_shuffle(t2, t3, high);
    const vi first = {0, 1, 2, 3, 8, 9, 10, 11}, second = {4, 5, 6, 7, 12, 13, 14, 15};
    store8(out, __builtin_shuffle(u0, u1, first) + __builtin_shuffle(u0, u1, second));
}
#endif
#if LANES == 16
static inline vf fold(vn a) {
    return (vf)_mm512_castps512_ps256((__m512)a) + (vf)_mm512_extractf32x8_ps((__m512)a, 1);
}
#endif

static inline void sums8(vn a0, vn a1, vn a2, vn a3, vn b0, vn b1, vn b2, vn b3, float *out) {
#if LANES == 16
    sums8_of8(fold(a0), fold(a1), fold(a2), fold(a3), fold(b0), fold(b1), fold(b2), fold(b3), out);
#elif LANES == 8
    sums8_of8(a0, a1, a2, a3, b0, b1, b2, b3, out);
#else
    typedef int32_t vin __attribute__((vector_size(16)));
    const vin even = {0, 2, 4, 6}, odd = {1, 3, 5, 7};
    const vn ta = __builtin_shuffle(a0, a1, even) + __builtin_shuffle(a0, a1, odd);
    const vn ua = __builtin_shuffle(a2, a3, even) + __builtin_shuffle(a2, a3, odd);
    const vn tb = __builtin_shuffle(b0, b1, even) + __builtin_shuffle(b0, b1, odd);
    const vn ub = __builtin_shuffle(b2, b3, even) + __builtin_shuffle(b2, b3, odd);
    /* ta = a0[0] + a0[1], a0[2] + a0[3], a1[0] + a1[1], a1[2] + a1[3] */
    storen(out, __builtin_shuffle(ta, ua, even) + __builtin_shuffle(ta, ua, odd));
    storen(out + 4, __builtin_shuffle(tb, ub, even) + __builtin_shuffle(tb, ub, odd));
#endif
}

/* Keeps 4 loaded vectors in registers: GCC otherwise folds each load into every multiply-add that uses it (x86's
 * memory operands), reading each vector once per use, and the loads, not the multiply-adds, set the pace. A NEON
 * multiply-add takes registers only. */
#if defined(__x86_64__) && defined(__AVX512F__)
#define IN_REGISTER(a, b, c, d) __asm__("" : "+v"(a), "+v"(b), "+v"(c), "+v"(d))
#elif defined(__x86_64__) && defined(__AVX__)
#define IN_REGISTER(a, b, c, d) __asm__("" : "+x"(a), "+x"(b), "+x"(c), "+x"(d))
#else
#define IN_REGISTER(a, b, c, d) ((void)0)
#endif

/* The cache lines a group of keys asks for while it is scored: its keys' rows KEY_AHEAD rows on (for the groups to
 * come) and its values' rows (for this chunk's value pass), every part's, into L2 (x86's prefetcht1, Arm's
 * PLDL2KEEP). One line at each step of the scoring loop, not a burst: ~130 prefetches at once (a chunk's, or even a
 * group's) filled the core's miss buffers and stalled the loads behind them, and in some builds were lost altogether.
 * One core over 32k fp16 rows of 512, from DRAM: 11.2 ms a call asking for the next chunk at the start of each
 * (prefetchnta), 9.5 asking for a group's rows before it is scored, 6.3 spread. */
#define KEY_AHEAD 16
typedef struct {
    const uint8_t *at, *end;                                 /* the range being asked for */
    const uint8_t *from[2 * MAX_PARTS], *to[2 * MAX_PARTS]; /* the ranges after it */
    int next, count;
} Ahead;

static void plan_ahead(Ahead *a, const Call *call, int64_t row, int64_t stop) {
    a->at = a->end = NULL;
    a->next = a->count = 0;
    for (int p = 0; p < call->n_key_parts && stop + KEY_AHEAD <= call->coded_n; p++) {
        const Part *part = &call->key_parts[p];
        a->from[a->count] = part->codes + (row + KEY_AHEAD) * part->stride;
        a->to[a->count++] = part->codes + (stop + KEY_AHEAD) * part->stride;
    }
    for (int p = 0; p < call->n_value_parts; p++) {
        const Part *part = &call->value_parts[p];
        a->from[a->count] = part->codes + row * part->stride;
        a->to[a->count++] = part->codes + stop * part->stride;
    }
}

/* Asks for one more line (a step that starts the next range asks for none). */
INLINE void ask(Ahead *a) {
    if (a->at < a->end) {
        __builtin_prefetch(a->at, 0, 2);
        a->at += 64;
    } else if (a->next < a->count) {
        a->at = a->from[a->next];
        a->end = a->to[a->next++];
    }
}

/* Asks for what the scoring loops left (fewer query rows than lines). */
static void ask_rest(Ahead *a) {
    while (a->at < a->end || a->next < a->count) ask(a);
}

/* sums[g] = <q0, k_g>, sums[4 + g] = <q1, k_g> over the first `width` floats (a multiple of LANES): 2 rows x 4 keys
 * in 8 independent sums fed by 6 vector loads. */
INLINE void dot_2x4(const float *q0, const float *q1, const void *k0, const void *k1, const void *k2, const void *k3,
                    int64_t width, float *sums, int form, Ahead *ahead) {
    vn a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    for (int64_t j = 0; j < width; j += LANES) {
        if (ahead) ask(ahead);
        const vn x0 = loadn(q0 + j), x1 = loadn(q1 + j);
        vn y0 = load_row(k0, j, form), y1 = load_row(k1, j, form);
        vn y2 = load_row(k2, j, form), y3 = load_row(k3, j, form);
        IN_REGISTER(y0, y1, y2, y3);
        a0 += x0 * y0;
        a1 += x0 * y1;
        a2 += x0 * y2;
        a3 += x0 * y3;
        b0 += x1 * y0;
        b1 += x1 * y1;
        b2 += x1 * y2;
        b3 += x1 * y3;
    }
    sums8(a0, a1, a2, a3, b0, b1, b2, b3, sums);
}

#if WIDE_SCORING
/* dot_2x4 for 4 query rows (q's rows `qstride` floats apart), where 32 registers hold the 16 sums and the 4 keys:
 * each key vector feeds 4 multiply-adds, not 2 (with AVX-512, a conversion from half precision at each load: one
 * core, 32k fp16 rows of 512, 6.69 -> 6.16 ms a call; on Arm, a load from the tile, of which a Cortex-A72 issues one a
 * cycle to its two multiply-add pipes); two lines asked for at each step, as many as 2 x 4 asked.
 * sums[4 * i + g] = <q_i, k_g>. */
INLINE void dot_4x4(const float *q, int64_t qstride, const void *k0, const void *k1, const void *k2, const void *k3,
                    int64_t width, float *sums, int form, Ahead *ahead) {
    vn a[4][4] = {{{0}}};
    for (int64_t j = 0; j < width; j += LANES) {
        if (ahead) {
            ask(ahead);
            ask(ahead);
        }
        vn y0 = load_row(k0, j, form), y1 = load_row(k1, j, form);
        vn y2 = load_row(k2, j, form), y3 = load_row(k3, j, form);
        IN_REGISTER(y0, y1, y2, y3);
        for (int i = 0; i < 4; i++) {
            const vn x = loadn(q + i * qstride + j);
            a[i][0] += x * y0;
            a[i][1] += x * y1;
            a[i][2] += x * y2;
            a[i][3] += x * y3;
        }
    }
    sums8(a[0][0], a[0][1], a[0][2], a[0][3], a[1][0], a[1][1], a[1][2], a[1][3], sums);
    sums8(a[2][0], a[2][1], a[2][2], a[2][3], a[3][0], a[3][1], a[3][2], a[3][3], sums + 8);
}
#endif

/* scores[column + g][r] += factors[g] * <query row r, key g> for the 4 keys k0..k3, every row r < used. q is
 * [rows][width] (used a multiple of 4, width of 16), scores [CHUNK][rows]. Along the dimensions, not a vector of rows
 * times a broadcast key value: a broadcast is a load for each multiply-add, and the loads, not the multiply-adds,
 * set the pace. */
INLINE void score_group(const float *q, int64_t rows, int64_t used, int64_t width, const void *k0, const void *k1,
                        const void *k2, const void *k3, const float *factors, float *scores, int column, int form,
                        Ahead *ahead) {
#if WIDE_SCORING
    for (int64_t r = 0; r < used; r += 4) {
        float sums[4 * GROUP];
        dot_4x4(q + r * width, width, k0, k1, k2, k3, width, sums, form, ahead);
        for (int i = 0; i < 4; i++)
            for (int g = 0; g < GROUP; g++) scores[(column + g) * rows + r + i] += sums[4 * i + g] * factors[g];
    }
#else
    for (int64_t r = 0; r < used; r += 2) {
        float sums[2 * GROUP];
        dot_2x4(q + r * width, q + (r + 1) * width, k0, k1, k2, k3, width, sums, form, ahead);
        for (int g = 0; g < GROUP; g++) {
            scores[(column + g) * rows + r] += sums[g] * factors[g];
            scores[(column + g) * rows + r + 1] += sums[GROUP + g] * factors[g];
        }
    }
#endif
}

/* Keys scored in integers (edge_runtime/quant/integer_scores.py): a part with int8 levels has each query row (after
 * its transform) scaled by a power of two and rounded to integers within +-127 (quantize_query), each key row's codes
 * decoded to bytes, their levels (decode_levels), and their dot products summed as 32-bit integers: exact, so every
 * build gets the same sums as numpy's float32 product of the same integers, each with its best instruction:
 * - x86-64-v4-vnni: vpdpbusd, 4 byte products a lane, 64 a vector: unsigned key bytes (level + KEY_OFFSET) times
 *   signed query bytes, KEY_OFFSET times the row's sum taken off after;
 * - x86 without VNNI: the key bytes widened to 16 bits and multiplied with 16-bit query integers by pmaddwd;
 * - aarch64-dotprod: sdot, signed bytes both; aarch64: smull and sadalp.
 * Scored in floats, a stored value cost 8 multiply-adds (8 query rows) after a table lookup; in integers it costs 8 / 64
 * of a vpdpbusd, and its code is decoded to a byte with 15 to 63 others. */
#if defined(__x86_64__)
#define KEY_OFFSET 128
typedef uint8_t key_byte;
#else
#define KEY_OFFSET 0
typedef int8_t key_byte;
#endif
#if defined(__AVX512VNNI__) || defined(__aarch64__)
typedef int8_t qint;
#else
typedef int16_t qint;
#endif
#define INT_STEP 64 /* query rows and key tiles are padded to this many channels, the widest step (vpdpbusd's) */
static inline int64_t int_padded(int64_t width) { return (width + INT_STEP - 1) / INT_STEP * INT_STEP; }

typedef union {
    float f;
    uint32_t u;
} FloatBits;

static inline float power_of_two(int e) {
    const FloatBits b = {.u = (uint32_t)(127 + e) << 23};
    return b.f;
}

/* out[0:4] = x[0:4] * scale rounded to the nearest integers, ties to even (the mode a call runs in; numpy's rint) */
static inline void round4(const float *x, float scale, int32_t *out) {
#if defined(__aarch64__)
    vst1q_s32(out, vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x), scale)));
#else
    _mm_storeu_si128((__m128i *)out, _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(x), _mm_set1_ps(scale))));
#endif
}

/* Rows x [rows][stride] (their first `width` floats) -> q [rows][int_padded(width)] integers, zeros past width;
 * qstep[r] = the row's power of two times `step`, qsum[r] the sum of its integers (integer_scores.quantize_rows: the
 * least e with max |x| * 2**-e <= 127; rows below 2**-64 all zeros). */
static void quantize_query(const float *x, int64_t rows, int64_t stride, int64_t width, float step, qint *q,
                           float *qstep, int32_t *qsum) {
    const int64_t pq = int_padded(width);
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * stride;
        qint *out = q + r * pq;
        uint32_t top = 0; /* the largest magnitude's bits: non-negative floats order as their bits do */
        for (int64_t j = 0; j < width; j++) {
            const FloatBits b = {.f = row[j]};
            const uint32_t magnitude = b.u & 0x7FFFFFFFu;
            top = magnitude > top ? magnitude : top;
        }
        int32_t sum = 0;
        int64_t j = 0;
        qstep[r] = 0.0f;
        if (top >= (127u - 64u) << 23) {
            /* max = 1.m * 2**E; e = E - 6, or E - 5 where 1.m > 127/64 */
            const int e = (int)(top >> 23) - 127 - 6 + ((top & 0x7FFFFFu) > 0x7E0000u);
            const float scale = power_of_two(-e);
            qstep[r] = power_of_two(e) * step;
            float last[4] = {0};
            int32_t v[4];
            for (; j < width; j += 4) {
                const float *from = row + j;
                if (j + 4 > width) {
                    copy_floats(last, row + j, width - j);
                    from = last;
                }
                round4(from, scale, v);
                for (int k = 0; k < 4 && j + k < width; k++) {
                    out[j + k] = (qint)v[k];
                    sum += v[k];
                }
            }
            j = width;
        }
        for (; j < pq; j++) out[j] = 0;
        qsum[r] = sum;
    }
}

/* A part's 2**bits levels as tile bytes (level + offset: KEY_OFFSET for keys, 0 for values), 16 of them for a byte
 * shuffle. */
typedef struct {
    uint8_t bytes[16];
} LevelTable;

static LevelTable level_table(const Part *part, int offset) {
    LevelTable t = {{0}};
    for (int c = 0; c < 1 << part->bits; c++) t.bytes[c] = (uint8_t)(part->levels[c] + offset);
    return t;
}

/* Code i of a packed row (packing.py's layouts: b-bit codes least significant first, 8 / b a byte; 3 bits as a 2-bit
 * plane of the low bits, then a 1-bit plane of the high bits). */
static inline uint32_t code_at(const uint8_t *bytes, int32_t bits, int32_t width, int64_t i) {
    if (bits == 3) {
        const uint8_t *high = bytes + 2 * ((width + 7) / 8);
        return (uint32_t)(bytes[i / 4] >> 2 * (i % 4) & 3) | (uint32_t)(high[i / 8] >> (i % 8) & 1) << 2;
    }
    const int per_byte = 8 / bits;
    return (uint32_t)(bytes[i / per_byte] >> bits * (i % per_byte)) & ((1u << bits) - 1);
}

#if LANES == 16
/* AVX-512BW: 64 codes -> their table bytes. The 2-bit codes of 16 bytes and the 1-bit codes of 8 are each
 * byte replicated to where their codes go (vpshufb within the 4 lanes of a broadcast), then tested bit by bit into
 * masks (vptestmb); 4-bit codes are zero-extended to 16-bit lanes and their nibbles split to bytes. */
static inline __m512i low_bits64(const uint8_t *plane) { /* codes 4i .. 4i + 3 of byte i: 2 bits each */
    const __m512i spread = _mm512_set_epi32(0x0F0F0F0F, 0x0E0E0E0E, 0x0D0D0D0D, 0x0C0C0C0C, 0x0B0B0B0B,
                                            0x0A0A0A0A, 0x09090909, 0x08080808, 0x07070707, 0x06060606,
                                            0x05050505, 0x04040404, 0x03030303, 0x02020202, 0x01010101, 0);
    const __m512i bytes = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)plane)), spread);
    const __mmask64 b0 = _mm512_test_epi8_mask(bytes, _mm512_set1_epi32(0x40100401));
    const __mmask64 b1 = _mm512_test_epi8_mask(bytes, _mm512_set1_epi32((int)0x80200802u));
    const __m512i codes = _mm512_maskz_mov_epi8(b0, _mm512_set1_epi8(1));
    return _mm512_mask_add_epi8(codes, b1, codes, _mm512_set1_epi8(2));
}

static inline __mmask64 one_bits64(const uint8_t *plane) { /* codes 8i .. 8i + 7 of byte i: 1 bit each */
    const __m512i spread = _mm512_set_epi64(0x0707070707070707, 0x0606060606060606, 0x0505050505050505,
                                            0x0404040404040404, 0x0303030303030303, 0x0202020202020202,
                                            0x0101010101010101, 0);
    const __m512i bytes = _mm512_shuffle_epi8(_mm512_set1_epi64((long long)load_u64(plane)), spread);
    return _mm512_test_epi8_mask(bytes, _mm512_set1_epi64((long long)0x8040201008040201ull));
}

static inline __m512i levels64(const uint8_t *bytes, const uint8_t *high, int32_t bits, int64_t j, __m512i table) {
    switch (bits) {
    case 4: {
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(bytes + j / 2)));
        /* byte 2k = the low nibble, byte 2k + 1 the high one: (w | w << 4) & 0x0F0F */
        const __m512i nibbles = _mm512_ternarylogic_epi32(w, _mm512_slli_epi16(w, 4), _mm512_set1_epi16(0x0F0F), 0xA8);
        return _mm512_shuffle_epi8(table, nibbles);
    }
    case 3: {
        const __m512i low = low_bits64(bytes + j / 4);
        return _mm512_shuffle_epi8(table, _mm512_mask_add_epi8(low, one_bits64(high + j / 8), low, _mm512_set1_epi8(4)));
    }
    case 2:
        return _mm512_shuffle_epi8(table, low_bits64(bytes + j / 4));
    default:
        return _mm512_mask_blend_epi8(one_bits64(bytes + j / 8), _mm512_shuffle_epi8(table, _mm512_setzero_si512()),
                                      _mm512_shuffle_epi8(table, _mm512_set1_epi8(1)));
    }
}
#endif
#if LANES == 8
/* AVX2: 32 codes -> their table bytes, as levels64 does (no masks: a bit test is a compare of the bit with itself). */
static inline __m256i bit_set32(__m256i bytes, int32_t pattern) {
    const __m256i bit = _mm256_set1_epi32(pattern);
    return _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
}

static inline __m256i low_bits32(const uint8_t *plane) {
    const __m256i spread = _mm256_set_epi32(0x07070707, 0x06060606, 0x05050505, 0x04040404, 0x03030303, 0x02020202,
                                            0x01010101, 0);
    const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi64x((long long)load_u64(plane)), spread);
    return _mm256_or_si256(_mm256_and_si256(bit_set32(bytes, 0x40100401), _mm256_set1_epi8(1)),
                           _mm256_and_si256(bit_set32(bytes, (int)0x80200802u), _mm256_set1_epi8(2)));
}

static inline __m256i one_bits32(const uint8_t *plane) { /* 0xFF where the code's bit is set */
    const __m256i spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)load_u32(plane)), spread);
    return _mm256_cmpeq_epi8(_mm256_and_si256(bytes, _mm256_set1_epi64x((long long)0x8040201008040201ull)),
                             _mm256_set1_epi64x((long long)0x8040201008040201ull));
}

static inline __m256i levels32(const uint8_t *bytes, const uint8_t *high, int32_t bits, int64_t j, __m256i table) {
    switch (bits) {
    case 4: {
        const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(bytes + j / 2)));
        return _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_or_si256(w, _mm256_slli_epi16(w, 4)),
                                                           _mm256_set1_epi16(0x0F0F)));
    }
    case 3:
        return _mm256_shuffle_epi8(table, _mm256_or_si256(low_bits32(bytes + j / 4),
                                                          _mm256_and_si256(one_bits32(high + j / 8),
                                                                           _mm256_set1_epi8(4))));
    case 2:
        return _mm256_shuffle_epi8(table, low_bits32(bytes + j / 4));
    default:
        return _mm256_shuffle_epi8(table, _mm256_and_si256(one_bits32(bytes + j / 8), _mm256_set1_epi8(1)));
    }
}
#endif

#if defined(__aarch64__)
/* NEON: 16 codes -> their table bytes; each code's byte replicated by tbl, shifted by its own count (ushl). */
static inline uint8x16_t low_bits16(const uint8_t *plane) {
    static const uint8_t spread[16] = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};
    static const int8_t shifts[16] = {0, -2, -4, -6, 0, -2, -4, -6, 0, -2, -4, -6, 0, -2, -4, -6};
    const uint8x16_t bytes = vqtbl1q_u8(vreinterpretq_u8_u32(vdupq_n_u32(load_u32(plane))), vld1q_u8(spread));
    return vandq_u8(vshlq_u8(bytes, vld1q_s8(shifts)), vdupq_n_u8(3));
}

static inline uint8x16_t one_bits16(const uint8_t *plane, int to) { /* each code's bit moved to bit `to` */
    static const uint8_t spread[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
    static const int8_t shifts[16] = {0, -1, -2, -3, -4, -5, -6, -7, 0, -1, -2, -3, -4, -5, -6, -7};
    const uint8x16_t bytes = vqtbl1q_u8(vreinterpretq_u8_u16(vdupq_n_u16((uint16_t)load_u16(plane))), vld1q_u8(spread));
    return vandq_u8(vshlq_u8(bytes, vaddq_s8(vld1q_s8(shifts), vdupq_n_s8((int8_t)to))), vdupq_n_u8((uint8_t)(1 << to)));
}
#endif

/* One stored row of an integer part -> out[0:width], its levels as the table's bytes. */
static void decode_levels(const Part *part, const LevelTable *t, int64_t row, uint8_t *restrict out) {
    const uint8_t *bytes = part->codes + row * part->stride;
    const int32_t width = part->width, bits = part->bits;
    const uint8_t *high = bytes + 2 * ((width + 7) / 8); /* 3 bits: the 1-bit plane */
    int64_t j = 0;
    (void)high; /* baseline x86_64 decodes a code at a time */
#if LANES == 16
    const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)t->bytes));
    for (; j + 64 <= width; j += 64) _mm512_storeu_si512(out + j, levels64(bytes, high, bits, j, table));
#elif LANES == 8
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)t->bytes));
    for (; j + 32 <= width; j += 32) _mm256_storeu_si256((__m256i *)(out + j), levels32(bytes, high, bits, j, table));
#elif defined(__aarch64__)
    const uint8x16_t table = vld1q_u8(t->bytes);
    if (bits == 4) {
        for (; j + 32 <= width; j += 32) {
            const uint8x16_t b = vld1q_u8(bytes + j / 2);
            const uint8x16x2_t codes = vzipq_u8(vandq_u8(b, vdupq_n_u8(15)), vshrq_n_u8(b, 4));
            vst1q_u8(out + j, vqtbl1q_u8(table, codes.val[0]));
            vst1q_u8(out + j + 16, vqtbl1q_u8(table, codes.val[1]));
        }
    } else {
        for (; j + 16 <= width; j += 16) {
            uint8x16_t codes;
            if (bits == 3)
                codes = vorrq_u8(low_bits16(bytes + j / 4), one_bits16(high + j / 8, 2));
            else if (bits == 2)
                codes = low_bits16(bytes + j / 4);
            else
                codes = one_bits16(bytes + j / 8, 0);
            vst1q_u8(out + j, vqtbl1q_u8(table, codes));
        }
    }
#endif
    for (; j < width; j++) out[j] = t->bytes[code_at(bytes, bits, width, j)];
}

#if LANES == 16
/* out[4 i + g] = the sum of v[i][g]'s 16 lanes: a tree of unpacks and lane shuffles, 15 adds in all (a reduction of
 * each vector alone is 8 operations, 128 for the 16: as many as a 256-wide part's dot products for 8 rows). */
static inline void reduce16(const __m512i v[4][4], int32_t *out) {
    __m512i c[8], e[4], f[2];
    for (int p = 0; p < 8; p++) {
        const __m512i x = v[p / 2][2 * (p % 2)], y = v[p / 2][2 * (p % 2) + 1];
        c[p] = _mm512_add_epi32(_mm512_unpacklo_epi32(x, y), _mm512_unpackhi_epi32(x, y));
    }
    for (int p = 0; p < 4; p++)
        e[p] = _mm512_add_epi32(_mm512_unpacklo_epi64(c[2 * p], c[2 * p + 1]), _mm512_unpackhi_epi64(c[2 * p], c[2 * p + 1]));
    for (int p = 0; p < 2; p++)
        f[p] = _mm512_add_epi32(_mm512_shuffle_i32x4(e[2 * p], e[2 * p + 1], 0x44), _mm512_shuffle_i32x4(e[2 * p], e[2 * p + 1], 0xEE));
    _mm512_storeu_si512(out, _mm512_add_epi32(_mm512_shuffle_i32x4(f[0], f[1], 0x88), _mm512_shuffle_i32x4(f[0], f[1], 0xDD)));
}
#endif

/* The integer dot products of query rows (q's rows `qstride` integers apart) with 4 key tiles over `pq` channels (a
 * multiple of INT_STEP), sums[4 * i + g] = <q_i, k_g>: 4 rows where 32 registers hold the 16 sums (dot_int_4x4), 2
 * with AVX2's or SSE2's 16 (dot_int_2x4). The key bytes carry KEY_OFFSET (the caller takes it off). */
#if LANES == 16
/* AVX-512: a key vector and its products with a query vector added to a sum: VNNI's 64 byte products, or 32
 * products of the key bytes widened to 16 bits */
#if defined(__AVX512VNNI__)
#define KEY_VECTOR_BYTES 64
static inline __m512i key_vector(const key_byte *k) { return _mm512_loadu_si512(k); }
static inline __m512i dot_add(__m512i sum, __m512i keys, __m512i query) {
    return _mm512_dpbusd_epi32(sum, keys, query);
}
#else
#define KEY_VECTOR_BYTES 32
static inline __m512i key_vector(const key_byte *k) {
    return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)k));
}
static inline __m512i dot_add(__m512i sum, __m512i keys, __m512i query) {
    return _mm512_add_epi32(sum, _mm512_madd_epi16(keys, query));
}
#endif

INLINE void dot_int_4x4(const qint *q, int64_t qstride, const key_byte *const k[4], int64_t pq, int32_t *sums,
                        Ahead *ahead) {
    __m512i a[4][4];
    for (int i = 0; i < 4; i++)
        for (int g = 0; g < 4; g++) a[i][g] = _mm512_setzero_si512();
    for (int64_t j = 0; j < pq; j += KEY_VECTOR_BYTES) {
        for (int line = 0; line < KEY_VECTOR_BYTES / 32; line++) ask(ahead);
        __m512i y[4];
        for (int g = 0; g < 4; g++) y[g] = key_vector(k[g] + j);
        for (int i = 0; i < 4; i++) {
            const __m512i x = _mm512_loadu_si512(q + i * qstride + j);
            for (int g = 0; g < 4; g++) a[i][g] = dot_add(a[i][g], y[g], x);
        }
    }
    reduce16((const __m512i(*)[4])a, sums);
}
#elif defined(__aarch64__)
INLINE void dot_int_4x4(const qint *q, int64_t qstride, const key_byte *const k[4], int64_t pq, int32_t *sums,
                        Ahead *ahead) {
    int32x4_t a[4][4];
    for (int i = 0; i < 4; i++)
        for (int g = 0; g < 4; g++) a[i][g] = vdupq_n_s32(0);
    for (int64_t j = 0; j < pq; j += 16) {
        ask(ahead);
        int8x16_t y[4];
        for (int g = 0; g < 4; g++) y[g] = vld1q_s8(k[g] + j);
        for (int i = 0; i < 4; i++) {
            const int8x16_t x = vld1q_s8(q + i * qstride + j);
            for (int g = 0; g < 4; g++) {
#if defined(__ARM_FEATURE_DOTPROD)
                a[i][g] = vdotq_s32(a[i][g], y[g], x);
#else
                a[i][g] = vpadalq_s16(a[i][g], vmull_s8(vget_low_s8(y[g]), vget_low_s8(x)));
                a[i][g] = vpadalq_s16(a[i][g], vmull_high_s8(y[g], x));
#endif
            }
        }
    }
    for (int i = 0; i < 4; i++) {
        const int32x4_t s = vpaddq_s32(vpaddq_s32(a[i][0], a[i][1]), vpaddq_s32(a[i][2], a[i][3]));
        vst1q_s32(sums + 4 * i, s);
    }
}
#else
/* x86-64-v3 and baseline: 2 rows x 4 keys in 8 sums (16 registers) */
INLINE void dot_int_2x4(const qint *q, int64_t qstride, const key_byte *const k[4], int64_t pq, int32_t *sums,
                        Ahead *ahead) {
#if LANES == 8
    __m256i a[2][4];
    for (int i = 0; i < 2; i++)
        for (int g = 0; g < 4; g++) a[i][g] = _mm256_setzero_si256();
    for (int64_t j = 0; j < pq; j += 16) {
        ask(ahead);
        __m256i y[4];
        for (int g = 0; g < 4; g++) y[g] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(k[g] + j)));
        for (int i = 0; i < 2; i++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(q + i * qstride + j));
            for (int g = 0; g < 4; g++) a[i][g] = _mm256_add_epi32(a[i][g], _mm256_madd_epi16(y[g], x));
        }
    }
    /* the sums of the 8 vectors' lanes: unpacks within 128-bit lanes, then the two halves */
    __m256i e[2];
    for (int i = 0; i < 2; i++) {
        const __m256i c0 = _mm256_add_epi32(_mm256_unpacklo_epi32(a[i][0], a[i][1]), _mm256_unpackhi_epi32(a[i][0], a[i][1]));
        const __m256i c1 = _mm256_add_epi32(_mm256_unpacklo_epi32(a[i][2], a[i][3]), _mm256_unpackhi_epi32(a[i][2], a[i][3]));
        e[i] = _mm256_add_epi32(_mm256_unpacklo_epi64(c0, c1), _mm256_unpackhi_epi64(c0, c1));
    }
    _mm256_storeu_si256((__m256i *)sums, _mm256_add_epi32(_mm256_permute2x128_si256(e[0], e[1], 0x20),
                                                          _mm256_permute2x128_si256(e[0], e[1], 0x31)));
#else
    __m128i a[2][4];
    const __m128i zero = _mm_setzero_si128();
    for (int i = 0; i < 2; i++)
        for (int g = 0; g < 4; g++) a[i][g] = zero;
    for (int64_t j = 0; j < pq; j += 8) {
        ask(ahead);
        __m128i y[4];
        for (int g = 0; g < 4; g++) y[g] = _mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i *)(k[g] + j)), zero);
        for (int i = 0; i < 2; i++) {
            const __m128i x = _mm_loadu_si128((const __m128i *)(q + i * qstride + j));
            for (int g = 0; g < 4; g++) a[i][g] = _mm_add_epi32(a[i][g], _mm_madd_epi16(y[g], x));
        }
    }
    for (int i = 0; i < 2; i++) {
        const __m128i c0 = _mm_add_epi32(_mm_unpacklo_epi32(a[i][0], a[i][1]), _mm_unpackhi_epi32(a[i][0], a[i][1]));
        const __m128i c1 = _mm_add_epi32(_mm_unpacklo_epi32(a[i][2], a[i][3]), _mm_unpackhi_epi32(a[i][2], a[i][3]));
        _mm_storeu_si128((__m128i *)(sums + 4 * i), _mm_add_epi32(_mm_unpacklo_epi64(c0, c1), _mm_unpackhi_epi64(c0, c1)));
    }
#endif
}
#endif

/* score_group for an integer part: scores[column + g][r] += factors[g] * qstep[r] * <q_r, levels of key g>, the
 * integers' sum exact (qsum[r] * KEY_OFFSET taken off), then scaled in integer_scores' order. */
INLINE void score_group_int(const qint *q, const float *qstep, const int32_t *qsum, int64_t rows, int64_t used,
                            int64_t pq, const key_byte *const k[4], const float *factors, float *scores, int column,
                            Ahead *ahead) {
#if WIDE_SCORING
    const int block = 4;
#else
    const int block = 2;
#endif
    for (int64_t r = 0; r < used; r += block) {
        int32_t sums[4 * GROUP];
#if WIDE_SCORING
        dot_int_4x4(q + r * pq, pq, k, pq, sums, ahead);
#else
        dot_int_2x4(q + r * pq, pq, k, pq, sums, ahead);
#endif
        for (int i = 0; i < block; i++)
            for (int g = 0; g < GROUP; g++) {
                const int32_t dot = sums[4 * i + g] - KEY_OFFSET * qsum[r + i];
                scores[(column + g) * rows + r + i] += (float)dot * qstep[r + i] * factors[g];
            }
    }
}

#if LANES == 16
/* accumulate's register blocking for AVX-512: m rows (8 or 4) over n vectors of 16 dimensions (2, or 1 for a last
 * strip) held in m x n vector sums across the chunk; c is acc's row r at the strip's first dimension. 8 rows x 32
 * dimensions, 16 sums: each value vector (from half precision, converted at each load) feeds 8 multiply-adds; one
 * core, 32k fp16 rows of 512: 6.0 ms a call with 4 rows, 5.7 with 8. */
INLINE void accumulate_strip(float *c, int64_t acc_stride, int64_t rows, const void *values, int64_t stride,
                             const float *weights, int64_t count, int form, int m, int n) {
    vn s[8][4];
    for (int l = 0; l < m; l++)
        for (int h = 0; h < n; h++) s[l][h] = loadn(c + l * acc_stride + 16 * h);
    for (int64_t k = 0; k < count; k++) {
        vn v[4];
        for (int h = 0; h < n; h++) v[h] = load_row(values, k * stride + 16 * h, form);
        const float *w = weights + k * rows;
        for (int l = 0; l < m; l++)
            for (int h = 0; h < n; h++) s[l][h] += w[l] * v[h];
    }
    for (int l = 0; l < m; l++)
        for (int h = 0; h < n; h++) storen(c + l * acc_stride + 16 * h, s[l][h]);
}
#endif

/* acc[r][0:width] += sum over k < count of weights[k][r] * values[k][0:width], every row r < used (acc's rows
 * `acc_stride` floats apart, weights [count][rows], used a multiple of 4): 4 rows x 16 dimensions
 * held in registers across the chunk (8 vector sums with AVX, 16 with NEON's 32 registers; AVX-512: 8 rows x 32
 * dimensions, accumulate_strip), the rows innermost so that a strip of the chunk's values is read from L1 by every
 * group of rows. values rows are `stride` elements apart (floats, or halves with `half`); width is a multiple of 16. */
INLINE void accumulate(float *acc, int64_t acc_stride, int64_t rows, int64_t used, int64_t width, const void *values,
                       int64_t stride, const float *weights, int64_t count, int form) {
#if LANES == 16
    const size_t element = form == FORM_F16 ? 2 : form == FORM_I8 ? 1 : 4;
    int64_t j = 0;
    for (; j + 32 <= width; j += 32) {
        int64_t r = 0;
        for (; r + 8 <= used; r += 8)
            accumulate_strip(acc + r * acc_stride + j, acc_stride, rows, (const uint8_t *)values + j * element, stride,
                             weights + r, count, form, 8, 2);
        for (; r < used; r += 4)
            accumulate_strip(acc + r * acc_stride + j, acc_stride, rows, (const uint8_t *)values + j * element, stride,
                             weights + r, count, form, 4, 2);
    }
    for (; j < width; j += 16)
        for (int64_t r = 0; r < used; r += 4)
            accumulate_strip(acc + r * acc_stride + j, acc_stride, rows, (const uint8_t *)values + j * element,
                             stride, weights + r, count, form, 4, 1);
#else
    for (int64_t j = 0; j < width; j += 16) {
        for (int64_t r = 0; r < used; r += 4) {
            float *c = acc + r * acc_stride + j;
#if LANES == 8
            vn c00 = loadn(c), c01 = loadn(c + 8), c10 = loadn(c + acc_stride), c11 = loadn(c + acc_stride + 8);
            vn c20 = loadn(c + 2 * acc_stride), c21 = loadn(c + 2 * acc_stride + 8);
            vn c30 = loadn(c + 3 * acc_stride), c31 = loadn(c + 3 * acc_stride + 8);
            for (int64_t k = 0; k < count; k++) {
                const vn v0 = load_row(values, k * stride + j, form), v1 = load_row(values, k * stride + j + 8, form);
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
            storen(c, c00);
            storen(c + 8, c01);
            storen(c + acc_stride, c10);
            storen(c + acc_stride + 8, c11);
            storen(c + 2 * acc_stride, c20);
            storen(c + 2 * acc_stride + 8, c21);
            storen(c + 3 * acc_stride, c30);
            storen(c + 3 * acc_stride + 8, c31);
#else
            vn s[4][4];
            for (int l = 0; l < 4; l++)
                for (int h = 0; h < 4; h++) s[l][h] = loadn(c + l * acc_stride + 4 * h);
            for (int64_t k = 0; k < count; k++) {
                const int64_t v = k * stride + j;
                const vn v0 = load_row(values, v, form), v1 = load_row(values, v + 4, form);
                const vn v2 = load_row(values, v + 8, form), v3 = load_row(values, v + 12, form);
                const vn w = loadn(weights + k * rows + r);
                for (int l = 0; l < 4; l++) {
                    s[l][0] += w[l] * v0;
                    s[l][1] += w[l] * v1;
                    s[l][2] += w[l] * v2;
                    s[l][3] += w[l] * v3;
                }
            }
            for (int l = 0; l < 4; l++)
                for (int h = 0; h < 4; h++) storen(c + l * acc_stride + 4 * h, s[l][h]);
#endif
        }
    }
#endif
}

typedef struct {
    int64_t rows, groups, tokens;
    float *m, *s;
    float *accs[MAX_PARTS + 1]; /* the value parts', then the exact blocks' */
    int64_t widths[MAX_PARTS + 1];
    int n_accs;
} State;

static inline vn splat(float x) { return (vn){0} + x; }

static inline vn maxn(vn a, vn b) {
    const vni more = a > b;
    return (vn)((more & (vni)a) | (~more & (vni)b));
}

/* exp(x) in float32 on a vector's lanes, to about 1 ulp without libm: x = n ln2 + r, |r| <= ln2/2, exp(r) by a
 * degree-6 polynomial (Cephes' expf coefficients), times 2**n built in the exponent bits (n rounded to nearest by
 * truncating x log2(e) +- 1/2); exp(-inf) and anything below -87.3 is 0. */
static inline vn expn(vn x) {
    const vni zero = x < splat(-87.33654f);
    x = maxn(x, splat(-87.33654f));
    x = -maxn(-x, splat(-88.72283f));
    const vn t = x * 1.44269504088896341f;
    const vn half = (vn)(((vni)t & (vni)splat(-0.0f)) | (vni)splat(0.5f));
    const vni ni = __builtin_convertvector(t + half, vni);
    const vn n = __builtin_convertvector(ni, vn);
    vn r = x - n * 0.693359375f;
    r -= n * -2.12194440e-4f;
    const vn r2 = r * r;
    vn p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;
    return (vn)((vni)(p * (vn)((ni + 127) << 23)) & ~zero);
}

/* Mask a chunk's scores ([CHUNK][rows]) by position, fold them into the running softmax, leave their weights: rows
 * a vector's lanes at a time (maximum, exponentials, sums); masking, and rescaling the accumulators of a
 * row whose maximum grew, one row at a time. */
static void softmax_chunk(State *st, float *scores, const int64_t *positions, int64_t start, int count,
                          const int64_t *lower, const int64_t *upper) {
    const int64_t rows = st->rows;
    int64_t first = positions[start], last = first;
    for (int i = 1; i < count; i++) {
        const int64_t p = positions[start + i];
        first = p < first ? p : first;
        last = p > last ? p : last;
    }
    for (int64_t r = 0; r < rows; r++) {
        int64_t t = r / st->groups;
        if (t >= st->tokens) t = st->tokens - 1;
        const int64_t lo = lower[t], hi = upper[t];
        if (lo <= first && last <= hi) continue; /* every row of the chunk seen */
        for (int i = 0; i < count; i++) {
            const int64_t p = positions[start + i];
            if (p < lo || p > hi) scores[i * rows + r] = -__builtin_inff();
        }
    }
    for (int64_t b = 0; b < rows; b += LANES) {
        const vn m = loadn(st->m + b);
        vn top = m;
        for (int i = 0; i < count; i++) top = maxn(top, loadn(scores + i * rows + b));
        const vn rescales = expn(m - top);
        for (int l = 0; l < LANES; l++) {
            if (!(top[l] > m[l]) || m[l] == -__builtin_inff()) continue;
            const float rescale = rescales[l];
            st->s[b + l] *= rescale;
            for (int p = 0; p < st->n_accs; p++) {
                float *acc = st->accs[p] + (b + l) * st->widths[p];
                for (int64_t j = 0; j < st->widths[p]; j++) acc[j] *= rescale;
            }
        }
        storen(st->m + b, top);
        /* a row that has seen nothing keeps -inf, and its weights are exp(-inf - 0) = 0 */
        const vn shift = (vn)((vni)top & ~(top == splat(-__builtin_inff())));
        vn sum = {0};
        for (int i = 0; i < count; i++) {
            const vn weight = expn(loadn(scores + i * rows + b) - shift);
            storen(scores + i * rows + b, weight);
            sum += weight;
        }
        storen(st->s + b, loadn(st->s + b) + sum);
        for (int i = count; i < CHUNK; i++) storen(scores + i * rows + b, (vn){0});
    }
}

static inline int64_t channel(const Part *part, int64_t i) { return part->channels ? part->channels[i] : i; }

/* `stages` (a constant at each call) butterfly stages of an FWHT from distance h on: each group of 2^stages rows h
 * apart loaded once, its butterflies run in registers. Stages along different bits of the row index commute. */
INLINE void fwht_stages(float *x, int64_t n, int64_t stride, int64_t h, int stages) {
    const int m = 1 << stages;
    for (int64_t i = 0; i < n; i += m * h)
        for (int64_t j = i; j < i + h; j++)
            for (int64_t r = 0; r < stride; r += LANES) {
                vn v[8];
                for (int k = 0; k < m; k++) v[k] = loadn(x + (j + k * h) * stride + r);
                for (int d = 1; d < m; d *= 2)
                    for (int k = 0; k < m; k++)
                        if (!(k & d)) {
                            const vn u = v[k], w = v[k + d];
                            v[k] = u + w;
                            v[k + d] = u - w;
                        }
                for (int k = 0; k < m; k++) storen(x + (j + k * h) * stride + r, v[k]);
            }
}

/* x [n][stride] = H x, H the n x n Sylvester Hadamard matrix (n a power of two), all rows at once (stride a multiple
 * of LANES): the butterflies (a, b) -> (a + b, a - b) of log2(n) stages, each a vector of rows, in L1. The dense
 * rotation it replaces is 1 MiB at 512 wide, cold in a decode step after the layer's weights streamed past (tq4 over
 * 32 rows: 409 us a call, 101 us warm). Three stages a pass, their 8 vectors in registers: a stage a pass loaded and
 * stored each vector at every stage (tq3.5 over 32 rows of 512, warm: 50 us a call against fp16's 14). */
static void fwht_rows(float *x, int64_t n, int64_t stride) {
    int64_t h = 1;
    for (; h * 8 <= n; h *= 8) fwht_stages(x, n, stride, h, 3);
    if (h * 4 <= n) fwht_stages(x, n, stride, h, 2);
    else if (h * 2 <= n) fwht_stages(x, n, stride, h, 1);
}

static void scale_rows(float *x, int64_t n, int64_t stride, const float *s) {
    for (int64_t i = 0; i < n; i++)
        for (int64_t r = 0; r < stride; r += LANES) storen(x + i * stride + r, loadn(x + i * stride + r) * s[i]);
}

/* x [n][stride] (its rows the columns) times the part's randomized Hadamard rotation, or its transpose
 * (diag(s2) H diag(s1) H diag(s0) H read backwards: H is symmetric). */
static void hadamard_rows(float *x, int64_t stride, const Part *part, int transpose) {
    const int64_t n = part->width;
    for (int k = 0; k < part->rounds; k++) {
        if (transpose) {
            fwht_rows(x, n, stride);
            scale_rows(x, n, stride, part->hadamard + (part->rounds - 1 - k) * n);
        } else {
            scale_rows(x, n, stride, part->hadamard + k * n);
            fwht_rows(x, n, stride);
        }
    }
}

/* Rows of the vector a Hadamard rotation turns at once: `rows` padded to whole vectors. */
static inline int64_t lane_rows(int64_t rows) { return (rows + LANES - 1) / LANES * LANES; }

/* A key part's query rows ([rows][P(width)], zeros past width): q[channels] @ transform. accumulate's register
 * blocking, the query's channels the weights (gathered into `gathered`, [n_channels][rows]) and the transform's rows
 * the values, so that the transform is read along its rows; the columns past the last multiple of 16 one at a
 * time. q is [rows][pdim]. */
static void transform_query(const float *q, int64_t rows, int64_t pdim, const Part *part, float *gathered, float *out) {
    const int64_t width = part->width, pw = padded(width), n = part->n_channels;
    const float *t = part->transform;
    zero_floats(out, rows * pw);
    if (t == NULL) { /* a selection of channels */
        for (int64_t r = 0; r < rows; r++)
            for (int64_t w = 0; w < width; w++) out[r * pw + w] = q[r * pdim + channel(part, w)];
        return;
    }
    /* the query's channels, [n][stride]: a Hadamard rotation turns whole vectors of rows, zeros past `rows` */
    const int64_t stride = part->hadamard != NULL ? lane_rows(rows) : rows;
    for (int64_t i = 0; i < n; i++)
        for (int64_t r = 0; r < stride; r++)
            gathered[i * stride + r] = r < rows ? q[r * pdim + channel(part, i)] : 0.0f;
    if (part->hadamard != NULL) { /* n == width */
        hadamard_rows(gathered, stride, part, 0);
        for (int64_t r = 0; r < rows; r++)
            for (int64_t w = 0; w < width; w++) out[r * pw + w] = gathered[w * stride + r];
        return;
    }
    const int64_t main = width / 16 * 16;
    accumulate(out, pw, rows, rows, main, t, width, gathered, n, FORM_F32);
    for (int64_t w = main; w < width; w++)
        for (int64_t r = 0; r < rows; r++) {
            float sum = 0.0f;
            for (int64_t i = 0; i < n; i++) sum += gathered[i * rows + r] * t[i * width + w];
            out[r * pw + w] = sum;
        }
}

/* A value part's accumulators ([rows][P(width)], in its domain) taken back and added to the value's: out[r][channels]
 * += acc[r] @ transform.T, dot products of 2 accumulator rows with 4 rows of the transform at a time (dot_2x4, the
 * transform read once along its rows), the columns past the last multiple of LANES one at a time. A Hadamard
 * rotation's rows go through `spare` ([width][rows]). */
static void transform_back(const float *acc, int64_t rows, const Part *part, float *out, int64_t pdim, float *spare) {
    const int64_t width = part->width, pw = padded(width), n = part->n_channels;
    const float *t = part->transform;
    if (t == NULL) {
        for (int64_t r = 0; r < rows; r++)
            for (int64_t w = 0; w < width; w++) out[r * pdim + channel(part, w)] += acc[r * pw + w];
        return;
    }
    if (part->hadamard != NULL) {
        const int64_t stride = lane_rows(rows);
        for (int64_t w = 0; w < width; w++)
            for (int64_t r = 0; r < stride; r++) spare[w * stride + r] = r < rows ? acc[r * pw + w] : 0.0f;
        hadamard_rows(spare, stride, part, 1);
        for (int64_t w = 0; w < width; w++)
            for (int64_t r = 0; r < rows; r++) out[r * pdim + channel(part, w)] += spare[w * stride + r];
        return;
    }
    const int64_t main = width / LANES * LANES;
    for (int64_t i = 0; i < n; i += 4) {
        const float *k[4];
        for (int g = 0; g < 4; g++) k[g] = t + (i + g < n ? i + g : i) * width;
        for (int64_t r = 0; r < rows; r += 2) {
            const float *a0 = acc + r * pw, *a1 = a0 + pw;
            float sums[8];
            dot_2x4(a0, a1, k[0], k[1], k[2], k[3], main, sums, 0, NULL);
            for (int g = 0; g < 4 && i + g < n; g++) {
                float s0 = sums[g], s1 = sums[4 + g];
                for (int64_t j = main; j < width; j++) {
                    s0 += a0[j] * k[g][j];
                    s1 += a1[j] * k[g][j];
                }
                out[r * pdim + channel(part, i + g)] += s0;
                out[(r + 1) * pdim + channel(part, i + g)] += s1;
            }
        }
    }
}

/* Whether any token sees any of these rows. A chunk none sees adds nothing to the softmax, and is skipped: a sliding
 * ring holds a few chunks of positions already out of the window (E2B: 64 of 576 slots), and unwritten slots. */
static int seen(const int64_t *positions, int count, const int64_t *lower, const int64_t *upper, int64_t tokens) {
    for (int64_t t = 0; t < tokens; t++)
        for (int i = 0; i < count; i++)
            if (lower[t] <= positions[i] && positions[i] <= upper[t]) return 1;
    return 0;
}

/* Subnormal floats are flushed to zero for the length of a call (x86's MXCSR flush-to-zero and denormals-are-zero,
 * Arm's FPCR.FZ), and the caller's mode put back after: a weight near exp(-87) times a row's scale (int8's max / 127,
 * a TurboQuant norm) is subnormal, and an Intel core takes a microcode assist for each multiply-add that meets one
 * (int8 KV, one core over 8k rows of 512 on an Intel Xeon: 1.6 ns a value, 6x half precision; AMD's cores take
 * none). What is lost is below 2**-126, and every row's sum holds its largest weight, 1. */
typedef uint64_t FloatMode;

static inline FloatMode flush_subnormals(void) {
#if defined(__x86_64__)
    uint32_t mode;
    __asm__ volatile("stmxcsr %0" : "=m"(mode));
    const uint32_t flushing = mode | 0x8040u; /* FTZ (bit 15), DAZ (bit 6) */
    __asm__ volatile("ldmxcsr %0" : : "m"(flushing));
    return mode;
#elif defined(__aarch64__)
    uint64_t mode;
    __asm__ volatile("mrs %0, fpcr" : "=r"(mode));
    __asm__ volatile("msr fpcr, %0" : : "r"(mode | (1u << 24))); /* FZ */
    return mode;
#else
    return 0;
#endif
}

static inline void restore_float_mode(FloatMode mode) {
#if defined(__x86_64__)
    const uint32_t m = (uint32_t)mode;
    __asm__ volatile("ldmxcsr %0" : : "m"(m));
#elif defined(__aarch64__)
    __asm__ volatile("msr fpcr, %0" : : "r"(mode));
#else
    (void)mode;
#endif
}

/* Runs one call (see Call). Returns 0, or -1 for a part wider than MAX_WIDTH, more than MAX_ROWS rows or more than
 * MAX_PARTS parts (the caller checks first; a guard). */
static int attend_head(const Call *call) {
    const int64_t dim = call->dim, tokens = call->tokens, pdim = padded(dim);
    const int64_t rows = (call->rows + ROW_BLOCK - 1) / ROW_BLOCK * ROW_BLOCK; /* padding rows' results are dropped */
    /* the rows the multiply-adds run over (accumulate's step, 4): E4B's 4 query rows a KV head padded to 8 would
     * double the work of every key and value */
    const int64_t used = (call->rows + 3) / 4 * 4;
    if (pdim > MAX_WIDTH || rows > MAX_ROWS || call->n_key_parts > MAX_PARTS || call->n_value_parts > MAX_PARTS)
        return -1;
    for (int p = 0; p < call->n_key_parts; p++) if (padded(call->key_parts[p].width) > MAX_WIDTH) return -1;
    for (int p = 0; p < call->n_value_parts; p++) {
        const int32_t width = call->value_parts[p].width;
        if (padded(width) > MAX_WIDTH) return -1;
    }
    float *const scratch = (float *)(((uintptr_t)call->scratch + 63) & ~(uintptr_t)63);
    float *const ktile = scratch, *const vtile = ktile + GROUP * (MAX_WIDTH + SKEW);
    float *const scores = vtile + CHUNK * (MAX_WIDTH + SKEW), *const weights = scores + CHUNK * MAX_ROWS;
    float *next = weights + CHUNK * MAX_ROWS;
    State st = {.rows = rows, .groups = call->groups, .tokens = tokens, .m = next, .s = next + rows};
    next += 2 * rows;
    /* the query rows, padded with zeros ([rows][P(dim)]) */
    const float *queries[MAX_PARTS];
    float *const query = next, *const gathered = scratch + SCRATCH_USED - MAX_ROWS * MAX_WIDTH;
    zero_floats(query, rows * pdim);
    for (int64_t r = 0; r < call->rows; r++) copy_floats(query + r * pdim, call->query + r * dim, dim);
    next += rows * pdim;
    for (int p = 0; p < call->n_key_parts && call->coded_n > 0; p++) {
        const Part *part = &call->key_parts[p];
        if (part->transform == NULL && part->channels == NULL) {
            queries[p] = query;
            continue;
        }
        transform_query(query, used, pdim, part, gathered, next);
        queries[p] = next;
        next += rows * padded(part->width);
    }
    /* an integer key part's query: integers [rows][int_padded(width)], steps [rows], sums [rows] */
    const qint *qints[MAX_PARTS];
    const float *qsteps[MAX_PARTS];
    const int32_t *qsums[MAX_PARTS];
    for (int p = 0; p < call->n_key_parts && call->coded_n > 0; p++) {
        const Part *part = &call->key_parts[p];
        if (!integer(part)) continue;
        qint *ints = (qint *)next;
        float *steps = next + rows * int_padded(part->width) * (int64_t)sizeof(qint) / 4;
        int32_t *sums = (int32_t *)(steps + rows);
        quantize_query(queries[p], used, padded(part->width), part->width, part->step, ints, steps, sums);
        qints[p] = ints;
        qsteps[p] = steps;
        qsums[p] = sums;
        next = (float *)(sums + rows);
    }
    for (int p = 0; p <= call->n_value_parts; p++) {
        st.accs[p] = next;
        st.widths[p] = p < call->n_value_parts ? padded(call->value_parts[p].width) : pdim;
        next += rows * st.widths[p];
    }
    st.n_accs = call->n_value_parts + 1;
    float *const acc_exact = st.accs[call->n_value_parts];
    for (int64_t r = 0; r < rows; r++) {
        st.m[r] = -__builtin_inff();
        st.s[r] = 0.0f;
    }
    zero_floats(st.accs[0], next - st.accs[0]);

    float factors[GROUP];
    Centroids key_tables[MAX_PARTS], value_tables[MAX_PARTS];
    LevelTable level_tables[MAX_PARTS], value_levels[MAX_PARTS];
    key_byte *const btile = (key_byte *)ktile; /* an integer part's 4 keys, a row's integers and 64 bytes apart */
    for (int p = 0; p < call->n_key_parts; p++) {
        if (integer(&call->key_parts[p])) level_tables[p] = level_table(&call->key_parts[p], KEY_OFFSET);
        else if (call->key_parts[p].kind == PACKED) key_tables[p] = centroids(&call->key_parts[p]);
    }
    for (int p = 0; p < call->n_value_parts; p++) {
        if (BYTES_IN_PLACE && integer(&call->value_parts[p])) value_levels[p] = level_table(&call->value_parts[p], 0);
        else if (call->value_parts[p].kind == PACKED) value_tables[p] = centroids(&call->value_parts[p]);
    }
    for (int64_t start = 0; start < call->coded_n; start += CHUNK) {
        const int count = (int)(call->coded_n - start < CHUNK ? call->coded_n - start : CHUNK);
        if (!seen(call->coded_positions + start, count, call->coded_lower, call->coded_upper, tokens)) continue;
        zero_floats(scores, CHUNK * rows);
        for (int column = 0; column < count; column += GROUP) {
            Ahead ahead;
            const int keys = column + GROUP < count ? GROUP : count - column;
            plan_ahead(&ahead, call, start + column, start + column + keys);
            for (int p = 0; p < call->n_key_parts; p++) {
                const Part *part = &call->key_parts[p];
                const int64_t tile = padded(part->width) + SKEW;
                if (integer(part)) {
                    const int64_t pq = int_padded(part->width), bstride = pq + 64;
                    const key_byte *k[GROUP];
                    for (int g = 0; g < GROUP; g++) {
                        key_byte *row = btile + g * bstride;
                        if (column + g < count) {
                            decode_levels(part, &level_tables[p], start + column + g, (uint8_t *)row);
                            factors[g] = factor(part, start + column + g);
                        } else {
                            for (int64_t j = 0; j < pq; j++) row[j] = (key_byte)KEY_OFFSET;
                            factors[g] = 0.0f;
                        }
                        k[g] = row;
                    }
                    score_group_int(qints[p], qsteps[p], qsums[p], rows, used, pq, k, factors, scores, column, &ahead);
                    continue;
                }
                if (in_place(part) && column + GROUP <= count) {
                    const uint8_t *k = part->codes + (start + column) * part->stride;
                    for (int g = 0; g < GROUP; g++) factors[g] = factor(part, start + column + g);
                    score_group(queries[p], rows, used, part->width, k, k + part->stride, k + 2 * part->stride,
                                k + 3 * part->stride, factors, scores, column, FORM_F16, &ahead);
                    continue;
                }
                for (int g = 0; g < GROUP; g++) {
                    if (column + g < count) {
                        widen(part, &key_tables[p], start + column + g, ktile + g * tile);
                        factors[g] = factor(part, start + column + g);
                    } else {
                        zero_floats(ktile + g * tile, padded(part->width));
                        factors[g] = 0.0f;
                    }
                }
                score_group(queries[p], rows, used, padded(part->width), ktile, ktile + tile, ktile + 2 * tile,
                            ktile + 3 * tile, factors, scores, column, FORM_F32, &ahead);
            }
            ask_rest(&ahead);
        }
        softmax_chunk(&st, scores, call->coded_positions, start, count, call->coded_lower, call->coded_upper);
        for (int p = 0; p < call->n_value_parts; p++) {
            const Part *part = &call->value_parts[p];
            const int64_t tile = padded(part->width) + SKEW;
            const int half = in_place(part), bytes = BYTES_IN_PLACE && integer(part);
            /* an integer part's levels as bytes, their step in the weights */
            const int64_t byte_tile = padded(part->width) + 64;
            int8_t *const levels = (int8_t *)vtile;
            for (int k = 0; k < count; k++) {
                float f = factor(part, start + k);
                if (bytes) {
                    int8_t *row = levels + k * byte_tile;
                    decode_levels(part, &value_levels[p], start + k, (uint8_t *)row);
                    for (int64_t j = part->width; j < padded(part->width); j++) row[j] = 0;
                    f *= part->step;
                } else if (!half) {
                    widen(part, &value_tables[p], start + k, vtile + k * tile);
                }
                for (int64_t r = 0; r < used; r++) weights[k * rows + r] = scores[k * rows + r] * f;
            }
            if (half)
                accumulate(st.accs[p], part->width, rows, used, part->width, part->codes + start * part->stride,
                           part->stride / 2, weights, count, FORM_F16);
            else if (bytes)
                accumulate(st.accs[p], padded(part->width), rows, used, padded(part->width), levels, byte_tile, weights,
                           count, FORM_I8);
            else
                accumulate(st.accs[p], padded(part->width), rows, used, padded(part->width), vtile, tile, weights,
                           count, FORM_F32);
        }
    }
    static const float ones[GROUP] = {1.0f, 1.0f, 1.0f, 1.0f}, zeros[MAX_WIDTH];
    for (int b = 0; b < call->n_exact; b++) {
        const ExactBlock *block = &call->exact[b];
        for (int64_t start = 0; start < block->n; start += CHUNK) {
            const int count = (int)(block->n - start < CHUNK ? block->n - start : CHUNK);
            if (!seen(block->positions + start, count, block->lower, block->upper, tokens)) continue;
            zero_floats(scores, CHUNK * rows);
            for (int column = 0; column < count; column += GROUP) {
                const float *k[GROUP];
                for (int g = 0; g < GROUP; g++) {
                    if (column + g >= count) {
                        k[g] = zeros;
                    } else if (pdim == dim) {
                        k[g] = block->keys + (start + column + g) * dim;
                    } else {
                        float *row = ktile + g * (pdim + SKEW);
                        copy_floats(row, block->keys + (start + column + g) * dim, dim);
                        zero_floats(row + dim, pdim - dim);
                        k[g] = row;
                    }
                }
                score_group(query, rows, used, pdim, k[0], k[1], k[2], k[3], ones, scores, column, FORM_F32, NULL);
            }
            softmax_chunk(&st, scores, block->positions, start, count, block->lower, block->upper);
            /* copied into the tile even when in place would do: its skewed stride keeps a strip of the chunk in L1 */
            const float *values = block->values + start * dim;
            for (int i = 0; i < count; i++) {
                copy_floats(vtile + i * (pdim + SKEW), values + i * dim, dim);
                zero_floats(vtile + i * (pdim + SKEW) + dim, pdim - dim);
            }
            accumulate(acc_exact, pdim, rows, used, pdim, vtile, pdim + SKEW, scores, count, FORM_F32);
        }
    }

    for (int p = 0; p < call->n_value_parts && call->coded_n > 0; p++)
        transform_back(st.accs[p], used, &call->value_parts[p], acc_exact, pdim, gathered);
    float *out = call->out;
    if (!call->finish) {
        copy_floats(out, st.m, call->rows);
        copy_floats(out + call->rows, st.s, call->rows);
        out += 2 * call->rows;
    }
    for (int64_t r = 0; r < call->rows; r++) {
        const float scale = !call->finish ? 1.0f : st.s[r] > 0.0f ? 1.0f / st.s[r] : 0.0f;
        for (int64_t j = 0; j < dim; j++) out[r * dim + j] = acc_exact[r * pdim + j] * scale;
    }
    return 0;
}

/* attend_head with subnormals flushed (flush_subnormals). */
EXPORT int edge_runtime_attend_head(const Call *call) {
    const FloatMode mode = flush_subnormals();
    const int status = attend_head(call);
    restore_float_mode(mode);
    return status;
}

/* Joins the partial softmaxes of one head's shares (edge_runtime_attend_head's `out` without `finish`: m, s, then the
 * weighted sums, for `rows` rows of `dim`) into the head's attention output out [rows][dim], as flash-decoding does:
 * each share's sums rescaled by exp(m - the rows' largest m) over the rescaled total of s. A share that saw nothing
 * has m = -inf and weighs 0. Here rather than in numpy, whose fifteen small calls, cold after a layer's kernels, took
 * 80-130 us a split layer (25 us when run again at once). */
EXPORT void edge_runtime_attention_merge(const float *const *partials, int64_t n, int64_t rows, int64_t dim,
                                         float *out) {
    for (int64_t r = 0; r < rows; r++) {
        float top = -__builtin_inff();
        for (int64_t p = 0; p < n; p++) top = partials[p][r] > top ? partials[p][r] : top;
        if (top == -__builtin_inff()) top = 0.0f;
        float weights[n], total = 0.0f; /* n: the head's shares, one a thread */
        for (int64_t p = 0; p < n; p++) {
            weights[p] = expn(splat(partials[p][r] - top))[0];
            total += weights[p] * partials[p][rows + r];
        }
        const float scale = total > 0.0f ? 1.0f / total : 1.0f;
        float *row = out + r * dim;
        for (int64_t p = 0; p < n; p++) {
            const float weight = weights[p] * scale;
            const float *sums = partials[p] + 2 * rows + r * dim;
            if (p == 0)
                for (int64_t j = 0; j < dim; j++) row[j] = sums[j] * weight;
            else
                for (int64_t j = 0; j < dim; j++) row[j] += sums[j] * weight;
        }
    }
}

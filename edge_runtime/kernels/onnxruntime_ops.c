/* edge-runtime's own onnxruntime operators, registered into a session as a custom-op library (domain "edge_runtime").
 *
 * LoraSlot(x, y, a, b) = y + (x @ a.T) @ b, a LoRA slot (edge_runtime/lora_slots.py) whose A [r, in] (lora_A as PEFT
 * stores it) and B [r, out] (lora_B transposed, scaled) are half precision, summed in float32. A decode step is bound
 * by the bytes it reads, and an adapter's float32 A and B on every projection of E2B were 8% of them
 * (tools/lora_slot_cost.py); onnxruntime's own float16 MatMul on x86 took 1.9x float32's time, so half-precision slots
 * need a kernel of their own (a rank-16 adapter on E2B int4's seven projections, against the same empty slots: 8.6%
 * of a step in float32, 3.0-3.2% in float16, 2.2-2.7% in int8). One node instead of MatMul, MatMul and Add, and y's
 * buffer is reused for the output where onnxruntime allows: an empty slot (r = 0) costs the node and nothing else.
 * LoraSlotInt8(x, y, a, b, scale) is the same with int8 A and B, each rank row j of either quantized on its own
 * (scale[j] is their two scales' product): a quarter of float32's bytes.
 *
 * Like attention.c, one C11 source for aarch64 and x86_64 that links against nothing (not even libc): onnxruntime
 * hands over its API table at registration, and every call goes through it. tools/build_kernels.py builds it
 * against the C API header of onnxruntime 1.21 (an API table only grows, so a newer onnxruntime serves it) for
 * x86-64-v3 and v4 (F16C converts halves) and aarch64 (every Armv8-A core converts them); edge_runtime/
 * onnxruntime_ops.py loads it, and tests/test_onnxruntime_ops.py holds it to numpy.
 */

#include <stddef.h>
#include <stdint.h>

#include "onnxruntime_c_api.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define LANES 16
#elif defined(__F16C__)
#include <immintrin.h>
#define LANES 8
#elif defined(__aarch64__)
#include <arm_neon.h>
#define LANES 4
#else
#error "LoraSlot converts half precision in hardware: build it for x86-64-v3, x86-64-v4 or aarch64"
#endif

#define EXPORT __attribute__((visibility("default")))
#define API_VERSION 20 /* the oldest onnxruntime pyproject.toml admits (1.20) serves this table and struct */
#define MAX_RANK 256   /* lora_slots.MAX_RANK */
#define ROWS 2         /* rows of x that share each load of a */
#define A_ROWS 4       /* rows of a that share each load of x */
#define COLUMNS (8 * LANES) /* output columns held in registers across the rank: 8 chains of multiply-adds */
#define TASK_COLUMNS 1024   /* output columns a thread takes at a time when one row is split */
#define SPLIT_BYTES (64 << 10) /* bytes of a or of b worth handing to the session's other threads */

typedef float vn __attribute__((vector_size(4 * LANES)));
typedef float vn_unaligned __attribute__((vector_size(4 * LANES), aligned(4)));
static inline vn loadn(const float *p) { return *(const vn_unaligned *)p; }
static inline void storen(float *p, vn v) { *(vn_unaligned *)p = v; }
static inline vn splat(float f) { return (vn){0} + f; }

/* LANES halves -> floats, and one. */
static inline vn loadh(const uint16_t *p) {
#if LANES == 16
    return (vn)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif LANES == 8
    return (vn)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    return (vn)vcvt_f32_f16(vld1_f16((const __fp16 *)p));
#endif
}

static inline float half(const uint16_t *p) {
#if defined(__aarch64__)
    return (float)*(const __fp16 *)p;
#else
    return _cvtsh_ss(*p);
#endif
}

/* LANES int8 values -> floats. */
static inline vn loadi8(const int8_t *p) {
#if LANES == 16
    return (vn)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif LANES == 8
    return (vn)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    int32_t four;
    __builtin_memcpy(&four, p, 4);
    return (vn)vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(four))))));
#endif
}

/* A and B's element kinds: LoraSlot's halves, LoraSlotInt8's int8 (a scale per rank row, folded into x @ a.T). */
enum { HALF, INT8 };
#define INLINE static inline __attribute__((always_inline))

/* LANES elements of a or b from element i, and one; `kind` is a constant at every call, so each kind gets its own
 * loops. */
INLINE vn load_kind(const void *p, int64_t i, int kind) {
    return kind == HALF ? loadh((const uint16_t *)p + i) : loadi8((const int8_t *)p + i);
}
INLINE float one_kind(const void *p, int64_t i, int kind) {
    return kind == HALF ? half((const uint16_t *)p + i) : (float)((const int8_t *)p)[i];
}

/* z = y where onnxruntime gives the output a buffer of its own (y a graph input, say), a vector at a time: a byte at
 * a time, an E2B decode step's empty slots took ~6 us a node more than a Reshape. The object has no memcpy (it links
 * against nothing, and build_kernels.py refuses one that calls out). */
static void copy_floats(float *restrict z, const float *restrict y, int64_t n) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) storen(z + i, loadn(y + i));
    for (; i < n; i++) z[i] = y[i];
}

EXPORT const char edge_runtime_ops_source[65] = SOURCE_SHA256;

static const OrtApi *api;

typedef struct {
    const float *x, *y;
    const void *a, *b;
    const float *scale; /* INT8: each rank row's scale of a times its scale of b */
    float *z;
    int64_t rows, in, rank, out;
    int64_t stride; /* elements from a row of y (and of z) to the next: out, or a wider output a slot is part of */
    int kind;
    float *t; /* x @ a.T of a single row, when it or its columns are split between threads */
} Slot;

static inline float total(vn v) {
    float sum = 0;
    for (int l = 0; l < LANES; l++) sum += v[l];
    return sum;
}

/* t[k][j] = x[k] . a[j] for `n` (<= ROWS) rows of x and a's `m` (<= A_ROWS) rows from j0: n x m independent sums
 * (two each for a single row of x), each vector of a read once for all rows of x. `in` is cut to whole vectors; the
 * rest is summed one at a time. */
INLINE void dots(const Slot *s, const float *x, int64_t n, int64_t j0, int64_t m, float t[ROWS][MAX_RANK], int kind) {
    const int64_t in = s->in, whole = in - in % LANES;
    /* a single row of x takes two vectors a step, in two sums per row of a: 8 chains of multiply-adds, not 4 */
    const int64_t unroll = n == 1 ? 2 : 1, paired = in - in % (unroll * LANES);
    vn acc[2][ROWS][A_ROWS];
    for (int64_t u = 0; u < unroll; u++)
        for (int64_t k = 0; k < n; k++)
            for (int64_t j = 0; j < m; j++) acc[u][k][j] = splat(0);
    for (int64_t i = 0; i < paired; i += unroll * LANES)
        for (int64_t u = 0; u < unroll; u++) {
            vn w[A_ROWS];
            for (int64_t j = 0; j < m; j++) w[j] = load_kind(s->a, (j0 + j) * in + i + u * LANES, kind);
            for (int64_t k = 0; k < n; k++) {
                const vn v = loadn(x + k * in + i + u * LANES);
                for (int64_t j = 0; j < m; j++) acc[u][k][j] += v * w[j];
            }
        }
    for (int64_t i = paired; i < whole; i += LANES)
        for (int64_t k = 0; k < n; k++) {
            const vn v = loadn(x + k * in + i);
            for (int64_t j = 0; j < m; j++) acc[0][k][j] += v * load_kind(s->a, (j0 + j) * in + i, kind);
        }
    for (int64_t k = 0; k < n; k++)
        for (int64_t j = 0; j < m; j++) {
            float sum = total(unroll == 2 ? acc[0][k][j] + acc[1][k][j] : acc[0][k][j]);
            for (int64_t i = whole; i < in; i++) sum += x[k * in + i] * one_kind(s->a, (j0 + j) * in + i, kind);
            t[k][j0 + j] = kind == INT8 ? sum * s->scale[j0 + j] : sum;
        }
}

/* t[k][j0:j0 + A_ROWS] = x[k] @ a[j0:j0 + A_ROWS].T for `n` (<= ROWS) rows of x, or to the rank's end where fewer
 * than A_ROWS rows of a are left (one at a time): one task of a split row, or one step of `down`. */
INLINE void rank_group(const Slot *s, const float *x, int64_t n, int64_t j0, float t[ROWS][MAX_RANK], int kind) {
    if (j0 + A_ROWS <= s->rank) {
        if (n == ROWS) dots(s, x, ROWS, j0, A_ROWS, t, kind);
        else dots(s, x, 1, j0, A_ROWS, t, kind);
        return;
    }
    for (int64_t j = j0; j < s->rank; j++) {
        if (n == ROWS) dots(s, x, ROWS, j, 1, t, kind);
        else dots(s, x, 1, j, 1, t, kind);
    }
}

/* t[k][0:rank] = x[k] @ a.T for `n` (<= ROWS) rows of x. */
INLINE void down(const Slot *s, const float *x, int64_t n, float t[ROWS][MAX_RANK], int kind) {
    for (int64_t j0 = 0; j0 < s->rank; j0 += A_ROWS) rank_group(s, x, n, j0, t, kind);
}

/* z[c0:c1] = y[c0:c1] + t @ b[:, c0:c1] for one row: COLUMNS columns in registers across the whole rank (8
 * independent sums, each b element read once), then LANES, then one at a time. */
INLINE void up(const Slot *s, const float *t, const float *y, float *z, int64_t c0, int64_t c1, int kind) {
    const int64_t rank = s->rank, out = s->out;
    int64_t c = c0;
    for (; c + COLUMNS <= c1; c += COLUMNS) {
        vn acc[COLUMNS / LANES];
        for (int v = 0; v < COLUMNS / LANES; v++) acc[v] = loadn(y + c + v * LANES);
        for (int64_t j = 0; j < rank; j++) {
            const int64_t row = j * out + c;
            const vn w = splat(t[j]);
            for (int v = 0; v < COLUMNS / LANES; v++) acc[v] += w * load_kind(s->b, row + v * LANES, kind);
        }
        for (int v = 0; v < COLUMNS / LANES; v++) storen(z + c + v * LANES, acc[v]);
    }
    for (; c + LANES <= c1; c += LANES) {
        vn acc = loadn(y + c);
        for (int64_t j = 0; j < rank; j++) acc += splat(t[j]) * load_kind(s->b, j * out + c, kind);
        storen(z + c, acc);
    }
    for (; c < c1; c++) {
        float acc = y[c];
        for (int64_t j = 0; j < rank; j++) acc += t[j] * one_kind(s->b, j * out + c, kind);
        z[c] = acc;
    }
}

/* The three kinds of work threads share, each with its loops for both element kinds. */

/* A single row's x @ a.T: task `task` takes A_ROWS rows of a, or the rest. */
INLINE void rank_rows(const Slot *s, size_t task, int kind) {
    rank_group(s, s->x, 1, (int64_t)task * A_ROWS, (float(*)[MAX_RANK])s->t, kind);
}

/* A single row's output: task `task` takes TASK_COLUMNS columns. */
INLINE void columns(const Slot *s, size_t task, int kind) {
    const int64_t c0 = (int64_t)task * TASK_COLUMNS, c1 = c0 + TASK_COLUMNS < s->out ? c0 + TASK_COLUMNS : s->out;
    up(s, s->t, s->y, s->z, c0, c1, kind);
}

/* Several rows: task `task` takes ROWS of them, whole. */
INLINE void rows(const Slot *s, size_t task, int kind) {
    const int64_t r0 = (int64_t)task * ROWS, n = r0 + ROWS < s->rows ? ROWS : s->rows - r0;
    float t[ROWS][MAX_RANK];
    down(s, s->x + r0 * s->in, n, t, kind);
    for (int64_t k = 0; k < n; k++)
        up(s, t[k], s->y + (r0 + k) * s->stride, s->z + (r0 + k) * s->stride, 0, s->out, kind);
}

static void rank_task(void *data, size_t task) {
    const Slot *s = data;
    if (s->kind == HALF) rank_rows(s, task, HALF);
    else rank_rows(s, task, INT8);
}

static void columns_task(void *data, size_t task) {
    const Slot *s = data;
    if (s->kind == HALF) columns(s, task, HALF);
    else columns(s, task, INT8);
}

static void rows_task(void *data, size_t task) {
    const Slot *s = data;
    if (s->kind == HALF) rows(s, task, HALF);
    else rows(s, task, INT8);
}

/* The shape of input `index`: its dimension count and up to 8 dimensions. */
static OrtStatus *shape_of(const OrtValue *value, size_t *count, int64_t dims[8]) {
    OrtTensorTypeAndShapeInfo *info;
    OrtStatus *status = api->GetTensorTypeAndShape(value, &info);
    if (status) return status;
    status = api->GetDimensionsCount(info, count);
    if (!status && *count > 8) status = api->CreateStatus(ORT_INVALID_ARGUMENT, "LoraSlot: more than 8 dimensions");
    if (!status) status = api->GetDimensions(info, dims, *count);
    api->ReleaseTensorTypeAndShapeInfo(info);
    return status;
}

/* An input's data (GetTensorData, for const values, is newer than the API asked for). */
static OrtStatus *read(const OrtValue *value, const void **data) {
    return api->GetTensorMutableData((OrtValue *)value, (void **)data);
}

#define TRY(call)                                                                                                    \
    do {                                                                                                             \
        OrtStatus *status_ = (call);                                                                                 \
        if (status_) return status_;                                                                                 \
    } while (0)

/* z = y + (x @ a.T) @ b for a slot whose inputs are read: a single row's two halves each split between threads where
 * they read enough (one thread reads ~half of what DRAM gives two), several rows ROWS at a time. */
static OrtStatus *add_slot(Slot *s, OrtKernelContext *context) {
    const int64_t element = s->kind == HALF ? 2 : 1;
    if (s->rows == 1) {
        float t[ROWS][MAX_RANK];
        s->t = t[0];
        const size_t rank_tasks = (size_t)((s->rank + A_ROWS - 1) / A_ROWS);
        if (s->rank * s->in * element >= SPLIT_BYTES && rank_tasks > 1)
            TRY(api->KernelContext_ParallelFor(context, rank_task, rank_tasks, 0, s));
        else
            for (size_t task = 0; task < rank_tasks; task++) rank_task(s, task);
        const size_t tasks = (size_t)((s->out + TASK_COLUMNS - 1) / TASK_COLUMNS);
        if (s->rank * s->out * element >= SPLIT_BYTES && tasks > 1)
            return api->KernelContext_ParallelFor(context, columns_task, tasks, 0, s);
        for (size_t task = 0; task < tasks; task++) columns_task(s, task);
        return NULL;
    }
    const size_t tasks = (size_t)((s->rows + ROWS - 1) / ROWS);
    if (tasks > 1) return api->KernelContext_ParallelFor(context, rows_task, tasks, 0, s);
    rows_task(s, 0);
    return NULL;
}

static OrtStatus *ORT_API_CALL compute(void *kernel, OrtKernelContext *context) {
    const int kind = *(const int *)kernel;
    const size_t n_inputs = kind == HALF ? 4 : 5;
    const OrtValue *inputs[5];
    size_t counts[5];
    int64_t dims[5][8];
    for (size_t i = 0; i < n_inputs; i++) {
        TRY(api->KernelContext_GetInput(context, i, &inputs[i]));
        TRY(shape_of(inputs[i], &counts[i], dims[i]));
    }
    /* x [..., in], y [..., out] with the same leading dimensions, a [r, in], b [r, out] (and LoraSlotInt8's scale
     * [r]) */
    const size_t lead = counts[0] - 1;
    int64_t rows = 1;
    int ok = counts[0] >= 1 && counts[1] == counts[0] && counts[2] == 2 && counts[3] == 2;
    for (size_t d = 0; ok && d < lead; d++) {
        ok = dims[0][d] == dims[1][d];
        rows *= dims[0][d];
    }
    Slot s = {.rows = rows, .kind = kind};
    if (ok) {
        s.in = dims[0][lead];
        s.out = s.stride = dims[1][lead];
        s.rank = dims[2][0];
        ok = dims[2][1] == s.in && dims[3][0] == s.rank && dims[3][1] == s.out &&
             (kind == HALF || (counts[4] == 1 && dims[4][0] == s.rank));
    }
    if (!ok)
        return api->CreateStatus(ORT_INVALID_ARGUMENT,
                                 kind == HALF ? "LoraSlot: want x [..., in], y [..., out], a [r, in] and b [r, out]"
                                              : "LoraSlotInt8: want x [..., in], y [..., out], a [r, in], b [r, out] "
                                                "and scale [r]");
    if (s.rank > MAX_RANK) return api->CreateStatus(ORT_INVALID_ARGUMENT, "LoraSlot: rank above 256");
    OrtValue *output;
    TRY(api->KernelContext_GetOutput(context, 0, dims[1], counts[1], &output));
    TRY(read(inputs[0], (const void **)&s.x));
    TRY(read(inputs[1], (const void **)&s.y));
    TRY(api->GetTensorMutableData(output, (void **)&s.z));
    if (s.rank == 0 || rows == 0 || s.out == 0) {
        if (s.z != s.y) copy_floats(s.z, s.y, rows * s.out);
        return NULL;
    }
    TRY(read(inputs[2], &s.a));
    TRY(read(inputs[3], &s.b));
    if (kind == INT8) TRY(read(inputs[4], (const void **)&s.scale));
    return add_slot(&s, context);
}

/* MatMulInt4(x, codes, scales) and MatMulInt8(x, codes, scales) = x @ W.T for an integer weight W [n, k] in this
 * kernel's own layout, the same on every CPU: W's rows (the output's columns) in tiles of TILE = 16, each tile's codes
 * in 64-byte chunks holding a run of values of each of its 16 rows, 4 bytes a row, and its scales [blocks][16].
 * - int4 (weight_formats.Int4, llama.cpp's Q4_0 grid): codes 0..15 standing for code - 8, per block of `block`
 *   values along a row, times the block's half-precision scale; a chunk holds 8 values a row, byte i of a row its
 *   values 8c + i (low nibble) and 8c + 4 + i (high), so one load unpacks into two vectors of four values a row.
 * - int8 (weight_formats.Int8): codes -127..127, one float32 scale a row (one block, the whole row); a chunk holds
 *   4 values a row, two chunks in turn standing for int4's low and high nibbles.
 * x is quantized to int8 per row and block (scale max|x| / 127, round to nearest even), the dot products run on
 * integers (exact; a block's sum is converted to float32 rounding to nearest, as every CPU does by default) and each
 * block's sum is scaled and added in float32 in the same order on every CPU, lanes being columns: the same result
 * from x86's VNNI or its AVX2 path, Arm's dot product or its widening multiplies (a Pi 4 has none).
 * onnxruntime's MatMulNBits, which MatMulInt4 replaces, computes a different sum on each Arm core (KleidiAI where
 * there is i8mm or dotprod), packs a second copy of the weight at load, and was measured slower at batch 1 and at
 * 128 rows; DynamicQuantizeMatMul, which MatMulInt8 replaces, wants the weight transposed (so the embedding kept a
 * second copy for lookup) and quantizes x per tensor, so a prompt's logits depended on what else was in its batch
 * (tools/kernel_bench.py measures them side by side). */

#define TILE 16                 /* columns a tile of the layout holds */
#define TILE_BYTES (TILE * 4)   /* one chunk of a tile: 4 bytes of each column */
#define VECTORS (TILE / LANES)  /* vectors a tile's columns fill */
#define MAX_K 65536             /* longest row of x: its codes fit the decode step's stack, and int8's sums int32 */
/* The tile of the output a call holds in registers: rows of x sharing each unpacked chunk, by tiles sharing each
 * broadcast of x; sized so the integer sums, the unpacked codes and the broadcasts fit the registers (32 zmm, 16 ymm,
 * 32 q), the float sums being touched once a block. A single row splits each tile's sums in two chains (low and
 * high nibbles): one chain a tile left the multiply-adds waiting on each other, not on memory, in cache. */
#if LANES == 16
#define PREFILL_ROWS 4
#define PREFILL_TILES 2
#define DECODE_PAIR 2
#elif LANES == 8
#define PREFILL_ROWS 4
#define PREFILL_TILES 1
#define DECODE_PAIR 2
#else
#define PREFILL_ROWS 2
#define PREFILL_TILES 1
#define DECODE_PAIR 1
#endif
#define MAX_TILES 2             /* the most tiles a call takes, for its arrays */
#define DECODE_TILES 8          /* tiles a thread takes at a time for a single row */

/* Integer vectors of LANES int32 lanes, one lane an output column; what GCC's vector extensions say alike for every
 * target is written once, the rest per instruction set. */
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * LANES)));
static inline vi load_codes(const uint8_t *p) {
    vi w;
    __builtin_memcpy(&w, p, sizeof w);
    return w;
}
static inline vi low_nibbles(vi w) { return w & 0x0F0F0F0F; }
/* a logical shift: the mask drops what the next byte shifts in */
static inline vi high_nibbles(vi w) { return (vi)(((vu)w >> 4) & 0x0F0F0F0F); }
static inline vi splat_i(int32_t v) { return (vi){0} + v; }
static inline vn to_float(vi v) { return __builtin_convertvector(v, vn); }
static inline vn absn(vn v) { return (vn)((vi)v & 0x7fffffff); }

/* Per instruction set: dot4(acc, w, x4) adds to lane l the dot product of column l's four unsigned codes (int4's
 * 0..15) with the four int8 values of x in each lane of `x4`; dot4s the same for signed codes (int8's), short of
 * SIGNED_BIAS x the four values' sum where the instruction wants unsigned codes (the correction takes it off). */
#if LANES == 16
#if defined(__AVX512VNNI__)
static inline vi dot4(vi acc, vi w, vi x4) {
    return (vi)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)w, (__m512i)x4);
}
#define SIGNED_BIAS 128 /* vpdpbusd multiplies unsigned by signed: code + 128 is code ^ 0x80 */
static inline vi dot4s(vi acc, vi w, vi x4) { return dot4(acc, w ^ (int32_t)0x80808080, x4); }
#else
static inline vi dot4(vi acc, vi w, vi x4) {
    return acc + (vi)_mm512_madd_epi16(_mm512_maddubs_epi16((__m512i)w, (__m512i)x4), _mm512_set1_epi16(1));
}
/* vpmaddubsw would saturate on code + 128 (two products of 255 x 127); |x| times the code with x's sign does not */
#define SIGNED_BIAS 0
static inline vi dot4s(vi acc, vi w, vi x4) {
    const __m512i signed_w = _mm512_mask_sub_epi8((__m512i)w, _mm512_movepi8_mask((__m512i)x4), _mm512_setzero_si512(),
                                                  (__m512i)w);
    return dot4(acc, (vi)_mm512_abs_epi8((__m512i)x4), (vi)signed_w);
}
#endif
static inline vn fmadd(vn a, vn b, vn c) { return (vn)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
static inline vi round_i(vn v) { return (vi)_mm512_cvtps_epi32((__m512)v); }
static inline void store_i8(int8_t *p, vi v) { _mm_storeu_si128((__m128i *)p, _mm512_cvtsepi32_epi8((__m512i)v)); }
#elif LANES == 8
static inline vi dot4(vi acc, vi w, vi x4) {
    return acc + (vi)_mm256_madd_epi16(_mm256_maddubs_epi16((__m256i)w, (__m256i)x4), _mm256_set1_epi16(1));
}
#define SIGNED_BIAS 0
static inline vi dot4s(vi acc, vi w, vi x4) {
    return dot4(acc, (vi)_mm256_abs_epi8((__m256i)x4), (vi)_mm256_sign_epi8((__m256i)w, (__m256i)x4));
}
static inline vn fmadd(vn a, vn b, vn c) { return (vn)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
static inline vi round_i(vn v) { return (vi)_mm256_cvtps_epi32((__m256)v); }
static inline void store_i8(int8_t *p, vi v) {
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128((__m256i)v), _mm256_extracti128_si256((__m256i)v, 1));
    _mm_storel_epi64((__m128i *)p, _mm_packs_epi16(w, w));
}
#else
/* codes 0..15 are int8 too, so Arm multiplies signed by signed for both */
static inline vi dot4(vi acc, vi w, vi x4) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, vreinterpretq_s8_s32(w), vreinterpretq_s8_s32(x4));
#else
    /* two products of 127 x 127 fit an int16 pair sum */
    const int8x16_t a = vreinterpretq_s8_s32(w), b = vreinterpretq_s8_s32(x4);
    const int16x8_t low = vmull_s8(vget_low_s8(a), vget_low_s8(b)), high = vmull_high_s8(a, b);
    return vpadalq_s16(acc, vpaddq_s16(low, high));
#endif
}
#define SIGNED_BIAS 0
static inline vi dot4s(vi acc, vi w, vi x4) { return dot4(acc, w, x4); }
static inline vn fmadd(vn a, vn b, vn c) { return (vn)vfmaq_f32((float32x4_t)c, (float32x4_t)a, (float32x4_t)b); }
static inline vi round_i(vn v) { return vcvtnq_s32_f32((float32x4_t)v); }
static inline void store_i8(int8_t *p, vi v) {
    const int16x4_t h = vqmovn_s32(v);
    const int8x8_t b = vqmovn_s16(vcombine_s16(h, h));
    __builtin_memcpy(p, &b, 4);
}
#endif

static inline int32_t sum_i(vi v) {
    int32_t sum = 0;
    for (int l = 0; l < LANES; l++) sum += v[l];
    return sum;
}
static inline float max_lane(vn v) {
    float m = 0;
    for (int l = 0; l < LANES; l++) m = v[l] > m ? v[l] : m;
    return m;
}

typedef struct {
    const float *x;
    const uint8_t *codes;
    const void *scales;  /* int4: float16, int8: float32 */
    float *y;
    int64_t rows, k, k_padded, block, n; /* n: the output's columns, a whole number of tiles */
    int bits;
    int32_t offset;      /* what the integer sums count per unit of x's codes beyond the dot product */
    int8_t *q;           /* x quantized: [rows][k_padded] */
    float *row_scale;    /* [rows][blocks] */
    int32_t *correction; /* [rows][blocks]: offset x the sum of the block's int8 values */
} IntMatmul;

/* LANES values of x from i, zeros past k (the codes there are zeros too). */
static inline vn x_values(const float *x, int64_t k, int64_t i) {
    if (i + LANES <= k) return loadn(x + i);
    vn v = splat(0);
    for (int l = 0; l < LANES && i + l < k; l++) v[l] = x[i + l];
    return v;
}

/* Row r of x into int8 per block. */
static void quantize_row(const IntMatmul *s, int64_t r) {
    const int64_t blocks = s->k_padded / s->block;
    const float *x = s->x + r * s->k;
    int8_t *q = s->q + r * s->k_padded;
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t start = b * s->block, end = start + s->block;
        vn top = splat(0);
        for (int64_t i = start; i < end; i += LANES) {
            const vn a = absn(x_values(x, s->k, i));
            for (int l = 0; l < LANES; l++) top[l] = a[l] > top[l] ? a[l] : top[l];
        }
        const float amax = max_lane(top), inverse = amax > 0 ? 127.0f / amax : 0.0f;
        vi sums = {0};
        for (int64_t i = start; i < end; i += LANES) {
            const vi v = round_i(x_values(x, s->k, i) * splat(inverse));
            store_i8(q + i, v);
            sums += v;
        }
        s->row_scale[r * blocks + b] = amax / 127.0f;
        s->correction[r * blocks + b] = s->offset * sum_i(sums);
    }
}

/* y[r0:r0 + R][tiles t0:t0 + T] (R <= PREFILL_ROWS, T <= MAX_TILES) for `bits`-bit codes: per block, integer sums
 * of each step of 8 values (int4: a chunk's two nibbles, int8: two chunks) against four values of x broadcast each,
 * then the offset taken off, and the block's scales applied in float32. */
INLINE void int_tile(const IntMatmul *s, int64_t r0, int R, int64_t t0, int T, int bits) {
    const int64_t steps = s->k_padded / 8, blocks = s->k_padded / s->block, per_block = s->block / 8;
    const int64_t step_bytes = TILE_BYTES * bits / 4;
    const int chains = R == 1 ? 2 : 1;
    vn acc[PREFILL_ROWS][MAX_TILES][VECTORS];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            for (int v = 0; v < VECTORS; v++) acc[r][t][v] = splat(0);
    for (int64_t b = 0; b < blocks; b++) {
        vi sums[2][PREFILL_ROWS][MAX_TILES][VECTORS];
        for (int h = 0; h < chains; h++)
            for (int r = 0; r < R; r++)
                for (int t = 0; t < T; t++)
                    for (int v = 0; v < VECTORS; v++) sums[h][r][t][v] = (vi){0};
        for (int64_t c = b * per_block; c < (b + 1) * per_block; c++) {
            vi low[MAX_TILES][VECTORS], high[MAX_TILES][VECTORS];
            for (int t = 0; t < T; t++)
                for (int v = 0; v < VECTORS; v++) {
                    const uint8_t *p = s->codes + ((t0 + t) * steps + c) * step_bytes + v * LANES * 4;
                    if (bits == 4) {
                        const vi w = load_codes(p);
                        low[t][v] = low_nibbles(w);
                        high[t][v] = high_nibbles(w);
                    } else {
                        low[t][v] = load_codes(p);
                        high[t][v] = load_codes(p + TILE_BYTES);
                    }
                }
            for (int r = 0; r < R; r++) {
                int32_t x4[2];
                __builtin_memcpy(x4, s->q + (r0 + r) * s->k_padded + c * 8, 8);
                const vi first = splat_i(x4[0]), second = splat_i(x4[1]);
                for (int t = 0; t < T; t++)
                    for (int v = 0; v < VECTORS; v++) {
                        vi *one = &sums[0][r][t][v], *other = &sums[chains - 1][r][t][v];
                        if (bits == 4) {
                            *one = dot4(*one, low[t][v], first);
                            *other = dot4(*other, high[t][v], second);
                        } else {
                            *one = dot4s(*one, low[t][v], first);
                            *other = dot4s(*other, high[t][v], second);
                        }
                    }
            }
        }
        for (int r = 0; r < R; r++) {
            const vi offset = splat_i(s->correction[(r0 + r) * blocks + b]);
            const vn x_scale = splat(s->row_scale[(r0 + r) * blocks + b]);
            for (int t = 0; t < T; t++)
                for (int v = 0; v < VECTORS; v++) {
                    const vi sum = chains == 2 ? sums[0][r][t][v] + sums[1][r][t][v] : sums[0][r][t][v];
                    const int64_t at = ((t0 + t) * blocks + b) * TILE + v * LANES;
                    const vn w_scale = bits == 4 ? loadh((const uint16_t *)s->scales + at)
                                                 : loadn((const float *)s->scales + at);
                    acc[r][t][v] = fmadd(to_float(sum - offset), w_scale * x_scale, acc[r][t][v]);
                }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            for (int v = 0; v < VECTORS; v++) storen(s->y + (r0 + r) * s->n + (t0 + t) * TILE + v * LANES, acc[r][t][v]);
}

/* A single row: tiles t0..t1, DECODE_PAIR at a time. */
INLINE void decode_tiles(const IntMatmul *s, int64_t t0, int64_t t1, int bits) {
    for (int64_t t = t0; t < t1; t += DECODE_PAIR)
        if (t + DECODE_PAIR <= t1) int_tile(s, 0, 1, t, DECODE_PAIR, bits);
        else int_tile(s, 0, 1, t, 1, bits);
}

/* A single row: task `task` takes DECODE_TILES tiles. */
static void decode_task(void *data, size_t task) {
    const IntMatmul *s = data;
    const int64_t tiles = s->n / TILE, t0 = (int64_t)task * DECODE_TILES;
    const int64_t t1 = t0 + DECODE_TILES < tiles ? t0 + DECODE_TILES : tiles;
    if (s->bits == 4) decode_tiles(s, t0, t1, 4);
    else decode_tiles(s, t0, t1, 8);
}

/* Several rows: PREFILL_TILES tiles from t0 for every row, PREFILL_ROWS rows at a time, so a tile's codes stay in
 * cache while the rows pass over them. */
INLINE void prefill_tiles(const IntMatmul *s, int64_t t0, int T, int bits) {
    for (int64_t r0 = 0; r0 < s->rows; r0 += PREFILL_ROWS) {
        const int R = r0 + PREFILL_ROWS <= s->rows ? PREFILL_ROWS : (int)(s->rows - r0);
        if (T == PREFILL_TILES) {
            if (R == PREFILL_ROWS) int_tile(s, r0, PREFILL_ROWS, t0, PREFILL_TILES, bits);
            else int_tile(s, r0, R, t0, PREFILL_TILES, bits);
        } else int_tile(s, r0, R, t0, 1, bits);
    }
}

static void prefill_task(void *data, size_t task) {
    const IntMatmul *s = data;
    const int64_t tiles = s->n / TILE, t0 = (int64_t)task * PREFILL_TILES;
    const int T = t0 + PREFILL_TILES <= tiles ? PREFILL_TILES : (int)(tiles - t0);
    if (s->bits == 4) prefill_tiles(s, t0, T, 4);
    else prefill_tiles(s, t0, T, 8);
}

static void quantize_task(void *data, size_t task) { quantize_row(data, (int64_t)task); }

/* The operators' kernels: their bits, and their one-line refusal of inputs that do not fit. */
typedef struct {
    int bits;
    const char *want, *want_slots;
} IntOp;
#define WANT_SLOTS ": want LoRA slots as columns [s] (s up to 3), then each slot's a [r, k], b [r, width] and scale " \
                   "[r] (int8, int8, float), its width within the output from its column"
static const IntOp int4_op = {4,
                              "MatMulInt4: want x [..., k], codes [n / 16, k / 8, 64] and scales [n / 16, blocks, 16], "
                              "blocks of a multiple of 16 values, k up to 65536",
                              "MatMulInt4" WANT_SLOTS};
static const IntOp int8_op = {8,
                              "MatMulInt8: want x [..., k], codes [n / 16, k / 4, 64] and scales [n / 16, blocks, 16], "
                              "blocks of a multiple of 16 values, k up to 65536",
                              "MatMulInt8" WANT_SLOTS};

/* The output's shape: x's, the last dimension the codes' rows (n, a whole number of tiles). Without it onnxruntime
 * knows nothing of the output's rank, and the nodes after it (a LoraSlot passing y's shape on, a layer norm over
 * the last axis) fail to load. */
static OrtStatus *ORT_API_CALL infer_matmul(const OrtCustomOp *op, OrtShapeInferContext *context) {
    (void)op;
    OrtTensorTypeAndShapeInfo *x = NULL, *codes = NULL, *out = NULL;
    size_t rank = 0, codes_rank = 0;
    int64_t dims[8], codes_dims[8];
    const char *names[8];
    OrtStatus *status = api->ShapeInferContext_GetInputTypeShape(context, 0, &x);
    if (!status) status = api->ShapeInferContext_GetInputTypeShape(context, 1, &codes);
    if (!status) status = api->GetDimensionsCount(x, &rank);
    if (!status) status = api->GetDimensionsCount(codes, &codes_rank);
    if (!status && (rank < 1 || rank > 8 || codes_rank != 3))
        status = api->CreateStatus(ORT_INVALID_ARGUMENT, "MatMulInt4 / MatMulInt8: want x [..., k] and codes "
                                                         "[n / 16, chunks, 64]");
    if (!status) status = api->GetDimensions(x, dims, rank);
    if (!status) status = api->GetSymbolicDimensions(x, names, rank);
    if (!status) status = api->GetDimensions(codes, codes_dims, 3);
    if (!status) {
        dims[rank - 1] = codes_dims[0] < 0 ? -1 : codes_dims[0] * TILE;
        names[rank - 1] = "";
        status = api->CreateTensorTypeAndShapeInfo(&out);
    }
    if (!status) status = api->SetTensorElementType(out, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    if (!status) status = api->SetDimensions(out, dims, rank);
    if (!status) status = api->SetSymbolicDimensions(out, names, rank);
    if (!status) status = api->ShapeInferContext_SetOutputTypeShape(context, 0, out);
    if (out) api->ReleaseTensorTypeAndShapeInfo(out); /* the context owns the inputs' shapes it hands out */
    return status;
}

static OrtMemoryInfo *cpu_memory;

/* y = x @ W.T for a product whose inputs are read: a single row quantized on the calling thread, on the stack, then
 * the tiles split between threads; several rows quantized and multiplied in the session's scratch. */
static OrtStatus *multiply(IntMatmul *m, OrtKernelContext *context) {
    const int64_t blocks = m->k_padded / m->block, tiles = m->n / TILE;
    if (m->rows == 1) {
        int8_t q[MAX_K] __attribute__((aligned(64)));
        float row_scale[MAX_K / 16];
        int32_t correction[MAX_K / 16];
        m->q = q, m->row_scale = row_scale, m->correction = correction;
        quantize_row(m, 0);
        const size_t tasks = (size_t)((tiles + DECODE_TILES - 1) / DECODE_TILES);
        if (tasks > 1) return api->KernelContext_ParallelFor(context, decode_task, tasks, 0, m);
        decode_task(m, 0);
        return NULL;
    }
    OrtAllocator *allocator;
    TRY(api->KernelContext_GetAllocator(context, cpu_memory, &allocator));
    void *scratch;
    const size_t q_bytes = (size_t)(m->rows * m->k_padded + 63) / 64 * 64;
    OrtStatus *status = api->AllocatorAlloc(allocator, q_bytes + (size_t)(m->rows * blocks) * 8, &scratch);
    if (!status) {
        m->q = scratch;
        m->row_scale = (float *)((char *)scratch + q_bytes);
        m->correction = (int32_t *)(m->row_scale + m->rows * blocks);
        status = api->KernelContext_ParallelFor(context, quantize_task, (size_t)m->rows, 0, m);
        if (!status)
            status = api->KernelContext_ParallelFor(context, prefill_task,
                                                    (size_t)((tiles + PREFILL_TILES - 1) / PREFILL_TILES), 0, m);
        OrtStatus *freed = api->AllocatorFree(allocator, scratch);
        if (!status) status = freed;
        else if (freed) api->ReleaseStatus(freed);
    }
    api->ReleaseAllocator(allocator);
    return status;
}

#define MAX_SLOTS 3 /* LoRA slots one product takes: a fused projection's q, k and v */

/* The product's LoRA slots (lora_slots.py, LoraSlotInt8's arithmetic), added to y in place after it: input 3 holds
 * the column each slot's part of the output starts at, then come each slot's a, b and scale. In the product's own
 * node an empty slot (r = 0) costs nothing, where a LoraSlotInt8 node of its own cost a call. */
static OrtStatus *add_slots(const IntMatmul *m, const IntOp *op, OrtKernelContext *context) {
    size_t count;
    TRY(api->KernelContext_GetInputCount(context, &count));
    if (count <= 3) return NULL;
    const OrtValue *columns_value;
    size_t columns_rank;
    int64_t columns_dims[8];
    TRY(api->KernelContext_GetInput(context, 3, &columns_value));
    TRY(shape_of(columns_value, &columns_rank, columns_dims));
    if (columns_rank != 1 || columns_dims[0] > MAX_SLOTS || count != 4 + 3 * (size_t)columns_dims[0])
        return api->CreateStatus(ORT_INVALID_ARGUMENT, op->want_slots);
    const int64_t *columns;
    TRY(read(columns_value, (const void **)&columns));
    for (int64_t j = 0; j < columns_dims[0]; j++) {
        const OrtValue *inputs[3];
        size_t counts[3];
        int64_t dims[3][8];
        for (size_t i = 0; i < 3; i++) {
            TRY(api->KernelContext_GetInput(context, 4 + 3 * (size_t)j + i, &inputs[i]));
            TRY(shape_of(inputs[i], &counts[i], dims[i]));
        }
        Slot s = {.x = m->x, .rows = m->rows, .in = m->k, .stride = m->n, .kind = INT8};
        int ok = counts[0] == 2 && counts[1] == 2 && counts[2] == 1;
        if (ok) {
            s.rank = dims[0][0];
            s.out = dims[1][1];
            ok = dims[0][1] == m->k && dims[1][0] == s.rank && dims[2][0] == s.rank && s.rank <= MAX_RANK &&
                 columns[j] >= 0 && columns[j] + s.out <= m->n;
        }
        if (!ok) return api->CreateStatus(ORT_INVALID_ARGUMENT, op->want_slots);
        if (s.rank == 0 || s.rows == 0 || s.out == 0) continue;
        s.y = s.z = m->y + columns[j];
        TRY(read(inputs[0], &s.a));
        TRY(read(inputs[1], &s.b));
        TRY(read(inputs[2], (const void **)&s.scale));
        TRY(add_slot(&s, context));
    }
    return NULL;
}

static OrtStatus *ORT_API_CALL compute_matmul(void *kernel, OrtKernelContext *context) {
    const IntOp *op = kernel;
    const OrtValue *inputs[3];
    size_t counts[3];
    int64_t dims[3][8];
    for (size_t i = 0; i < 3; i++) {
        TRY(api->KernelContext_GetInput(context, i, &inputs[i]));
        TRY(shape_of(inputs[i], &counts[i], dims[i]));
    }
    /* x [..., k], codes [tiles, chunks, 64], scales [tiles, blocks, 16] */
    IntMatmul s = {.rows = 1, .bits = op->bits, .offset = op->bits == 4 ? 8 : SIGNED_BIAS};
    int ok = counts[0] >= 1 && counts[1] == 3 && counts[2] == 3 && dims[1][2] == TILE_BYTES && dims[2][2] == TILE &&
             dims[1][0] == dims[2][0] && dims[2][1] > 0 && dims[1][1] > 0;
    if (ok) {
        for (size_t d = 0; d + 1 < counts[0]; d++) s.rows *= dims[0][d];
        s.k = dims[0][counts[0] - 1];
        s.k_padded = dims[1][1] * (32 / op->bits); /* a chunk holds 32 / bits values of each column */
        s.block = s.k_padded / dims[2][1];
        s.n = dims[1][0] * TILE;
        ok = s.k_padded % dims[2][1] == 0 && s.block % 16 == 0 && s.k <= s.k_padded && s.k_padded - s.k < s.block &&
             s.k_padded <= MAX_K;
    }
    if (!ok) return api->CreateStatus(ORT_INVALID_ARGUMENT, op->want);
    int64_t out_dims[8];
    for (size_t d = 0; d + 1 < counts[0]; d++) out_dims[d] = dims[0][d];
    out_dims[counts[0] - 1] = s.n;
    OrtValue *output;
    TRY(api->KernelContext_GetOutput(context, 0, out_dims, counts[0], &output));
    TRY(read(inputs[0], (const void **)&s.x));
    TRY(read(inputs[1], (const void **)&s.codes));
    TRY(read(inputs[2], &s.scales));
    TRY(api->GetTensorMutableData(output, (void **)&s.y));
    if (s.rows == 0 || s.n == 0) return NULL;
    TRY(multiply(&s, context));
    return add_slots(&s, op, context);
}

static const int kinds[2] = {HALF, INT8};

/* The output's type and shape are y's. Without this onnxruntime plans the output as of unknown size and never gives
 * it y's buffer (measured: GetMayInplace alone, z and y always apart), so an empty slot copied y. The context owns
 * the shape it hands out. */
static OrtStatus *ORT_API_CALL infer(const OrtCustomOp *op, OrtShapeInferContext *context) {
    (void)op;
    OrtTensorTypeAndShapeInfo *info;
    TRY(api->ShapeInferContext_GetInputTypeShape(context, 1, &info));
    return api->ShapeInferContext_SetOutputTypeShape(context, 0, info);
}

/* A kernel's creation, for every operator here: the kernel is a constant describing the operator (`object`). */
#define CREATE_KERNEL(name, object)                                                                                  \
    static OrtStatus *ORT_API_CALL name(const OrtCustomOp *op, const OrtApi *given, const OrtKernelInfo *info,       \
                                        void **kernel) {                                                             \
        (void)op, (void)given, (void)info;                                                                           \
        *kernel = (void *)(object);                                                                                  \
        return NULL;                                                                                                 \
    }
CREATE_KERNEL(create_half, &kinds[HALF])
CREATE_KERNEL(create_int8, &kinds[INT8])

static void ORT_API_CALL destroy(void *kernel) { (void)kernel; }
static const char *ORT_API_CALL name_half(const OrtCustomOp *op) { (void)op; return "LoraSlot"; }
static const char *ORT_API_CALL name_int8(const OrtCustomOp *op) { (void)op; return "LoraSlotInt8"; }
static const char *ORT_API_CALL provider(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }

/* LoraSlot: x, y float; a, b float16. LoraSlotInt8: x, y float; a, b int8; scale float. */
static ONNXTensorElementDataType ORT_API_CALL input_type_half(const OrtCustomOp *op, size_t index) {
    (void)op;
    return index < 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}
static ONNXTensorElementDataType ORT_API_CALL input_type_int8(const OrtCustomOp *op, size_t index) {
    (void)op;
    return index == 2 || index == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t ORT_API_CALL input_count_half(const OrtCustomOp *op) { (void)op; return 4; }
static size_t ORT_API_CALL input_count_int8(const OrtCustomOp *op) { (void)op; return 5; }
static ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp *op, size_t index) {
    (void)op, (void)index;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t ORT_API_CALL output_count(const OrtCustomOp *op) { (void)op; return 1; }
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp *op, size_t index) {
    (void)op, (void)index;
    return INPUT_OUTPUT_REQUIRED;
}
static OrtMemType ORT_API_CALL memory(const OrtCustomOp *op, size_t index) {
    (void)op, (void)index;
    return OrtMemTypeDefault;
}
static int ORT_API_CALL one(const OrtCustomOp *op) { (void)op; return 1; }
static int ORT_API_CALL zero(const OrtCustomOp *op) { (void)op; return 0; }
static int ORT_API_CALL last_version(const OrtCustomOp *op) { (void)op; return 0x7fffffff; }

/* The output may take y's buffer (input 1); the arrays are static, so releasing them does nothing. */
static int in_place_input[1] = {1}, in_place_output[1] = {0};
static size_t ORT_API_CALL may_in_place(int **input_index, int **output_index) {
    *input_index = in_place_input;
    *output_index = in_place_output;
    return 1;
}
static size_t ORT_API_CALL no_alias(int **input_index, int **output_index) {
    *input_index = NULL;
    *output_index = NULL;
    return 0;
}
static void ORT_API_CALL release(int *input_index, int *output_index) { (void)input_index, (void)output_index; }

/* Every field but the name, the inputs and the kernel's creation is the same for both operators. */
#define LORA_SLOT_OP(kind)                                                                                           \
    {                                                                                                                \
        .version = API_VERSION, .GetName = name_##kind, .GetExecutionProviderType = provider,                        \
        .GetInputType = input_type_##kind, .GetInputTypeCount = input_count_##kind, .GetOutputType = output_type,    \
        .GetOutputTypeCount = output_count, .KernelDestroy = destroy, .GetInputCharacteristic = required,            \
        .GetOutputCharacteristic = required, .GetInputMemoryType = memory, .GetVariadicInputMinArity = one,          \
        .GetVariadicInputHomogeneity = zero, .GetVariadicOutputMinArity = one, .GetVariadicOutputHomogeneity = zero, \
        .CreateKernelV2 = create_##kind, .KernelComputeV2 = compute, .InferOutputShapeFn = infer,                    \
        .GetStartVersion = one, .GetEndVersion = last_version, .GetMayInplace = may_in_place,                        \
        .ReleaseMayInplace = release, .GetAliasMap = no_alias, .ReleaseAliasMap = release,                           \
    }
static const OrtCustomOp lora_slot = LORA_SLOT_OP(half), lora_slot_int8 = LORA_SLOT_OP(int8);

CREATE_KERNEL(create_matmul_int4, &int4_op)
CREATE_KERNEL(create_matmul_int8, &int8_op)
static const char *ORT_API_CALL name_matmul_int4(const OrtCustomOp *op) { (void)op; return "MatMulInt4"; }
static const char *ORT_API_CALL name_matmul_int8(const OrtCustomOp *op) { (void)op; return "MatMulInt8"; }
/* MatMulInt4: x float, codes uint8, scales float16. MatMulInt8: x float, codes int8, scales float. Both: then,
 * optional, the slots' columns int64, and each slot's a and b int8 and scale float. */
static ONNXTensorElementDataType slot_input_type(size_t index) {
    return index == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
                      : (index - 4) % 3 == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
}
static ONNXTensorElementDataType ORT_API_CALL input_type_matmul_int4(const OrtCustomOp *op, size_t index) {
    (void)op;
    return index == 0   ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
           : index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
           : index == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16
                        : slot_input_type(index);
}
static ONNXTensorElementDataType ORT_API_CALL input_type_matmul_int8(const OrtCustomOp *op, size_t index) {
    (void)op;
    return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8
           : index < 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
                       : slot_input_type(index);
}
static size_t ORT_API_CALL matmul_inputs(const OrtCustomOp *op) { (void)op; return 4 + 3 * MAX_SLOTS; }
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL matmul_input(const OrtCustomOp *op, size_t index) {
    (void)op;
    return index < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

/* Every field but the name, the inputs' types and the kernel's creation is the same for both operators. */
#define MATMUL_OP(name, types, create)                                                                               \
    {                                                                                                                \
        .version = API_VERSION, .GetName = name, .GetExecutionProviderType = provider, .GetInputType = types,        \
        .GetInputTypeCount = matmul_inputs, .GetOutputType = output_type, .GetOutputTypeCount = output_count,        \
        .KernelDestroy = destroy, .GetInputCharacteristic = matmul_input, .GetOutputCharacteristic = required,       \
        .GetInputMemoryType = memory, .GetVariadicInputMinArity = one, .GetVariadicInputHomogeneity = zero,          \
        .GetVariadicOutputMinArity = one, .GetVariadicOutputHomogeneity = zero, .CreateKernelV2 = create,            \
        .KernelComputeV2 = compute_matmul, .InferOutputShapeFn = infer_matmul, .GetStartVersion = one,               \
        .GetEndVersion = last_version, .GetMayInplace = no_alias, .ReleaseMayInplace = release,                      \
        .GetAliasMap = no_alias, .ReleaseAliasMap = release,                                                         \
    }
static const OrtCustomOp matmul_int4 = MATMUL_OP(name_matmul_int4, input_type_matmul_int4, create_matmul_int4),
                         matmul_int8 = MATMUL_OP(name_matmul_int8, input_type_matmul_int8, create_matmul_int8);

static OrtCustomOpDomain *domain;

/* Called by onnxruntime for each session the library is registered with (SessionOptions.register_custom_ops_library):
 * one domain, made once, serves them all. */
EXPORT OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    if (!api) {
        const OrtApi *given = base->GetApi(API_VERSION);
        if (!given) return NULL; /* too old to say so: the session then fails on the unknown op */
        api = given;
    }
    if (!cpu_memory) TRY(api->CreateCpuMemoryInfo(OrtDeviceAllocator, OrtMemTypeDefault, &cpu_memory));
    if (!domain) {
        TRY(api->CreateCustomOpDomain("edge_runtime", &domain));
        TRY(api->CustomOpDomain_Add(domain, &lora_slot));
        TRY(api->CustomOpDomain_Add(domain, &lora_slot_int8));
        TRY(api->CustomOpDomain_Add(domain, &matmul_int4));
        TRY(api->CustomOpDomain_Add(domain, &matmul_int8));
    }
    return api->AddCustomOpDomain(options, domain);
}

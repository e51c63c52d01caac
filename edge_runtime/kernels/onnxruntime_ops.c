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
        up(s, t[k], s->y + (r0 + k) * s->out, s->z + (r0 + k) * s->out, 0, s->out, kind);
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
        s.out = dims[1][lead];
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
    const int64_t element = kind == HALF ? 2 : 1;
    if (rows == 1) {
        /* A decode step: each half split between threads where it reads enough (one thread reads ~half of what
         * DRAM gives two) */
        float t[ROWS][MAX_RANK];
        s.t = t[0];
        const size_t rank_tasks = (size_t)((s.rank + A_ROWS - 1) / A_ROWS);
        if (s.rank * s.in * element >= SPLIT_BYTES && rank_tasks > 1)
            TRY(api->KernelContext_ParallelFor(context, rank_task, rank_tasks, 0, &s));
        else
            for (size_t task = 0; task < rank_tasks; task++) rank_task(&s, task);
        const size_t tasks = (size_t)((s.out + TASK_COLUMNS - 1) / TASK_COLUMNS);
        if (s.rank * s.out * element >= SPLIT_BYTES && tasks > 1)
            return api->KernelContext_ParallelFor(context, columns_task, tasks, 0, &s);
        for (size_t task = 0; task < tasks; task++) columns_task(&s, task);
        return NULL;
    }
    const size_t tasks = (size_t)((rows + ROWS - 1) / ROWS);
    if (tasks > 1) return api->KernelContext_ParallelFor(context, rows_task, tasks, 0, &s);
    rows_task(&s, 0);
    return NULL;
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

static OrtStatus *ORT_API_CALL create_half(const OrtCustomOp *op, const OrtApi *given, const OrtKernelInfo *info,
                                           void **kernel) {
    (void)op, (void)given, (void)info;
    *kernel = (void *)&kinds[HALF];
    return NULL;
}

static OrtStatus *ORT_API_CALL create_int8(const OrtCustomOp *op, const OrtApi *given, const OrtKernelInfo *info,
                                           void **kernel) {
    (void)op, (void)given, (void)info;
    *kernel = (void *)&kinds[INT8];
    return NULL;
}

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

static OrtCustomOpDomain *domain;

/* Called by onnxruntime for each session the library is registered with (SessionOptions.register_custom_ops_library):
 * one domain, made once, serves them all. */
EXPORT OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    if (!api) {
        const OrtApi *given = base->GetApi(API_VERSION);
        if (!given) return NULL; /* too old to say so: the session then fails on the unknown op */
        api = given;
    }
    if (!domain) {
        TRY(api->CreateCustomOpDomain("edge_runtime", &domain));
        TRY(api->CustomOpDomain_Add(domain, &lora_slot));
        TRY(api->CustomOpDomain_Add(domain, &lora_slot_int8));
    }
    return api->AddCustomOpDomain(options, domain);
}

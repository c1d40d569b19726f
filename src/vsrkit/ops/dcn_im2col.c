/* Modulated deformable im2col for vsrkit's CPU deformable convolution.
 *
 * Built on first use by vsrkit/ops/native.py (cc -O3 -march=native -fopenmp) and called through
 * ctypes.
 *
 * One call fills the rows [row0, row1) of the im2col matrix of a modulated deformable
 * convolution: for every output pixel, offset group g, kernel position k and channel c of the
 * group, the bilinear sample of the input (zeros outside the image: a corner outside [0, H) x
 * [0, W) reads zero) times the modulation. The matrix is written pixel-major,
 * out[pixel][g][k][c], so that one GEMM with the weight permuted to (Cout, G, K, Cin/G) gives a
 * channels-last output. The input is channels-last (H, W, C), so the Cin/G channels of a group
 * at one pixel are contiguous and one corner is one short vector load.
 *
 * Per output pixel, a branch-free loop first turns all of its samples' coordinates into four
 * corner offsets and weights each (vectorised over the samples), then a second loop reads the
 * corners. With 8 channels per group (both models' case) and AVX2, a corner is one 8-lane
 * load and a sample four FMAs: twice as fast as one scalar-address loop doing both.
 *
 * The offsets and the mask can be given raw (as torchvision takes them) or as the logits of
 * the convolution that predicts them; then offset = tanh_scale * tanh(logit) (if tanh_scale is
 * not 0) plus a flow, and mask = sigmoid(logit). This is BasicVSR++'s flow-guided alignment and
 * EDVR's DCNv2Pack, fused so that the offset tensor is read once instead of through half a
 * dozen full-size elementwise passes. The transcendental functions use a polynomial exp
 * (Cephes' expf, relative error ~1e-7) that the compiler vectorises without -ffast-math (the
 * flags -fno-math-errno -fno-trapping-math let it inline floorf and if-convert the clamps).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

enum { DT_F32 = 0, DT_BF16 = 1 };

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even; a NaN stays a (quiet) NaN. Branch-free, so that loops of it vectorise. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

/* Plain comparisons rather than fminf/fmaxf, which stay libm calls without -ffast-math. */
static inline float clampf(float x, float lo, float hi) {
    x = x < lo ? lo : x;
    return x > hi ? hi : x;
}

static inline float poly_expf(float x) {
    x = clampf(x, -87.0f, 88.0f);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float e = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return e * scale;
}

/* dst[i] = src[base + i * stride] as float32, i < n. */
static void load_f32(float *dst, const void *src, int dtype, int64_t base, int64_t n, int64_t stride) {
    if (dtype == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src + base;
        if (stride == 1)
            for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
        else
            for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i * stride]);
    } else {
        const float *s = (const float *)src + base;
        if (stride == 1)
            memcpy(dst, s, (size_t)n * sizeof(float));
        else
            for (int64_t i = 0; i < n; i++) dst[i] = s[i * stride];
    }
}

static void scaled_tanh(float *v, int64_t n, float scale) {
    for (int64_t i = 0; i < n; i++) {
        float x = clampf(v[i], -15.0f, 15.0f);
        v[i] = scale * (1.0f - 2.0f / (1.0f + poly_expf(2.0f * x)));
    }
}

static void sigmoid(float *v, int64_t n) {
    for (int64_t i = 0; i < n; i++) v[i] = 1.0f / (1.0f + poly_expf(-v[i]));
}

/* A thread's tables for the two steps (see the top of the file). The gathers below read
 * sample s's cg channels from its four corners into dst[s * cg ...]. */
typedef struct {
    /* Per (group, kernel position) of the layer: the kernel tap's offset and the group's first
     * channel. */
    float *tap_y, *tap_x;
    int64_t *channel0;
    /* Per sample of the current pixel: the four corners' offsets into the input and weights. */
    int64_t *i00, *i01, *i10, *i11;
    float *w00, *w01, *w10, *w11;
} Samples;

/* Eight channels from the four corners of each sample, as eight-lane AVX2 vectors. */
#ifdef HAVE_AVX2
static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_bf16(const uint16_t *p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline void store8_f32(float *p, __m256 v) { _mm256_storeu_ps(p, v); }
/* f32_to_bf16 on eight lanes. */
static inline void store8_bf16(uint16_t *p, __m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded =
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i quiet_nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256i is_nan =
        _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    const __m256i r = _mm256_blendv_epi8(rounded, quiet_nan, is_nan);
    /* Every lane is in [0, 0xffff]: the saturating pack is a plain narrowing. */
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
#define DEFINE_GATHER8(NAME, IN_T, LOAD8, OUT_T, STORE8)                                           \
    static void NAME(const IN_T *restrict in, const Samples *sp, OUT_T *restrict dst, int64_t n) {  \
        for (int64_t s = 0; s < n; s++) {                                                         \
            __m256 v = _mm256_mul_ps(_mm256_set1_ps(sp->w00[s]), LOAD8(in + sp->i00[s]));          \
            v = _mm256_fmadd_ps(_mm256_set1_ps(sp->w01[s]), LOAD8(in + sp->i01[s]), v);           \
            v = _mm256_fmadd_ps(_mm256_set1_ps(sp->w10[s]), LOAD8(in + sp->i10[s]), v);           \
            v = _mm256_fmadd_ps(_mm256_set1_ps(sp->w11[s]), LOAD8(in + sp->i11[s]), v);           \
            STORE8(dst + 8 * s, v);                                                               \
        }                                                                                         \
    }
DEFINE_GATHER8(gather8_f32_f32, float, load8_f32, float, store8_f32)
DEFINE_GATHER8(gather8_f32_bf16, float, load8_f32, uint16_t, store8_bf16)
DEFINE_GATHER8(gather8_bf16_f32, uint16_t, load8_bf16, float, store8_f32)
DEFINE_GATHER8(gather8_bf16_bf16, uint16_t, load8_bf16, uint16_t, store8_bf16)
#endif

/* Any channel count, in plain C. */
#define DEFINE_GATHER(NAME, IN_T, LOAD, OUT_T, STORE)                                              \
    static void NAME(const IN_T *restrict in, const Samples *sp, OUT_T *restrict dst, int64_t n,   \
                     int64_t cg) {                                                                 \
        for (int64_t s = 0; s < n; s++) {                                                         \
            const IN_T *p00 = in + sp->i00[s], *p01 = in + sp->i01[s];                            \
            const IN_T *p10 = in + sp->i10[s], *p11 = in + sp->i11[s];                            \
            const float w00 = sp->w00[s], w01 = sp->w01[s], w10 = sp->w10[s], w11 = sp->w11[s];   \
            OUT_T *d = dst + s * cg;                                                              \
            for (int64_t c = 0; c < cg; c++)                                                      \
                d[c] = STORE(w00 * LOAD(p00[c]) + w01 * LOAD(p01[c]) + w10 * LOAD(p10[c]) +         \
                             w11 * LOAD(p11[c]));                                                 \
        }                                                                                         \
    }
#define AS_IS(v) (v)
DEFINE_GATHER(gather_f32_f32, float, AS_IS, float, AS_IS)
DEFINE_GATHER(gather_f32_bf16, float, AS_IS, uint16_t, f32_to_bf16)
DEFINE_GATHER(gather_bf16_f32, uint16_t, bf16_to_f32, float, AS_IS)
DEFINE_GATHER(gather_bf16_bf16, uint16_t, bf16_to_f32, uint16_t, f32_to_bf16)

/* The arguments of one call, passed as one struct. The field list is written once, here: the
 * struct and the layout report below (names, offsets, sizes) are generated from it, and
 * vsrkit/ops/native.py compares that report with its ctypes.Structure before using the kernel. */
#define DCN_ARGS_FIELDS(X)                                                                         \
    X(const void *, input) /* channels-last (H, W, C) */                                           \
    X(int32_t, input_dtype) X(int64_t, H) X(int64_t, W) X(int64_t, C)                              \
    X(const void *, offset) X(int32_t, offset_dtype) X(int64_t, off_ps) X(int64_t, off_cs)        \
    X(const void *, mask) X(int32_t, mask_dtype) X(int64_t, mask_ps) X(int64_t, mask_cs)          \
    X(float, tanh_scale) X(int32_t, mask_sigmoid)                                                  \
    X(const float *, flow_a) X(const float *, flow_b) X(int64_t, flow_ps) X(int64_t, flow_cs)     \
    X(int64_t, G) X(int64_t, kh) X(int64_t, kw) X(int64_t, sh) X(int64_t, sw) X(int64_t, ph)       \
    X(int64_t, pw) X(int64_t, dh) X(int64_t, dw) X(int64_t, Wo) X(int64_t, row0) X(int64_t, row1) \
    X(void *, out) /* the im2col rows [row0 * Wo, row1 * Wo) */                                    \
    X(int32_t, out_dtype)

#define VSRKIT_STRUCT_FIELD(type, name) type name;
typedef struct {
    DCN_ARGS_FIELDS(VSRKIT_STRUCT_FIELD)
} DcnArgs;

/* "name,name,...": the fields in order. */
#define VSRKIT_FIELD_NAME(type, name) #name ","
const char *vsrkit_dcn_args_fields(void) { return DCN_ARGS_FIELDS(VSRKIT_FIELD_NAME); }

/* sizeof(DcnArgs), then each field's offset and size; returns how many values that is (written
 * only if they fit in `capacity`). */
#define VSRKIT_FIELD_LAYOUT(type, name)                                                            \
    if (n + 2 <= capacity) {                                                                       \
        layout[n] = (int64_t)offsetof(DcnArgs, name);                                              \
        layout[n + 1] = (int64_t)sizeof(((DcnArgs *)0)->name);                                     \
    }                                                                                              \
    n += 2;
int64_t vsrkit_dcn_args_layout(int64_t *layout, int64_t capacity) {
    int64_t n = 1;
    if (capacity >= 1) layout[0] = (int64_t)sizeof(DcnArgs);
    DCN_ARGS_FIELDS(VSRKIT_FIELD_LAYOUT)
    return n;
}

/* The n samples of one output pixel at (base_y, base_x): offsets o[s][dy, dx] and masks m[s],
 * into four corner offsets into the input and four weights each. Branch-free, so that the
 * compiler vectorises it over the samples; a separate function, for its restrict pointers. */
static __attribute__((noinline)) void corner_samples(
    int64_t n, float base_y, float base_x, const float *restrict o, const float *restrict m,
    const float *restrict tap_y, const float *restrict tap_x, const int64_t *restrict channel0, int64_t H,
    int64_t W, int64_t C, int64_t *restrict i00, int64_t *restrict i01, int64_t *restrict i10,
    int64_t *restrict i11, float *restrict w00, float *restrict w01, float *restrict w10, float *restrict w11) {
    const float fH = (float)H, fW = (float)W;
    for (int64_t s = 0; s < n; s++) {
        float y = base_y + tap_y[s] + o[2 * s];
        float x = base_x + tap_x[s] + o[2 * s + 1];
        /* Both rows or both columns outside (or a NaN): the sample is zero. */
        const int inside = (y > -1.0f) & (y < fH) & (x > -1.0f) & (x < fW);
        const float mk = inside ? m[s] : 0.0f;
        y = inside ? y : 0.0f;
        x = inside ? x : 0.0f;
        const float y0f = floorf(y), x0f = floorf(x);
        const float ly = y - y0f, lx = x - x0f;
        const int64_t y0 = (int64_t)y0f, x0 = (int64_t)x0f;
        /* A corner outside the image weighs zero and reads a valid address. */
        const float wy0 = y0 >= 0 ? 1.0f - ly : 0.0f, wy1 = y0 + 1 < H ? ly : 0.0f;
        const float wx0 = x0 >= 0 ? 1.0f - lx : 0.0f, wx1 = x0 + 1 < W ? lx : 0.0f;
        const int64_t r0 = (y0 < 0 ? 0 : y0) * W, r1 = (y0 + 1 < H ? y0 + 1 : H - 1) * W;
        const int64_t c0 = x0 < 0 ? 0 : x0, c1 = x0 + 1 < W ? x0 + 1 : W - 1;
        w00[s] = wy0 * wx0 * mk;
        w01[s] = wy0 * wx1 * mk;
        w10[s] = wy1 * wx0 * mk;
        w11[s] = wy1 * wx1 * mk;
        i00[s] = (r0 + c0) * C + channel0[s];
        i01[s] = (r0 + c1) * C + channel0[s];
        i10[s] = (r1 + c0) * C + channel0[s];
        i11[s] = (r1 + c1) * C + channel0[s];
    }
}

/* Output pixels r * Wo + [wo0, wo1) of one row; off_buf and msk_buf hold Wo pixels' worth. */
static void im2col_segment(const DcnArgs *q, int64_t out_pixel0, int64_t r, int64_t wo0, int64_t wo1,
                           float *off_buf, float *msk_buf, const Samples *sp) {
    const int64_t G = q->G, K = q->kh * q->kw, cg = q->C / q->G, n = wo1 - wo0;
    const int64_t n_off = 2 * G * K, n_msk = G * K;
    const int out_bf16 = q->out_dtype == DT_BF16;

    /* Offsets and mask of the segment, as float32: off_buf[i][g][k][dy, dx], msk_buf[i][g][k]. */
    for (int64_t i = 0; i < n; i++) {
        const int64_t p = r * q->Wo + wo0 + i;
        load_f32(off_buf + i * n_off, q->offset, q->offset_dtype, p * q->off_ps, n_off, q->off_cs);
        if (q->mask) load_f32(msk_buf + i * n_msk, q->mask, q->mask_dtype, p * q->mask_ps, n_msk, q->mask_cs);
    }
    if (q->tanh_scale != 0.0f) scaled_tanh(off_buf, n * n_off, q->tanh_scale);
    if (!q->mask)
        for (int64_t i = 0; i < n * n_msk; i++) msk_buf[i] = 1.0f;
    else if (q->mask_sigmoid)
        sigmoid(msk_buf, n * n_msk);
    if (q->flow_a) {
        for (int64_t i = 0; i < n; i++) {
            const int64_t p = r * q->Wo + wo0 + i;
            for (int64_t g = 0; g < G; g++) {
                /* The first half of the groups follows flow_a, the second flow_b. */
                const float *f = (q->flow_b && 2 * g >= G) ? q->flow_b : q->flow_a;
                const float fx = f[p * q->flow_ps], fy = f[p * q->flow_ps + q->flow_cs];
                float *o = off_buf + i * n_off + g * 2 * K;
                for (int64_t k = 0; k < K; k++) {
                    o[2 * k] += fy;
                    o[2 * k + 1] += fx;
                }
            }
        }
    }

    const int64_t H = q->H, W = q->W, C = q->C, GK = G * K;
    const int in_bf16 = q->input_dtype == DT_BF16;
    for (int64_t i = 0; i < n; i++) {
        const float *o = off_buf + i * n_off;
        const float *m = msk_buf + i * n_msk;
        const int64_t row = (r * q->Wo + wo0 + i - out_pixel0) * GK * cg;
        const float base_y = (float)(r * q->sh - q->ph), base_x = (float)((wo0 + i) * q->sw - q->pw);
        corner_samples(GK, base_y, base_x, o, m, sp->tap_y, sp->tap_x, sp->channel0, H, W, C, sp->i00, sp->i01,
                       sp->i10, sp->i11, sp->w00, sp->w01, sp->w10, sp->w11);
#ifdef HAVE_AVX2
        if (cg == 8) {
            if (out_bf16) {
                uint16_t *dst = (uint16_t *)q->out + row;
                if (in_bf16) gather8_bf16_bf16(q->input, sp, dst, GK);
                else gather8_f32_bf16(q->input, sp, dst, GK);
            } else {
                float *dst = (float *)q->out + row;
                if (in_bf16) gather8_bf16_f32(q->input, sp, dst, GK);
                else gather8_f32_f32(q->input, sp, dst, GK);
            }
            continue;
        }
#endif
        if (out_bf16) {
            uint16_t *dst = (uint16_t *)q->out + row;
            if (in_bf16) gather_bf16_bf16(q->input, sp, dst, GK, cg);
            else gather_f32_bf16(q->input, sp, dst, GK, cg);
        } else {
            float *dst = (float *)q->out + row;
            if (in_bf16) gather_bf16_f32(q->input, sp, dst, GK, cg);
            else gather_f32_f32(q->input, sp, dst, GK, cg);
        }
    }
}

/* Fills the im2col rows of output pixels [row0 * Wo, row1 * Wo) into `out`, split evenly by
 * pixels over the OpenMP threads (the library links the libgomp that PyTorch has loaded, so
 * these are PyTorch's own threads and torch.set_num_threads applies). Returns 0, or -1 if a
 * thread could not allocate its buffers. */
int vsrkit_dcn_im2col(const DcnArgs *args) {
    const DcnArgs q = *args;
    const int64_t G = q.G, kh = q.kh, kw = q.kw, dh = q.dh, dw = q.dw, C = q.C, Wo = q.Wo;
    const int64_t row0 = q.row0, row1 = q.row1;
    const int64_t first = row0 * Wo, total = (row1 - row0) * Wo;
    const size_t per_pixel = (size_t)(3 * G * kh * kw) * sizeof(float);
    int status = 0;
#pragma omp parallel
    {
        int threads = 1, t = 0;
#ifdef _OPENMP
        threads = omp_get_num_threads();
        t = omp_get_thread_num();
#endif
        const int64_t K = kh * kw, GK = G * K;
        /* Offsets and masks of a row, then the Samples tables: 7 floats and 5 int64 per sample. */
        float *buf = malloc((size_t)Wo * per_pixel + (size_t)GK * (7 * sizeof(float) + 5 * sizeof(int64_t)));
        if (!buf) {
#pragma omp atomic write
            status = -1;
        } else {
            int64_t *ints = (int64_t *)(buf + Wo * 3 * GK);
            float *floats = (float *)(ints + 5 * GK);
            Samples sp = {floats, floats + GK, ints, ints + GK, ints + 2 * GK, ints + 3 * GK, ints + 4 * GK,
                          floats + 2 * GK, floats + 3 * GK, floats + 4 * GK, floats + 5 * GK};
            for (int64_t s = 0; s < GK; s++) {
                const int64_t k = s % K;
                sp.tap_y[s] = (float)((k / kw) * dh);
                sp.tap_x[s] = (float)((k % kw) * dw);
                sp.channel0[s] = (s / K) * (C / G);
            }
            const int64_t p_end = first + total * (t + 1) / threads;
            for (int64_t p = first + total * t / threads; p < p_end;) {
                const int64_t r = p / Wo, wo0 = p % Wo;
                const int64_t wo1 = wo0 + (p_end - p < Wo - wo0 ? p_end - p : Wo - wo0);
                im2col_segment(&q, first, r, wo0, wo1, buf, buf + Wo * 2 * GK, &sp);
                p += wo1 - wo0;
            }
            free(buf);
        }
    }
    return status;
}

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
 * The offsets and the mask can be given raw (as torchvision takes them) or as the logits of
 * the convolution that predicts them; then offset = tanh_scale * tanh(logit) (if tanh_scale is
 * not 0) plus a flow, and mask = sigmoid(logit). This is BasicVSR++'s flow-guided alignment and
 * EDVR's DCNv2Pack, fused so that the offset tensor is read once instead of through half a
 * dozen full-size elementwise passes. The transcendental functions use a polynomial exp
 * (Cephes' expf, relative error ~1e-7) that the compiler vectorises without -ffast-math (the
 * flags -fno-math-errno -fno-trapping-math let it inline floorf and if-convert the clamps).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
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

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                              /* round to nearest even */
    return (uint16_t)(u >> 16);
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

/* One bilinear sample of cg channels from four corners, for each input/output dtype pair. */
#define DEFINE_SAMPLE(NAME, IN_T, LOAD, OUT_T, STORE)                                              \
    static inline void NAME(const IN_T *restrict in, int64_t i00, int64_t i01, int64_t i10,     \
                            int64_t i11, float w00, float w01, float w10, float w11,             \
                            OUT_T *restrict dst, int64_t cg) {                                   \
        for (int64_t c = 0; c < cg; c++)                                                         \
            dst[c] = STORE(w00 * LOAD(in[i00 + c]) + w01 * LOAD(in[i01 + c]) +                   \
                           w10 * LOAD(in[i10 + c]) + w11 * LOAD(in[i11 + c]));                   \
    }
#define AS_IS(v) (v)
DEFINE_SAMPLE(sample_f32_f32, float, AS_IS, float, AS_IS)
DEFINE_SAMPLE(sample_f32_bf16, float, AS_IS, uint16_t, f32_to_bf16)
DEFINE_SAMPLE(sample_bf16_f32, uint16_t, bf16_to_f32, float, AS_IS)
DEFINE_SAMPLE(sample_bf16_bf16, uint16_t, bf16_to_f32, uint16_t, f32_to_bf16)

/* The models' groups have 8 channels (BasicVSR++: 128/16, EDVR: 64/8): with the count known
 * at compile time the loop becomes one 8-lane vector expression. */
static void sample(int in_bf16, int out_bf16, const void *in, int64_t i00, int64_t i01, int64_t i10,
                   int64_t i11, float w00, float w01, float w10, float w11, void *dst, int64_t cg) {
    if (cg == 8) {
        if (in_bf16 && out_bf16)
            sample_bf16_bf16(in, i00, i01, i10, i11, w00, w01, w10, w11, dst, 8);
        else if (in_bf16)
            sample_bf16_f32(in, i00, i01, i10, i11, w00, w01, w10, w11, dst, 8);
        else if (out_bf16)
            sample_f32_bf16(in, i00, i01, i10, i11, w00, w01, w10, w11, dst, 8);
        else
            sample_f32_f32(in, i00, i01, i10, i11, w00, w01, w10, w11, dst, 8);
    } else {
        if (in_bf16 && out_bf16)
            sample_bf16_bf16(in, i00, i01, i10, i11, w00, w01, w10, w11, dst, cg);
        else if (in_bf16)
            sample_bf16_f32(in, i00, i01, i10, i11, w00, w01, w10, w11, dst, cg);
        else if (out_bf16)
            sample_f32_bf16(in, i00, i01, i10, i11, w00, w01, w10, w11, dst, cg);
        else
            sample_f32_f32(in, i00, i01, i10, i11, w00, w01, w10, w11, dst, cg);
    }
}

typedef struct {
    const void *input;
    int input_dtype;
    int64_t H, W, C;
    const void *offset;
    int offset_dtype;
    int64_t off_ps, off_cs;
    const void *mask;
    int mask_dtype;
    int64_t mask_ps, mask_cs;
    float tanh_scale;
    int mask_sigmoid;
    const float *flow_a, *flow_b;
    int64_t flow_ps, flow_cs;
    int64_t G, kh, kw, sh, sw, ph, pw, dh, dw, Wo;
    void *out; /* the im2col row of output pixel `out_pixel0` */
    int out_dtype;
    int64_t out_pixel0;
} Problem;

/* Output pixels r * Wo + [wo0, wo1) of one row; off_buf and msk_buf hold Wo pixels' worth. */
static void im2col_segment(const Problem *q, int64_t r, int64_t wo0, int64_t wo1, float *off_buf,
                           float *msk_buf) {
    const int64_t G = q->G, K = q->kh * q->kw, cg = q->C / q->G, n = wo1 - wo0;
    const int64_t n_off = 2 * G * K, n_msk = G * K;
    const int out_bf16 = q->out_dtype == DT_BF16;
    const float fH = (float)q->H, fW = (float)q->W;

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

    for (int64_t i = 0; i < n; i++) {
        const float *o = off_buf + i * n_off;
        const float *m = msk_buf + i * n_msk;
        const int64_t row = (r * q->Wo + wo0 + i - q->out_pixel0) * G * K * cg;
        const float base_y = (float)(r * q->sh - q->ph), base_x = (float)((wo0 + i) * q->sw - q->pw);
        for (int64_t g = 0; g < G; g++) {
            for (int64_t ki = 0; ki < q->kh; ki++) {
                for (int64_t kj = 0; kj < q->kw; kj++) {
                    const int64_t gk = g * K + ki * q->kw + kj;
                    const float y = base_y + (float)(ki * q->dh) + o[2 * gk];
                    const float x = base_x + (float)(kj * q->dw) + o[2 * gk + 1];
                    void *dst = out_bf16 ? (void *)((uint16_t *)q->out + row + gk * cg)
                                         : (void *)((float *)q->out + row + gk * cg);
                    if (!(y > -1.0f && y < fH && x > -1.0f && x < fW)) {
                        /* Both rows or both columns outside: the sample is zero (also NaN). */
                        memset(dst, 0, (size_t)cg * (out_bf16 ? sizeof(uint16_t) : sizeof(float)));
                        continue;
                    }
                    const float y0f = floorf(y), x0f = floorf(x);
                    const float ly = y - y0f, lx = x - x0f;
                    int64_t y0 = (int64_t)y0f, x0 = (int64_t)x0f;
                    int64_t y1 = y0 + 1, x1 = x0 + 1;
                    const float mk = m[gk];
                    float w00 = (1.0f - ly) * (1.0f - lx) * mk, w01 = (1.0f - ly) * lx * mk;
                    float w10 = ly * (1.0f - lx) * mk, w11 = ly * lx * mk;
                    /* A corner outside the image weighs zero and reads a valid address. */
                    if (y0 < 0) { w00 = 0.0f; w01 = 0.0f; y0 = 0; }
                    if (y1 >= q->H) { w10 = 0.0f; w11 = 0.0f; y1 = q->H - 1; }
                    if (x0 < 0) { w00 = 0.0f; w10 = 0.0f; x0 = 0; }
                    if (x1 >= q->W) { w01 = 0.0f; w11 = 0.0f; x1 = q->W - 1; }
                    const int64_t W = q->W, C = q->C, c0 = g * cg;
                    sample(q->input_dtype == DT_BF16, out_bf16, q->input, (y0 * W + x0) * C + c0,
                           (y0 * W + x1) * C + c0, (y1 * W + x0) * C + c0, (y1 * W + x1) * C + c0, w00, w01,
                           w10, w11, dst, cg);
                }
            }
        }
    }
}

/* Fills the im2col rows of output pixels [row0 * Wo, row1 * Wo) into `out`, split evenly by
 * pixels over the OpenMP threads (the library links the libgomp that PyTorch has loaded, so
 * these are PyTorch's own threads and torch.set_num_threads applies). Returns 0, or -1 if a
 * thread could not allocate its buffers. */
int vsrkit_dcn_im2col(
    const void *input, int input_dtype, int64_t H, int64_t W, int64_t C,
    const void *offset, int offset_dtype, int64_t off_ps, int64_t off_cs,
    const void *mask, int mask_dtype, int64_t mask_ps, int64_t mask_cs,
    float tanh_scale, int mask_sigmoid,
    const float *flow_a, const float *flow_b, int64_t flow_ps, int64_t flow_cs,
    int64_t G, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
    int64_t dh, int64_t dw, int64_t Wo, int64_t row0, int64_t row1,
    void *out, int out_dtype) {
    const Problem q = {input, input_dtype, H, W, C, offset, offset_dtype, off_ps, off_cs,
                       mask, mask_dtype, mask_ps, mask_cs, tanh_scale, mask_sigmoid,
                       flow_a, flow_b, flow_ps, flow_cs, G, kh, kw, sh, sw, ph, pw, dh, dw, Wo,
                       out, out_dtype, row0 * Wo};
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
        float *buf = malloc((size_t)Wo * per_pixel);
        if (!buf) {
#pragma omp atomic write
            status = -1;
        } else {
            const int64_t p_end = first + total * (t + 1) / threads;
            for (int64_t p = first + total * t / threads; p < p_end;) {
                const int64_t r = p / Wo, wo0 = p % Wo;
                const int64_t wo1 = wo0 + (p_end - p < Wo - wo0 ? p_end - p : Wo - wo0);
                im2col_segment(&q, r, wo0, wo1, buf, buf + Wo * 2 * G * kh * kw);
                p += wo1 - wo0;
            }
            free(buf);
        }
    }
    return status;
}

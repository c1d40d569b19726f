/* Stride-1 convolutions through NNPACK's Winograd and FFT kernels, on PyTorch's OpenMP threads.
 *
 * Built with dcn_im2col.c by vsrkit/ops/native.py and called through ctypes; see
 * vsrkit/ops/nnpack.py. PyTorch links NNPACK into libtorch_cpu and exports
 * nnp_convolution_inference, whose address the caller passes in (no NNPACK headers or
 * libraries are needed to build this file).
 *
 * Why not PyTorch's own torch._nnpack_spatial_convolution: it runs NNPACK on a separate
 * pthreadpool whose threads and PyTorch's OpenMP threads spin-wait against each other on every
 * call (a 30-block trunk took as long as oneDNN's direct convolution). Here NNPACK runs
 * single-threaded inside an OpenMP parallel region of PyTorch's own libgomp: a batch is split
 * by image, one image by bands of output rows (each band's input rows, with their halo, are
 * copied to a private buffer because NNPACK reads dense [C][H][W] planes).
 *
 * The epilogue is fused: out = act(conv(x) + bias [+ residual]) with act none, ReLU or
 * LeakyReLU, applied while the result is copied out of the band (or in place).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

struct nnp_size {
    size_t width, height;
};
struct nnp_padding {
    size_t top, right, bottom, left;
};
typedef int (*nnp_conv_fn)(int algorithm, int transform_strategy, size_t input_channels,
                           size_t output_channels, struct nnp_size input_size, struct nnp_padding padding,
                           struct nnp_size kernel_size, struct nnp_size output_subsampling, const float *input,
                           const float *kernel, const float *bias, float *output, void *workspace,
                           size_t *workspace_size, int activation, const void *activation_parameters,
                           void *threadpool, void *profile);

enum { NNP_TRANSFORM_COMPUTE = 1 };
enum { NNP_ACTIVATION_IDENTITY = 0, NNP_ACTIVATION_RELU = 1 };
enum { ACT_NONE = 0, ACT_RELU = 1, ACT_LEAKY_RELU = 2 };

static int num_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static int thread_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

#define MAX_BAND_ROWS 64
#define LARGE_IMAGE_VALUES ((size_t)8 << 20)

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* out[i] = act(src[i] (+ res[i])) for n values; src may equal out. */
static void epilogue(float *out, const float *src, const float *res, size_t n, int act, float slope) {
    if (res) {
        for (size_t i = 0; i < n; i++) out[i] = src[i] + res[i];
        src = out;
    }
    if (act == ACT_RELU) {
        for (size_t i = 0; i < n; i++) out[i] = src[i] > 0.0f ? src[i] : 0.0f;
    } else if (act == ACT_LEAKY_RELU) {
        for (size_t i = 0; i < n; i++) out[i] = src[i] < 0.0f ? src[i] * slope : src[i];
    } else if (src != out) {
        memcpy(out, src, n * sizeof(float));
    }
}

struct plan {
    int direct;     /* whole images written in place by NNPACK, one per thread */
    long bands;     /* bands of rows per image, each copied in and out of a private buffer */
    long band_rows; /* output rows per band */
    size_t slice;   /* scratch bytes per thread */
};

/* The workspace NNPACK asks for an input of `rows` rows; 0 on error (status in *status). */
static size_t nnp_workspace(nnp_conv_fn fn, int algo, long cin, long cout, long rows, long w, long k,
                            long pad_top, long pad_bottom, const float *in, const float *weight,
                            const float *bias, float *out, int *status) {
    struct nnp_size size = {(size_t)w, (size_t)rows}, ksize = {(size_t)k, (size_t)k}, sub = {1, 1};
    struct nnp_padding pad = {(size_t)pad_top, (size_t)(k / 2), (size_t)pad_bottom, (size_t)(k / 2)};
    size_t need = 0;
    *status = fn(algo, NNP_TRANSFORM_COMPUTE, (size_t)cin, (size_t)cout, size, pad, ksize, sub, in, weight, bias,
                 out, NULL, &need, NNP_ACTIVATION_IDENTITY, NULL, NULL, NULL);
    return need;
}

static struct plan make_plan(nnp_conv_fn fn, int algo, long n, long cin, long h, long w, long cout, long k,
                             int copy_out, const float *in, const float *weight, const float *bias,
                             float *out, int *status) {
    struct plan p;
    long nt = num_threads();
    long halo = k / 2;
    /* Bands for a single image (or a batch that does not split evenly), as long as each band
     * keeps enough rows for the transforms' tiles to stay mostly full. Smaller bands (to keep
     * a band's transforms in cache) measured no faster. */
    long bands = (n % nt == 0) ? 1 : nt;
    long min_rows = 4 * k > 16 ? 4 * k : 16;
    while (bands > 1 && h / bands < min_rows) bands--;
    /* Large images in bands of at most MAX_BAND_ROWS rows (a multiple of the thread count): the
     * scratch memory stays a few tens of MB per thread at 720x1280 instead of several hundred,
     * at the cost of the halo rows' copies. */
    size_t widest = (size_t)(cin > cout ? cin : cout);
    if (widest * h * w > LARGE_IMAGE_VALUES && h > MAX_BAND_ROWS * (bands > 1 ? bands : nt)) {
        long more = (h + MAX_BAND_ROWS - 1) / MAX_BAND_ROWS;
        bands = (more + nt - 1) / nt * nt;
    }
    p.bands = bands;
    p.band_rows = (h + bands - 1) / bands;
    *status = 0;
    p.direct = bands == 1 && !copy_out;
    if (p.direct) {
        p.slice = align64(nnp_workspace(fn, algo, cin, cout, h, w, k, halo, halo, in, weight, bias, out, status));
        return p;
    }
    long in_rows = p.band_rows + 2 * halo;
    size_t ws = nnp_workspace(fn, algo, cin, cout, in_rows, w, k, 0, 0, in, weight, bias, out, status);
    /* Edge bands have a padded side and fewer input rows: never more workspace, but ask. */
    int s2 = 0;
    size_t ws_edge =
        nnp_workspace(fn, algo, cin, cout, p.band_rows + halo, w, k, halo, 0, in, weight, bias, out, &s2);
    if (ws_edge > ws) ws = ws_edge;
    if (*status == 0) *status = s2;
    p.slice = align64((size_t)cin * in_rows * w * sizeof(float)) +
              align64((size_t)cout * p.band_rows * w * sizeof(float)) + align64(ws);
    return p;
}

/* Rows [r0, r1) of output channel `co` of image `img` (src: rows_out x w values) into `out`,
 * through the epilogue; with `shuffle`, at their places after a x2 pixel shuffle
 * (F.pixel_shuffle's order: channel 4c + 2i + j goes to pixel (2y + i, 2x + j) of channel c),
 * which saves the shuffle's own pass over the 4x larger result. */
static void store_rows(float *out, const float *src, const float *residual, long img, long co, long cout, long h,
                       long w, long r0, long r1, int shuffle, int act, float slope) {
    size_t plane = (size_t)h * w;
    if (!shuffle) {
        size_t offset = ((size_t)img * cout + co) * plane + (size_t)r0 * w;
        epilogue(out + offset, src, residual ? residual + offset : NULL, (size_t)(r1 - r0) * w, act, slope);
        return;
    }
    long c = co / 4, i = (co / 2) % 2, j = co % 2;
    float *dst_plane = out + ((size_t)img * (cout / 4) + c) * 4 * plane;
    for (long y = r0; y < r1; y++) {
        const float *row = src + (size_t)(y - r0) * w;
        float *dst = dst_plane + (size_t)(2 * y + i) * 2 * w + j;
        for (long x = 0; x < w; x++) {
            float v = row[x];
            if (act == ACT_RELU) v = v > 0.0f ? v : 0.0f;
            else if (act == ACT_LEAKY_RELU) v = v < 0.0f ? v * slope : v;
            dst[2 * x] = v;
        }
    }
}

/* The arguments of one call, passed as one struct; written once, as in dcn_im2col.c: the struct
 * and its layout report are generated from this list, which vsrkit/ops/native.py checks. */
#define NNP_ARGS_FIELDS(X)                                                                         \
    X(void *, fn_ptr) /* nnp_convolution_inference */                                              \
    X(int32_t, algo)                                                                               \
    X(const float *, in) X(int64_t, n) X(int64_t, cin) X(int64_t, h) X(int64_t, w)                 \
    X(const float *, weight) X(const float *, bias) X(int64_t, cout) X(int64_t, k)                 \
    X(float *, out) X(const float *, residual) X(int32_t, act) X(float, slope)                     \
    X(int32_t, shuffle) X(void *, scratch) X(int64_t, scratch_bytes)

#define VSRKIT_STRUCT_FIELD(type, name) type name;
typedef struct {
    NNP_ARGS_FIELDS(VSRKIT_STRUCT_FIELD)
} NnpArgs;

#define VSRKIT_FIELD_NAME(type, name) #name ","
const char *vsrkit_nnp_args_fields(void) { return NNP_ARGS_FIELDS(VSRKIT_FIELD_NAME); }

#define VSRKIT_FIELD_LAYOUT(type, name)                                                            \
    if (n + 2 <= capacity) {                                                                       \
        layout[n] = (int64_t)offsetof(NnpArgs, name);                                              \
        layout[n + 1] = (int64_t)sizeof(((NnpArgs *)0)->name);                                     \
    }                                                                                              \
    n += 2;
int64_t vsrkit_nnp_args_layout(int64_t *layout, int64_t capacity) {
    int64_t n = 1;
    if (capacity >= 1) layout[0] = (int64_t)sizeof(NnpArgs);
    NNP_ARGS_FIELDS(VSRKIT_FIELD_LAYOUT)
    return n;
}

/* Returns 0 on success, a positive byte count when `scratch` is smaller than that (nothing is
 * computed: call again with at least that much), or -status for an NNPACK error. With
 * `shuffle` (Cout a multiple of 4, no residual), `out` is the x2 pixel shuffle of the result,
 * (N, Cout/4, 2H, 2W). */
int64_t vsrkit_nnp_conv2d(const NnpArgs *args) {
    void *fn_ptr = args->fn_ptr;
    const int algo = args->algo, act = args->act, shuffle = args->shuffle;
    const float *in = args->in, *weight = args->weight, *bias = args->bias, *residual = args->residual;
    const long n = (long)args->n, cin = (long)args->cin, h = (long)args->h, w = (long)args->w;
    const long cout = (long)args->cout, k = (long)args->k;
    float *out = args->out;
    const float slope = args->slope;
    void *scratch = args->scratch;
    const int64_t scratch_bytes = args->scratch_bytes;
    nnp_conv_fn fn = (nnp_conv_fn)fn_ptr;
    int status = 0;
    /* The kernel is transformed at each call: caching its transforms (7x the weights' size for
     * Winograd 8x8, ~180 MB for BasicVSR) measured no faster. */
    if (shuffle && (cout % 4 != 0 || residual != NULL)) return -1000;
    struct plan p = make_plan(fn, algo, n, cin, h, w, cout, k, shuffle, in, weight, bias, out, &status);
    if (status != 0) return -(long)status;
    long nt = num_threads();
    size_t need = p.slice * (size_t)nt + 64;
    if (scratch == NULL || (size_t)scratch_bytes < need) return (int64_t)need;
    char *base = (char *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    long halo = k / 2;
    size_t plane = (size_t)h * w, in_image = (size_t)cin * plane, out_image = (size_t)cout * plane;
    int fused_relu = act == ACT_RELU && residual == NULL;
    int post_act = fused_relu ? ACT_NONE : act;
    int nnp_act = fused_relu ? NNP_ACTIVATION_RELU : NNP_ACTIVATION_IDENTITY;

#pragma omp parallel reduction(| : status)
    {
        long t = thread_index();
        char *slice = base + p.slice * (size_t)t;
        struct nnp_size ksize = {(size_t)k, (size_t)k}, sub = {1, 1};
        if (p.direct) {
            for (long i = t; i < n; i += nt) {
                struct nnp_size size = {(size_t)w, (size_t)h};
                struct nnp_padding pad = {(size_t)halo, (size_t)halo, (size_t)halo, (size_t)halo};
                size_t ws = p.slice;
                float *dst = out + i * out_image;
                int s = fn(algo, NNP_TRANSFORM_COMPUTE, (size_t)cin, (size_t)cout, size, pad, ksize, sub,
                           in + i * in_image, weight, bias, dst, slice, &ws, nnp_act, NULL, NULL, NULL);
                status |= s;
                if (s == 0 && (residual || post_act != ACT_NONE))
                    epilogue(dst, dst, residual ? residual + i * out_image : NULL, out_image, post_act, slope);
            }
        } else {
            float *band_in = (float *)slice;
            size_t band_in_bytes = (size_t)cin * (p.band_rows + 2 * halo) * w * sizeof(float);
            float *band_out = (float *)(slice + align64(band_in_bytes));
            char *ws_ptr = (char *)band_out + align64((size_t)cout * p.band_rows * w * sizeof(float));
            size_t ws_bytes = p.slice - (size_t)(ws_ptr - slice);
            for (long job = t; job < n * p.bands; job += nt) {
                long i = job / p.bands, b = job % p.bands;
                long r0 = b * p.band_rows, r1 = r0 + p.band_rows < h ? r0 + p.band_rows : h;
                if (r0 >= r1) continue;
                long i0 = r0 - halo > 0 ? r0 - halo : 0, i1 = r1 + halo < h ? r1 + halo : h;
                long rows_in = i1 - i0, rows_out = r1 - r0;
                const float *src = in + i * in_image;
                for (long c = 0; c < cin; c++)
                    memcpy(band_in + (size_t)c * rows_in * w, src + c * plane + (size_t)i0 * w,
                           (size_t)rows_in * w * sizeof(float));
                struct nnp_size size = {(size_t)w, (size_t)rows_in};
                struct nnp_padding pad = {(size_t)(i0 - (r0 - halo)), (size_t)halo, (size_t)(r1 + halo - i1),
                                          (size_t)halo};
                size_t ws = ws_bytes;
                int s = fn(algo, NNP_TRANSFORM_COMPUTE, (size_t)cin, (size_t)cout, size, pad, ksize, sub, band_in,
                           weight, bias, band_out, ws_ptr, &ws, nnp_act, NULL, NULL, NULL);
                status |= s;
                if (s != 0) break;
                for (long c = 0; c < cout; c++)
                    store_rows(out, band_out + (size_t)c * rows_out * w, residual, i, c, cout, h, w, r0, r1,
                               shuffle, post_act, slope);
            }
        }
    }
    return status ? -(int64_t)status : 0;
}


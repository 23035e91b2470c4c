// The training augmentation of data.py (TrainTransform.apply) on the GPU, for a whole batch of decoded
// pictures in a bounded number of launches: gpu_augment.py builds this file, packs the per-image
// arguments (ImageArgs, from the parameters data.TrainTransform.draw drew on the host) and calls
// mv_augment through ctypes. The reference is Pillow; every kernel replicates its integer and
// floating-point arithmetic operation for operation, so the result is equal bit for bit.
//
// Layouts. A source picture is (3, height, width) uint8, planar RGB, contiguous. Each batch buffer
// of pictures is (batch, 3, S, S) uint8, S = the output side. The work buffers:
//   bounds   int32 (batch, 2, S, 2): for axis 0 (x) and 1 (y), per output index o, (first source
//            index, number of taps) of the resampling filter, Pillow's precompute_coeffs `bounds`
//   coeffs   int32, per image args.coeff_offset[axis] + o * args.ksize[axis] + tap: the filter's
//            fixed-point weights (normalize_coeffs_8bpc), args.ksize[axis] entries reserved per o
//   temp     uint8, per image at args.temp_offset, the first pass's output: (3, count, S) when the
//            horizontal pass goes first (count source rows from args.temp_first on), (3, S, count)
//            when the vertical pass does (count source columns from args.temp_first on)
//   hist     int32 (2 slots, batch, 3, 256): per-channel histograms (for Contrast, channel 0 holds
//            the grey histogram)
//   lut      uint8 (batch, 3, 256): per-channel lookup tables of the slot's colour op
//
// Launches per batch (mv_augment), all on the caller's stream, none of them waits for the host:
//   1 memset (the histograms, only when an image of the batch needs one)
//   coefficients_kernel    per image, axis and output index: Pillow's filter weights
//   first_pass_kernel      Pillow's first pass, source -> temp
//   second_pass_kernel     its second pass, temp -> pictures, with the horizontal flip folded in
//   then per RandAugment slot that some image uses, slot 1 before slot 2, pictures -> other buffer:
//   histogram_kernel       per image whose op needs it: channel histograms or the grey histogram
//   lut_kernel             per image whose op is a lookup table: its 3 x 256 table
//   apply_kernel           per output pixel: the image's affine resampling, table lookup, blend
//                          or copy
// so at most 9 kernels and a memset, whatever the batch size.
//
// Exactness, op by op (Pillow's C code is compiled without fused multiply-add, as in its x86-64
// wheels; this file must be built with -fmad=false so that nvcc does not fuse either, and every
// float and double operation below then rounds exactly as there, in the same order):
//   resize      Resample.c: precompute_coeffs in double (the box as float32, as Pillow takes it),
//               weights normalised to 22-bit integers, each pass an int32 sum from 2^21 clipped to
//               uint8 (clip8). The intermediate is uint8, as Pillow's. Pillow skips a pass that
//               would change nothing (same size, box on the border); here both passes always run,
//               and such a pass has the single weight 2^22 on the pixel itself (the others are 0),
//               so it is an exact copy. The pass order follows Pillow's (gpu_augment.py decides it
//               per image): Pillow 13 resamples vertically first when that removes more than twice
//               as many rows as the horizontal pass removes columns.
//   affine      Geometry.c's generic transform: the output pixel's centre through the inverse
//               matrix in double, outside the picture the fill colour, inside bilinear (two lerps,
//               then one) or bicubic (a = -1, rows then the column) around it, border pixels
//               repeated, truncated to an integer.
//   tables      ImageOps' AutoContrast, Equalize, Invert, Posterize, Solarize and data.py's
//               SolarizeAdd as the same integer or double arithmetic per table entry;
//               ImageEnhance's Brightness and Contrast are blends with a constant, so tables too.
//   blends      Blend.c in float32: degenerate + alpha (value - degenerate), clipped, truncated;
//               Color's degenerate is the grey level (Convert.c: (19595 R + 38470 G + 7471 B +
//               2^15) >> 16), Sharpness's the SMOOTH filter (Filter.c's 3 x 3 in float32, the
//               border kept), Contrast's the rounded mean grey level.
#include <cuda_runtime.h>

// Op, Slot and ImageArgs stay outside the unnamed namespace below: mv_augment's signature uses
// ImageArgs, and a type with internal linkage would give the extern "C" function internal linkage too.

// RandAugment ops as the kernels know them (gpu_augment.py's OP_CODES maps data.py's names here)
enum Op : long long {
    OP_NONE = 0,
    OP_AFFINE = 1,        // Rotate, ShearX, ShearY, TranslateXRel, TranslateYRel: Slot.matrix
    OP_AUTOCONTRAST = 2,
    OP_EQUALIZE = 3,
    OP_INVERT = 4,
    OP_POSTERIZE = 5,     // Slot.value: the bit mask kept
    OP_SOLARIZE = 6,      // Slot.value: the threshold
    OP_SOLARIZE_ADD = 7,  // Slot.value: the amount added below 128
    OP_CONTRAST = 8,      // Slot.alpha: the blend factor, as for the next three
    OP_BRIGHTNESS = 9,
    OP_COLOR = 10,
    OP_SHARPNESS = 11,
};

// One RandAugment slot of one image (gpu_augment.py's SLOT dtype; 8-byte fields, no padding)
struct Slot {
    long long op;         // Op
    long long bicubic;    // OP_AFFINE: 1 bicubic, 0 bilinear resampling
    long long value;      // the table ops' integer parameter (see Op)
    double alpha;         // the blends' factor, a float32 value
    double matrix[6];     // OP_AFFINE: Pillow's inverse coefficients (a, b, c, d, e, f): the output
                          // pixel centred at (x, y) samples the input at (a x + b y + c, d x + e y + f)
    long long fill[3];    // OP_AFFINE: the colour outside the picture (data.FILL)
};

// Everything about one image of the batch (gpu_augment.py's ARGS dtype; 8-byte fields, no padding)
struct ImageArgs {
    const unsigned char* pixels;  // the source picture, (3, height, width)
    long long height, width;
    double box[4];                // the crop box (left, top, right, bottom), float32 values
    long long bicubic;            // the resize filter: 1 bicubic (a = -0.5), 0 bilinear
    long long flip;               // 1: mirror left-right after the resize
    long long vertical_first;     // 1: the vertical pass first (see the header)
    long long ksize[2];           // weights reserved per output index, axis x and y
    long long coeff_offset[2];    // where this image's weights start in coeffs, axis x and y
    long long temp_offset;        // where its first pass's output starts in temp (bytes)
    long long temp_first;         // the first source row (column, vertical first) in it
    long long temp_count;         // how many rows (columns) it holds
    Slot slot[2];
};

namespace {

constexpr int THREADS = 256;            // threads per block of the per-pixel kernels
constexpr int BINS = 256;               // histogram bins and lookup-table entries; lut_kernel's block
constexpr int PRECISION_BITS = 22;      // Resample.c's fixed-point weights
constexpr int FIRST_PASS_BLOCKS = 256;  // per image, most (a 500 x 375 picture's ~290 rows x 224 in one
                                        // sweep); a larger picture's threads loop
constexpr int HISTOGRAM_PIXELS = 4096;  // pixels per histogram block


// ---------------------------------------------------------------------------------------------
// Resize: Resample.c

__device__ double bilinear_filter(double x) {
    if (x < 0.0) x = -x;
    if (x < 1.0) return 1.0 - x;
    return 0.0;
}

__device__ double bicubic_filter(double x) {  // a = -0.5, as Pillow's; (a + 2) = 1.5, (a + 3) = 2.5
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

__device__ unsigned char clip8(int ss) {  // a fixed-point sum -> uint8
    if (ss >= (1 << PRECISION_BITS << 8)) return 255;
    if (ss <= 0) return 0;
    return (unsigned char)(ss >> PRECISION_BITS);
}

// One pass's value: taps weights k over the pixels src[0], src[step], ... (Pillow's inner loops)
__device__ unsigned char convolve(const unsigned char* src, long long step, const int* k, int taps) {
    int ss = 1 << (PRECISION_BITS - 1);
    for (int j = 0; j < taps; j++) ss += src[j * step] * k[j];
    return clip8(ss);
}

// precompute_coeffs + normalize_coeffs_8bpc for one output index o of one axis (grid: output
// indices / 128, 2 axes, batch)
__global__ void __launch_bounds__(128) coefficients_kernel(
    const ImageArgs* __restrict__ args, int size, int* __restrict__ bounds, int* __restrict__ coeffs) {
    const int image = blockIdx.z, axis = blockIdx.y;
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= size) return;
    const ImageArgs& a = args[image];
    const int in_size = (int)(axis == 0 ? a.width : a.height);
    const float in0 = (float)a.box[axis], in1 = (float)a.box[axis + 2];
    const bool bicubic = a.bicubic != 0;

    const double scale = (double)(in1 - in0) / size;  // the difference in float, as Pillow's
    const double filterscale = scale < 1.0 ? 1.0 : scale;
    const double support = (bicubic ? 2.0 : 1.0) * filterscale;
    const double center = in0 + (o + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = (int)(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = (int)(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;  // taps; at most ksize (2 ceil(support) + 1), at least 1, inside [0, in_size)

    double ww = 0.0;
    for (int x = 0; x < xmax; x++) {
        const double arg = (x + xmin - center + 0.5) * ss;
        ww += bicubic ? bicubic_filter(arg) : bilinear_filter(arg);
    }
    int* k = coeffs + a.coeff_offset[axis] + (long long)o * a.ksize[axis];
    for (int x = 0; x < xmax; x++) {
        const double arg = (x + xmin - center + 0.5) * ss;
        double w = bicubic ? bicubic_filter(arg) : bilinear_filter(arg);
        if (ww != 0.0) w /= ww;
        k[x] = w < 0 ? (int)(-0.5 + w * (1 << PRECISION_BITS)) : (int)(0.5 + w * (1 << PRECISION_BITS));
    }
    int* bound = bounds + (((long long)image * 2 + axis) * size + o) * 2;
    bound[0] = xmin;
    bound[1] = xmax;
}

// The first pass into temp (grid: FIRST_PASS_BLOCKS at most, batch; each thread loops). Its
// element e of a channel plane is, horizontal first, (source row temp_first + e / S, output column
// e % S); vertical first, (output row e / count, source column temp_first + e % count).
__global__ void __launch_bounds__(THREADS) first_pass_kernel(
    const ImageArgs* __restrict__ args, int size, const int* __restrict__ bounds,
    const int* __restrict__ coeffs, unsigned char* __restrict__ temp) {
    const int image = blockIdx.y;
    const ImageArgs& a = args[image];
    const long long count = a.temp_count, items = count * size, plane = a.height * a.width;
    unsigned char* out = temp + a.temp_offset;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < items;
         e += (long long)gridDim.x * blockDim.x) {
        const int* bound;
        const int* k;
        const unsigned char* src;
        long long step;
        if (a.vertical_first) {
            const int y = (int)(e / count);
            bound = bounds + (((long long)image * 2 + 1) * size + y) * 2;
            k = coeffs + a.coeff_offset[1] + (long long)y * a.ksize[1];
            src = a.pixels + bound[0] * a.width + a.temp_first + e % count;
            step = a.width;
        } else {
            const int x = (int)(e % size);
            bound = bounds + (((long long)image * 2 + 0) * size + x) * 2;
            k = coeffs + a.coeff_offset[0] + (long long)x * a.ksize[0];
            src = a.pixels + (a.temp_first + e / size) * a.width + bound[0];
            step = 1;
        }
        for (int c = 0; c < 3; c++) out[c * items + e] = convolve(src + c * plane, step, k, bound[1]);
    }
}

// The second pass, temp -> pictures (batch, 3, S, S), flipped as drawn (grid: S * S / THREADS,
// batch; one thread per output pixel)
__global__ void __launch_bounds__(THREADS) second_pass_kernel(
    const ImageArgs* __restrict__ args, int size, const int* __restrict__ bounds,
    const int* __restrict__ coeffs, const unsigned char* __restrict__ temp, unsigned char* __restrict__ pictures) {
    const int image = blockIdx.y;
    const int n = size * size, p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= n) return;
    const ImageArgs& a = args[image];
    const int y = p / size, x_out = p % size, x = a.flip ? size - 1 - x_out : x_out;
    const long long count = a.temp_count, items = count * size;
    const unsigned char* t = temp + a.temp_offset;
    const int* bound;
    const int* k;
    const unsigned char* src;
    long long step;
    if (a.vertical_first) {  // horizontally over temp (3, S, count)
        bound = bounds + (((long long)image * 2 + 0) * size + x) * 2;
        k = coeffs + a.coeff_offset[0] + (long long)x * a.ksize[0];
        src = t + (long long)y * count + (bound[0] - a.temp_first);
        step = 1;
    } else {  // vertically over temp (3, count, S)
        bound = bounds + (((long long)image * 2 + 1) * size + y) * 2;
        k = coeffs + a.coeff_offset[1] + (long long)y * a.ksize[1];
        src = t + (bound[0] - a.temp_first) * size + x;
        step = size;
    }
    unsigned char* out = pictures + (long long)image * 3 * n + p;
    for (int c = 0; c < 3; c++) out[c * n] = convolve(src + c * items, step, k, bound[1]);
}

// ---------------------------------------------------------------------------------------------
// RandAugment

__device__ int grey(int r, int g, int b) {  // Convert.c's RGB -> L
    return (19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16;
}

__device__ int blend(int degenerate, int value, float alpha) {  // Blend.c, both of its branches
    const float t = (float)degenerate + alpha * (float)(value - degenerate);
    if (t <= 0.0f) return 0;
    if (t >= 255.0f) return 255;
    return (int)t;
}

__device__ bool needs_histogram(long long op) {
    return op == OP_AUTOCONTRAST || op == OP_EQUALIZE || op == OP_CONTRAST;
}

__device__ bool is_table(long long op) {
    return needs_histogram(op) || op == OP_INVERT || op == OP_POSTERIZE || op == OP_SOLARIZE ||
           op == OP_SOLARIZE_ADD || op == OP_BRIGHTNESS;
}

// Per image whose slot op needs it, the channel histograms (AutoContrast, Equalize) or the grey
// histogram in channel 0 (Contrast) of pictures (batch, 3, S, S), added into hist (batch, 3, 256),
// which starts at zero (grid: S * S / HISTOGRAM_PIXELS, batch)
__global__ void __launch_bounds__(THREADS) histogram_kernel(
    const ImageArgs* __restrict__ args, int size, int slot, const unsigned char* __restrict__ pictures,
    int* __restrict__ hist) {
    const int image = blockIdx.y;
    const long long op = args[image].slot[slot].op;
    if (!needs_histogram(op)) return;
    __shared__ int local[3 * BINS];
    for (int k = threadIdx.x; k < 3 * BINS; k += blockDim.x) local[k] = 0;
    __syncthreads();
    const int n = size * size;
    const unsigned char* r = pictures + (long long)image * 3 * n;
    const unsigned char* g = r + n;
    const unsigned char* b = g + n;
    for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < n; p += gridDim.x * blockDim.x) {
        if (op == OP_CONTRAST) {
            atomicAdd(&local[grey(r[p], g[p], b[p])], 1);
        } else {
            atomicAdd(&local[r[p]], 1);
            atomicAdd(&local[BINS + g[p]], 1);
            atomicAdd(&local[2 * BINS + b[p]], 1);
        }
    }
    __syncthreads();
    int* out = hist + (long long)image * 3 * BINS;
    for (int k = threadIdx.x; k < 3 * BINS; k += blockDim.x)
        if (local[k] != 0) atomicAdd(&out[k], local[k]);
}

// Block-wide helpers of lut_kernel: BINS threads, thread i holding bin i; every thread must call
// them (they synchronise the block).

// The first and last bins whose count is not zero (first > last if none is)
__device__ void nonempty_range(int count, int& first, int& last) {
    __shared__ int lo, hi;
    if (threadIdx.x == 0) {
        lo = BINS;
        hi = -1;
    }
    __syncthreads();
    if (count != 0) {
        atomicMin(&lo, (int)threadIdx.x);
        atomicMax(&hi, (int)threadIdx.x);
    }
    __syncthreads();
    first = lo;
    last = hi;
    __syncthreads();  // before a next call resets them
}

// The sum of value over bins 0 .. i (inclusive, Hillis-Steele), and over all bins in total
__device__ long long inclusive_sum(long long value, long long& total) {
    __shared__ long long sums[BINS];
    const int i = threadIdx.x;
    sums[i] = value;
    __syncthreads();
    for (int d = 1; d < BINS; d *= 2) {
        const long long add = i >= d ? sums[i - d] : 0;
        __syncthreads();
        sums[i] += add;
        __syncthreads();
    }
    const long long result = sums[i];
    total = sums[BINS - 1];
    __syncthreads();  // before a next call overwrites them
    return result;
}

// ImageOps.autocontrast's table entry i of one channel (no cutoff)
__device__ int autocontrast_entry(int i, int count) {
    int lo, hi;
    nonempty_range(count, lo, hi);
    if (hi <= lo) return i;
    const double scale = 255.0 / (hi - lo);
    const double offset = -lo * scale;
    const int v = (int)(i * scale + offset);
    return v < 0 ? 0 : v > 255 ? 255 : v;
}

// ImageOps.equalize's table entry i of one channel histogram h (count = h[i]): with step =
// (pixels - the last non-empty bin's count) // 255, (step // 2 + the count below i) // step,
// clipped to 255 (Image.point's table is uint8); the identity for one value or a step of 0
__device__ int equalize_entry(int i, int count, const int* h) {
    int lo, hi;
    nonempty_range(count, lo, hi);
    long long total;
    const long long below = inclusive_sum(count, total) - count;
    const int nonempty = __syncthreads_count(count != 0);
    if (nonempty <= 1) return i;
    const long long step = (total - h[hi]) / 255;
    if (step == 0) return i;
    const long long v = (step / 2 + below) / step;
    return v > 255 ? 255 : (int)v;
}

// Per image whose slot op is a table (is_table), its 3 x 256 table into lut (batch, 3, 256), from
// the histograms of histogram_kernel where it needs them (grid: batch; BINS threads, one per entry)
__global__ void __launch_bounds__(BINS) lut_kernel(
    const ImageArgs* __restrict__ args, int size, int slot, const int* __restrict__ hist,
    unsigned char* __restrict__ lut) {
    const int image = blockIdx.x, i = threadIdx.x;
    const Slot& s = args[image].slot[slot];
    if (!is_table(s.op)) return;
    const int* h = needs_histogram(s.op) ? hist + (long long)image * 3 * BINS : nullptr;  // (3, 256)
    const float alpha = (float)s.alpha;
    int mean = 0;  // Contrast: ImageStat's mean grey level, int(sum / pixels + 0.5)
    if (s.op == OP_CONTRAST) {
        long long sum;
        inclusive_sum((long long)i * h[i], sum);
        mean = (int)((double)sum / ((double)size * size) + 0.5);
    }
    for (int c = 0; c < 3; c++) {
        int v;
        switch (s.op) {
            case OP_AUTOCONTRAST: v = autocontrast_entry(i, h[c * BINS + i]); break;
            case OP_EQUALIZE: v = equalize_entry(i, h[c * BINS + i], h + c * BINS); break;
            case OP_INVERT: v = 255 - i; break;
            case OP_POSTERIZE: v = i & (int)s.value; break;
            case OP_SOLARIZE: v = i < s.value ? i : 255 - i; break;
            case OP_SOLARIZE_ADD: v = i < 128 ? min(255, i + (int)s.value) : i; break;
            case OP_CONTRAST: v = blend(mean, i, alpha); break;
            default: v = blend(0, i, alpha); break;  // OP_BRIGHTNESS: blended with black
        }
        lut[((long long)image * 3 + c) * BINS + i] = (unsigned char)v;
    }
}

// Geometry.c's BICUBIC through v2 (d = 0) and v3 (d = 1), a = -1, in its order of operations
__device__ double cubic(double v1, double v2, double v3, double v4, double d) {
    const double p1 = v2;
    const double p2 = -v1 + v3;
    const double p3 = 2 * (v1 - v2) + v3 - v4;
    const double p4 = -v1 + v2 - v3 + v4;
    return p1 + d * (p2 + d * (p3 + d * p4));
}

__device__ int clamp_index(int i, int size) { return i < 0 ? 0 : i >= size ? size - 1 : i; }

// Image.transform(AFFINE) with a fill colour, output pixel (x, y) of all three channel planes
// (each S x S, n = S * S apart) of src into dst
__device__ void affine_pixel(const Slot& s, const unsigned char* src, unsigned char* dst, int size, int x, int y) {
    const int n = size * size, p = y * size + x;
    const double* m = s.matrix;
    const double xin = x + 0.5, yin = y + 0.5;
    double u = m[0] * xin + m[1] * yin + m[2];
    double v = m[3] * xin + m[4] * yin + m[5];
    if (u < 0.0 || u >= size || v < 0.0 || v >= size) {
        for (int c = 0; c < 3; c++) dst[c * n + p] = (unsigned char)s.fill[c];
        return;
    }
    u -= 0.5;
    v -= 0.5;
    const int col = (int)floor(u), row = (int)floor(v);
    const double dx = u - col, dy = v - row;
    for (int c = 0; c < 3; c++) {
        const unsigned char* plane = src + c * n;
        if (s.bicubic) {
            double lines[4];
            for (int j = 0; j < 4; j++) {
                const unsigned char* line = plane + clamp_index(row - 1 + j, size) * size;
                lines[j] = cubic(line[clamp_index(col - 1, size)], line[clamp_index(col, size)],
                                 line[clamp_index(col + 1, size)], line[clamp_index(col + 2, size)], dx);
            }
            const double value = cubic(lines[0], lines[1], lines[2], lines[3], dy);
            dst[c * n + p] = value <= 0.0 ? 0 : value >= 255.0 ? 255 : (unsigned char)value;
        } else {
            const int x0 = clamp_index(col, size), x1 = clamp_index(col + 1, size);
            const unsigned char* top = plane + clamp_index(row, size) * size;
            const unsigned char* bottom = plane + clamp_index(row + 1, size) * size;
            const double v1 = top[x0] + (top[x1] - top[x0]) * dx;
            const double v2 = bottom[x0] + (bottom[x1] - bottom[x0]) * dx;
            dst[c * n + p] = (unsigned char)(v1 + (v2 - v1) * dy);
        }
    }
}

// ImageFilter.SMOOTH at an interior pixel p of one S x S plane, as Filter.c's ImagingFilter3x3:
// 0.5, plus the kernel row of the line below, this line's, the line above's, each row summed
// left to right first (kernel (1 1 1, 1 5 1, 1 1 1) / 13 in float32), clipped, truncated
__device__ int smooth(const unsigned char* plane, int size, int p) {
    const float k1 = __fdiv_rn(1.0f, 13.0f), k5 = __fdiv_rn(5.0f, 13.0f);
    float ss = 0.5f;
    for (int dy = 1; dy >= -1; dy--) {
        const unsigned char* q = plane + p + dy * size;
        ss += (float)q[-1] * k1 + (float)q[0] * (dy == 0 ? k5 : k1) + (float)q[1] * k1;
    }
    if (ss <= 0.0f) return 0;
    if (ss >= 255.0f) return 255;
    return (int)ss;
}

// One slot's op on pictures src -> dst, both (batch, 3, S, S) (grid: S * S / THREADS, batch; one
// thread per output pixel, all three channels)
__global__ void __launch_bounds__(THREADS) apply_kernel(
    const ImageArgs* __restrict__ args, int size, int slot, const unsigned char* __restrict__ src,
    const unsigned char* __restrict__ lut, unsigned char* __restrict__ dst) {
    const int image = blockIdx.y;
    const int n = size * size, p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= n) return;
    const Slot& s = args[image].slot[slot];
    const unsigned char* in = src + (long long)image * 3 * n;
    unsigned char* out = dst + (long long)image * 3 * n;
    const int x = p % size, y = p / size;
    const float alpha = (float)s.alpha;
    if (s.op == OP_AFFINE) {
        affine_pixel(s, in, out, size, x, y);
    } else if (is_table(s.op)) {
        const unsigned char* table = lut + (long long)image * 3 * BINS;
        for (int c = 0; c < 3; c++) out[c * n + p] = table[c * BINS + in[c * n + p]];
    } else if (s.op == OP_COLOR) {
        const int l = grey(in[p], in[n + p], in[2 * n + p]);
        for (int c = 0; c < 3; c++) out[c * n + p] = (unsigned char)blend(l, in[c * n + p], alpha);
    } else if (s.op == OP_SHARPNESS && x > 0 && y > 0 && x < size - 1 && y < size - 1) {
        for (int c = 0; c < 3; c++) {
            const unsigned char* plane = in + c * n;
            out[c * n + p] = (unsigned char)blend(smooth(plane, size, p), plane[p], alpha);
        }
    } else {  // no op, or Sharpness on the border, where SMOOTH keeps the pixel: blended with itself
        for (int c = 0; c < 3; c++) out[c * n + p] = in[c * n + p];
    }
}

int blocks(long long items, int per_block) { return (int)((items + per_block - 1) / per_block); }

}  // namespace

extern "C" {

// sizeof(ImageArgs), for gpu_augment.py to check its packing against
int mv_augment_args_size() { return (int)sizeof(ImageArgs); }

const char* mv_augment_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

// Augment a batch (see the header). args: device array of `batch` ImageArgs; size: S;
// first_pass_items: the largest temp_count * S of the batch; bounds, coeffs, temp: work buffers
// as laid out in the header; slots_used, slots_with_histograms, slots_with_tables: bit k set when
// an image of the batch has an op, a histogram op, a table op in slot k; hist (2 x batch x 3 x 256
// int32, needed with a histogram op), lut (batch x 3 x 256, needed with a table op), scratch and
// pictures (batch, 3, S, S; scratch needed when a slot is used). The result is in pictures.
// Returns 0 or a CUDA error code (mv_augment_error_string); nothing here waits for the GPU.
int mv_augment(const ImageArgs* args, int batch, int size, long long first_pass_items, int* bounds,
               int* coeffs, unsigned char* temp, int slots_used, int slots_with_histograms,
               int slots_with_tables, int* hist, unsigned char* lut, unsigned char* scratch,
               unsigned char* pictures, cudaStream_t stream) {
    const long long n = (long long)size * size;
    const long long slot_histograms = (long long)batch * 3 * BINS;
    if (slots_with_histograms) cudaMemsetAsync(hist, 0, 2 * slot_histograms * sizeof(int), stream);
    coefficients_kernel<<<dim3(blocks(size, 128), 2, batch), 128, 0, stream>>>(args, size, bounds, coeffs);
    const int first_blocks = blocks(first_pass_items, THREADS);
    first_pass_kernel<<<dim3(first_blocks < FIRST_PASS_BLOCKS ? first_blocks : FIRST_PASS_BLOCKS, batch),
                        THREADS, 0, stream>>>(args, size, bounds, coeffs, temp);
    // the last kernel writes into pictures: with one slot used, the resize goes to scratch first
    const int used = (slots_used & 1) + (slots_used >> 1 & 1);
    unsigned char* target = used == 1 ? scratch : pictures;
    second_pass_kernel<<<dim3(blocks(n, THREADS), batch), THREADS, 0, stream>>>(
        args, size, bounds, coeffs, temp, target);
    for (int slot = 0; slot < 2; slot++) {
        if (!(slots_used >> slot & 1)) continue;
        const unsigned char* source = target;
        target = target == pictures ? scratch : pictures;
        int* slot_hist = slots_with_histograms ? hist + slot * slot_histograms : nullptr;
        if (slots_with_histograms >> slot & 1)
            histogram_kernel<<<dim3(blocks(n, HISTOGRAM_PIXELS), batch), THREADS, 0, stream>>>(
                args, size, slot, source, slot_hist);
        if (slots_with_tables >> slot & 1)
            lut_kernel<<<batch, BINS, 0, stream>>>(args, size, slot, slot_hist, lut);
        apply_kernel<<<dim3(blocks(n, THREADS), batch), THREADS, 0, stream>>>(args, size, slot, source, lut, target);
    }
    return (int)cudaGetLastError();
}

}  // extern "C"

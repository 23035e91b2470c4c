// Selective scan (Mamba's S6 recurrence) for MambaVision: forward and backward CUDA kernels.
//
// Math and names as in scan.py: for batch b, channel d, state n, token t, with h_{-1} = 0,
//     dt_t  = softplus(delta_t + delta_bias_d)
//     h_t,n = exp(dt_t * A_d,n) * h_{t-1},n + dt_t * B_t,n * u_t
//     y_t   = sum_n C_t,n * h_t,n + D_d * u_t
// u, delta, y: (b, d, l); B, C: (b, n, l), shared by all d channels; A: (d, n); D, delta_bias: (d,).
//
// Layout of the work. The scan is short along l (49..1024 in MambaVision) and wide along b x d, so
// one thread owns one (b, d) row and keeps its n states in registers. A block owns one batch row b
// and a slice of up to 256 channels; it stages kChunk tokens of u, delta (and dy) for its channels
// in shared memory with coalesced loads, and B and C (shared by all channels) once for the block.
// States beyond the real n (when n < NMAX) have A = B = C = 0 and stay zero.
//
// Backward, per thread, with g_t = dLoss/dh_t and a_t = exp(dt_t * A) (all per state n):
//     g_t       = a_{t+1} g_{t+1} + dy_t C_t                (reverse-time recurrence)
//     dC_t     += dy_t h_t                     (summed over channels)
//     dB_t     += g_t dt_t u_t                 (summed over channels)
//     du_t      = dt_t sum_n g_t B_t + D dy_t
//     d(dt_t)   = u_t sum_n g_t B_t + sum_n g_t h_{t-1} a_t A
//     dA       += g_t h_{t-1} a_t dt_t         (summed over batch and tokens)
//     ddelta_t  = d(dt_t) sigmoid(delta_t + delta_bias)     (softplus' derivative)
// The reverse pass needs h_{t-1}. Dividing by a_t is unstable, so the backward kernel first runs
// the recurrence forward and stores the state entering every segment of kSeg tokens (a scratch
// buffer that stays mostly in L2), then walks segments last to first: it recomputes the segment's
// states into registers from the stored one and runs the reverse steps over them.
// Reductions are deterministic: dB, dC are summed over a block's channels by fixed-order warp
// shuffles and shared memory, then written as per-block partials; dA, dD, ddelta_bias are written
// per (b, d); the host sums the partials with torch's (deterministic) sum. No atomics.
//
// The file includes no PyTorch header, so that it builds in seconds: scan.py allocates every
// buffer with torch, passes raw pointers and the current stream through ctypes to the extern "C"
// launchers at the end, and sums the partials.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace {

constexpr int kChunk = 32;        // tokens staged in shared memory per pass (one warp-wide row)
constexpr int kRowPad = kChunk + 1;  // padded row stride: thread r reading column k hits bank r+k
constexpr int kMaxWarps = 8;      // at most 256 channels per block
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Tokens per step group: the loops over a group's tokens are unrolled and branch-free, so the
// compiler overlaps one token's softplus and exponentials with the previous token's recurrence
// (few warps per SM: the latency must be hidden inside each thread). Also the backward's segment
// length: a segment's states live in registers, (seg_len + 1) * NMAX floats.
template <int NMAX> constexpr int seg_len() { return NMAX <= 8 ? 8 : 4; }

__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// PyTorch's softplus (beta 1, threshold 20) from the fast exp and log units; log(w) e / (w - 1)
// with w = 1 + e is log1p(e) to full float accuracy (Goldberg's trick), also for tiny e.
__device__ __forceinline__ float softplus(float x) {
  const float e = __expf(x), w = 1.f + e;
  return x > 20.f ? x : (w == 1.f ? e : __logf(w) * __fdividef(e, w - 1.f));
}

__device__ __forceinline__ float sigmoid(float x) { return __fdividef(1.f, 1.f + __expf(-x)); }

// Element conversions (PyTorch's build flags turn off the implicit __half / __nv_bfloat16 ones).
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

struct ScanShape {
  int batch, dim, len, nstate;  // b, d, l, n
  bool softplus;
};

// Stage one chunk (tokens [t0, t0 + len)) in shared memory as float:
//   R row tensors (b, d, l) of this block's channels, from src = (b, d0, 0), to dst[r * kRowPad + c];
//   S state tensors (b, n, l) of this batch row, from src = (b, 0, 0), transposed to dst[c * NMAX + n]
//   so that a thread reads the NMAX values of one token as float4s (one address for the whole warp).
// Rows past the channel count, states past nstate and tokens past len read as 0. Warp w loads rows
// w, w + warps, ..., one token per lane (coalesced). Every load of the chunk is issued before the
// first store: with few warps per SM, one exposed memory latency per chunk instead of one per element.
template <typename T, int NMAX, int R, int S>
__device__ __forceinline__ void stage_chunk(const T* const (&row_src)[R], float* const (&row_dst)[R],
                                            const T* const (&state_src)[S], float* const (&state_dst)[S],
                                            int valid_rows, int nstate, int row_len, int t0, int len) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const bool in_len = lane < len;
  float rv[R][kChunk], sv[S][NMAX];
#pragma unroll
  for (int a = 0; a < R; ++a)
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      const int r = warp + j * warps;
      rv[a][j] = (r < valid_rows && in_len) ? to_float(row_src[a][(int64_t)r * row_len + t0 + lane]) : 0.f;
    }
#pragma unroll
  for (int a = 0; a < S; ++a)
#pragma unroll
    for (int q = 0; q < NMAX; ++q) {
      const int n = warp + q * warps;
      sv[a][q] = (n < nstate && in_len) ? to_float(state_src[a][(int64_t)n * row_len + t0 + lane]) : 0.f;
    }
#pragma unroll
  for (int a = 0; a < R; ++a)
#pragma unroll
    for (int j = 0; j < kChunk; ++j) row_dst[a][(warp + j * warps) * kRowPad + lane] = rv[a][j];
#pragma unroll
  for (int a = 0; a < S; ++a)
#pragma unroll
    for (int q = 0; q < NMAX; ++q) {
      const int n = warp + q * warps;
      if (n < NMAX) state_dst[a][lane * NMAX + n] = sv[a][q];
    }
}

template <typename T>
__device__ __forceinline__ void store_rows(T* __restrict__ dst, const float* s, int valid_rows, int row_len,
                                           int t0, int len) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll 4
  for (int j = 0; j < kChunk; ++j) {
    const int r = warp + j * warps;
    if (r < valid_rows && lane < len) dst[(int64_t)r * row_len + t0 + lane] = from_float<T>(s[r * kRowPad + lane]);
  }
}

template <int NMAX>
__device__ __forceinline__ void read_states(const float* s, int c, float (&out)[NMAX]) {
  const float4* p = reinterpret_cast<const float4*>(s + c * NMAX);
#pragma unroll
  for (int q = 0; q < NMAX / 4; ++q) {
    const float4 v = p[q];
    out[4 * q] = v.x; out[4 * q + 1] = v.y; out[4 * q + 2] = v.z; out[4 * q + 3] = v.w;
  }
}

// Sum each of M values over the 32 lanes of a warp, in a fixed order (deterministic). Recursive
// halving: at each step a lane keeps half of its values and sends the other half to its partner
// `offset` lanes away, so M values cost M - 1 shuffles instead of 5 M. Afterwards v[0] of lane l
// holds the sum of value l / (32 / M). Template recursion keeps every array index a constant.
template <int HALF, int OFFSET, int M>
__device__ __forceinline__ void warp_halving_steps(float (&v)[M], int lane) {
  if constexpr (HALF >= 1) {
    const bool upper = lane & OFFSET;
#pragma unroll
    for (int i = 0; i < HALF; ++i) {
      const float send = upper ? v[i] : v[i + HALF];
      const float keep = upper ? v[i + HALF] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFFSET);
    }
    warp_halving_steps<HALF / 2, OFFSET / 2, M>(v, lane);
  } else {
#pragma unroll
    for (int offset = OFFSET; offset >= 1; offset /= 2) v[0] += __shfl_xor_sync(0xffffffffu, v[0], offset);
  }
}

template <int M>
__device__ __forceinline__ void warp_sum_transposed(float (&v)[M], int lane) {
  static_assert(M >= 2 && M <= 32 && (M & (M - 1)) == 0, "M must be a power of two in 2..32");
  warp_halving_steps<M / 2, 16, M>(v, lane);
}

template <typename T, int NMAX>
__global__ void __launch_bounds__(kMaxWarps * 32)
scan_fwd_kernel(const T* __restrict__ u, const T* __restrict__ delta, const float* __restrict__ A,
                const T* __restrict__ Bs, const T* __restrict__ Cs, const float* __restrict__ Dskip,
                const float* __restrict__ delta_bias, T* __restrict__ y, ScanShape p) {
  constexpr int G = seg_len<NMAX>();
  static_assert(kChunk % G == 0, "step groups must not straddle chunks");
  extern __shared__ float4 smem_f4[];
  float* smem = reinterpret_cast<float*>(smem_f4);
  const int rows = blockDim.x;
  float* s_u = smem;                       // [rows][kRowPad]: u, then y
  float* s_delta = s_u + rows * kRowPad;   // [rows][kRowPad]
  float* s_B = s_delta + rows * kRowPad;   // [kChunk][NMAX]
  float* s_C = s_B + kChunk * NMAX;        // [kChunk][NMAX]

  const int b = blockIdx.x, d0 = blockIdx.y * rows, d = d0 + threadIdx.x;
  const int valid_rows = min(rows, p.dim - d0);
  const bool active = d < p.dim;
  float A2[NMAX];  // A * log2(e): exp(dt A) = 2^(dt A2)
#pragma unroll
  for (int n = 0; n < NMAX; ++n) A2[n] = (active && n < p.nstate) ? A[d * p.nstate + n] * kLog2e : 0.f;
  const float D_d = active ? Dskip[d] : 0.f, bias = active ? delta_bias[d] : 0.f;

  const int64_t rows_off = ((int64_t)b * p.dim + d0) * p.len;  // (b, d0, 0)
  const int64_t bc_off = (int64_t)b * p.nstate * p.len;          // (b, 0, 0)
  float h[NMAX];
#pragma unroll
  for (int n = 0; n < NMAX; ++n) h[n] = 0.f;
  float* my_u = s_u + threadIdx.x * kRowPad;
  const float* my_delta = s_delta + threadIdx.x * kRowPad;

  for (int t0 = 0; t0 < p.len; t0 += kChunk) {
    const int len = min(kChunk, p.len - t0);
    stage_chunk<T, NMAX, 2, 2>({u + rows_off, delta + rows_off}, {s_u, s_delta}, {Bs + bc_off, Cs + bc_off},
                               {s_B, s_C}, valid_rows, p.nstate, p.len, t0, len);
    __syncthreads();
    // Tokens past len read as 0 from shared memory; their y is never stored and h is not used after.
    for (int k0 = 0; k0 < len; k0 += G) {
      float dt[G];
#pragma unroll
      for (int j = 0; j < G; ++j) {
        const float x = my_delta[k0 + j] + bias;
        dt[j] = p.softplus ? softplus(x) : x;
      }
#pragma unroll
      for (int j = 0; j < G; ++j) {
        const int k = k0 + j;
        const float u_k = my_u[k], dtu = dt[j] * u_k;
        float B_k[NMAX], C_k[NMAX];
        read_states<NMAX>(s_B, k, B_k);
        read_states<NMAX>(s_C, k, C_k);
        float y_k = D_d * u_k;
#pragma unroll
        for (int n = 0; n < NMAX; ++n) {
          h[n] = exp2_approx(dt[j] * A2[n]) * h[n] + dtu * B_k[n];
          y_k += C_k[n] * h[n];
        }
        my_u[k] = y_k;  // this thread's own row: no other thread reads it before the barrier
      }
    }
    __syncthreads();
    store_rows(y + rows_off, s_u, valid_rows, p.len, t0, len);
    __syncthreads();  // s_u is overwritten by the next chunk's loads
  }
}

template <typename T, int NMAX>
__global__ void __launch_bounds__(kMaxWarps * 32)
scan_bwd_kernel(const T* __restrict__ u, const T* __restrict__ delta, const float* __restrict__ A,
                const T* __restrict__ Bs, const T* __restrict__ Cs, const float* __restrict__ Dskip,
                const float* __restrict__ delta_bias, const T* __restrict__ dy,
                T* __restrict__ du, T* __restrict__ ddelta,
                float* __restrict__ dBC_part,    // [gridDim.y][b][2 NMAX][l]: dB rows, then dC rows
                float* __restrict__ dADb_part,   // [b][d][NMAX + 2]: dA, dD, ddelta_bias
                float* __restrict__ seg_state,   // [b][d][n_seg][NMAX]: scratch, state entering each segment
                ScanShape p) {
  constexpr int K = seg_len<NMAX>();
  constexpr int M = 2 * NMAX;  // values reduced over channels per token: dB_n, dC_n
  static_assert(kChunk % K == 0, "segments must not straddle chunks");
  extern __shared__ float4 smem_f4[];
  float* smem = reinterpret_cast<float*>(smem_f4);
  const int rows = blockDim.x, warps = rows / 32;
  float* s_u = smem;                       // [rows][kRowPad]: u, then du
  float* s_delta = s_u + rows * kRowPad;   // [rows][kRowPad]: delta, then ddelta
  float* s_dy = s_delta + rows * kRowPad;  // [rows][kRowPad]
  float* s_B = s_dy + rows * kRowPad;      // [kChunk][NMAX]
  float* s_C = s_B + kChunk * NMAX;        // [kChunk][NMAX]
  float* s_red = s_C + kChunk * NMAX;      // [warps][M][kChunk]: per-warp sums of dB, dC

  const int b = blockIdx.x, d0 = blockIdx.y * rows, d = d0 + threadIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int valid_rows = min(rows, p.dim - d0);
  const bool active = d < p.dim;
  float A2[NMAX];
#pragma unroll
  for (int n = 0; n < NMAX; ++n) A2[n] = (active && n < p.nstate) ? A[d * p.nstate + n] * kLog2e : 0.f;
  const float D_d = active ? Dskip[d] : 0.f, bias = active ? delta_bias[d] : 0.f;

  const int64_t rows_off = ((int64_t)b * p.dim + d0) * p.len;
  const int64_t bc_off = (int64_t)b * p.nstate * p.len;
  const int n_seg = (p.len + K - 1) / K;
  float* my_seg_state = seg_state + ((int64_t)b * p.dim + (active ? d : 0)) * n_seg * NMAX;
  float* my_u = s_u + threadIdx.x * kRowPad;
  float* my_delta = s_delta + threadIdx.x * kRowPad;
  const float* my_dy = s_dy + threadIdx.x * kRowPad;

  // Pass 1, forward in time: store the state entering each segment (segment 0's is zero).
  {
    float h[NMAX];
#pragma unroll
    for (int n = 0; n < NMAX; ++n) h[n] = 0.f;
    for (int t0 = 0; t0 < p.len; t0 += kChunk) {
      const int len = min(kChunk, p.len - t0);
      stage_chunk<T, NMAX, 2, 1>({u + rows_off, delta + rows_off}, {s_u, s_delta}, {Bs + bc_off}, {s_B},
                                 valid_rows, p.nstate, p.len, t0, len);
      __syncthreads();
      for (int k0 = 0; k0 < len; k0 += K) {
        if (t0 + k0 > 0 && active) {
          float4* dst = reinterpret_cast<float4*>(my_seg_state + ((t0 + k0) / K) * NMAX);
#pragma unroll
          for (int q = 0; q < NMAX / 4; ++q)
            dst[q] = make_float4(h[4 * q], h[4 * q + 1], h[4 * q + 2], h[4 * q + 3]);
        }
#pragma unroll
        for (int j = 0; j < K; ++j) {  // past len: u = B = 0, and h is not used after this pass
          const int k = k0 + j;
          const float x = my_delta[k] + bias;
          const float dt = p.softplus ? softplus(x) : x;
          const float dtu = dt * my_u[k];
          float B_k[NMAX];
          read_states<NMAX>(s_B, k, B_k);
#pragma unroll
          for (int n = 0; n < NMAX; ++n) h[n] = exp2_approx(dt * A2[n]) * h[n] + dtu * B_k[n];
        }
      }
      __syncthreads();
    }
  }

  // Pass 2, backward in time, chunk by chunk and segment by segment.
  float carry[NMAX];   // a_{t+1} g_{t+1}: the gradient reaching h_t through h_{t+1}
  float dA_acc[NMAX];
#pragma unroll
  for (int n = 0; n < NMAX; ++n) carry[n] = dA_acc[n] = 0.f;
  float dD_acc = 0.f, dbias_acc = 0.f;
  const int n_chunks = (p.len + kChunk - 1) / kChunk;
  for (int chunk = n_chunks - 1; chunk >= 0; --chunk) {
    const int t0 = chunk * kChunk, len = min(kChunk, p.len - t0);
    stage_chunk<T, NMAX, 3, 2>({u + rows_off, delta + rows_off, dy + rows_off}, {s_u, s_delta, s_dy},
                               {Bs + bc_off, Cs + bc_off}, {s_B, s_C}, valid_rows, p.nstate, p.len, t0, len);
    __syncthreads();
    for (int s = (len - 1) / K; s >= 0; --s) {
      const int k0 = s * K, seg = (t0 + k0) / K;
      // Recompute the segment's states: hist[j + 1] = h at token k0 + j, hist[0] = entering state.
      float hist[K + 1][NMAX], dt_j[K];
      if (seg > 0 && active) {
        const float4* src = reinterpret_cast<const float4*>(my_seg_state + seg * NMAX);
#pragma unroll
        for (int q = 0; q < NMAX / 4; ++q) {
          const float4 v = src[q];
          hist[0][4 * q] = v.x; hist[0][4 * q + 1] = v.y; hist[0][4 * q + 2] = v.z; hist[0][4 * q + 3] = v.w;
        }
      } else {
#pragma unroll
        for (int n = 0; n < NMAX; ++n) hist[0][n] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const int k = k0 + j;
        const float x = my_delta[k] + bias;
        const float dt = p.softplus ? softplus(x) : x;
        dt_j[j] = dt;
        const float dtu = dt * my_u[k];
        float B_k[NMAX];
        read_states<NMAX>(s_B, k, B_k);
#pragma unroll
        for (int n = 0; n < NMAX; ++n) hist[j + 1][n] = exp2_approx(dt * A2[n]) * hist[j][n] + dtu * B_k[n];
      }
      // Reverse steps over the segment, branch-free. Tokens past len (only in the sequence's last
      // segment, reached first, while carry is still 0) read u = dy = B = C = 0, so every
      // gradient term and the carry stay 0; what they write to shared memory is never stored.
#pragma unroll
      for (int j = K - 1; j >= 0; --j) {
        const int k = k0 + j;
        const float u_k = my_u[k], dy_k = my_dy[k], dt = dt_j[j];
        const float dtu = dt * u_k;
        float B_k[NMAX], C_k[NMAX], red[M];
        read_states<NMAX>(s_B, k, B_k);
        read_states<NMAX>(s_C, k, C_k);
        float gB = 0.f, gaA2 = 0.f;
#pragma unroll
        for (int n = 0; n < NMAX; ++n) {
          const float g = carry[n] + dy_k * C_k[n];   // dLoss/dh_t
          const float a = exp2_approx(dt * A2[n]);
          const float gha = g * hist[j][n] * a;       // dLoss/da_t * a_t
          dA_acc[n] += gha * dt;
          gaA2 += gha * A2[n];
          gB += g * B_k[n];
          red[n] = g * dtu;                           // dB_t,n
          red[NMAX + n] = dy_k * hist[j + 1][n];      // dC_t,n
          carry[n] = a * g;
        }
        const float ddt = u_k * gB + gaA2 * kLn2;
        const float dd = p.softplus ? ddt * sigmoid(my_delta[k] + bias) : ddt;  // softplus' = sigmoid
        dD_acc += dy_k * u_k;
        dbias_acc += dd;
        my_u[k] = dt * gB + D_d * dy_k;  // du
        my_delta[k] = dd;                // ddelta
        warp_sum_transposed<M>(red, lane);
        if (lane % (32 / M) == 0) s_red[(warp * M + lane / (32 / M)) * kChunk + k] = red[0];
      }
    }
    __syncthreads();
    store_rows(du + rows_off, s_u, valid_rows, p.len, t0, len);
    store_rows(ddelta + rows_off, s_delta, valid_rows, p.len, t0, len);
    float* part = dBC_part + ((int64_t)blockIdx.y * p.batch + b) * M * p.len;
    for (int i = threadIdx.x; i < M * kChunk; i += rows) {
      const int m = i / kChunk, c = i % kChunk;
      if (c < len) {
        float sum = 0.f;
        for (int w = 0; w < warps; ++w) sum += s_red[(w * M + m) * kChunk + c];  // fixed order
        part[(int64_t)m * p.len + t0 + c] = sum;
      }
    }
    __syncthreads();  // shared tiles are overwritten by the next chunk's loads
  }
  if (active) {
    float* out = dADb_part + ((int64_t)b * p.dim + d) * (NMAX + 2);
#pragma unroll
    for (int n = 0; n < NMAX; ++n) out[n] = dA_acc[n];
    out[NMAX] = dD_acc;
    out[NMAX + 1] = dbias_acc;
  }
}

// Channels per block: whole warps, at most kMaxWarps, spread evenly over the fewest blocks.
dim3 block_grid(int batch, int dim, int* threads) {
  const int warps_total = std::max(1, (dim + 31) / 32);
  const int n_blocks = (warps_total + kMaxWarps - 1) / kMaxWarps;
  const int warps = (warps_total + n_blocks - 1) / n_blocks;
  *threads = warps * 32;
  return dim3(batch, n_blocks);
}

size_t fwd_smem(int threads, int nmax) { return sizeof(float) * (2 * threads * kRowPad + 2 * kChunk * nmax); }
size_t bwd_smem(int threads, int nmax) {
  return sizeof(float) * (3 * threads * kRowPad + 2 * kChunk * nmax + (threads / 32) * 2 * nmax * kChunk);
}

template <typename T, int NMAX>
int launch_fwd(const ScanShape& p, const void* u, const void* delta, const float* A, const void* B, const void* C,
               const float* D, const float* delta_bias, void* y, cudaStream_t stream) {
  int threads;
  const dim3 grid = block_grid(p.batch, p.dim, &threads);
  const size_t smem = fwd_smem(threads, NMAX);
  auto kernel = scan_fwd_kernel<T, NMAX>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem, stream>>>(static_cast<const T*>(u), static_cast<const T*>(delta), A,
                                          static_cast<const T*>(B), static_cast<const T*>(C), D, delta_bias,
                                          static_cast<T*>(y), p);
  return cudaGetLastError();
}

template <typename T, int NMAX>
int launch_bwd(const ScanShape& p, const void* u, const void* delta, const float* A, const void* B, const void* C,
               const float* D, const float* delta_bias, const void* dy, void* du, void* ddelta, float* dBC_part,
               float* dADb_part, float* seg_state, cudaStream_t stream) {
  int threads;
  const dim3 grid = block_grid(p.batch, p.dim, &threads);
  const size_t smem = bwd_smem(threads, NMAX);
  auto kernel = scan_bwd_kernel<T, NMAX>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem, stream>>>(
      static_cast<const T*>(u), static_cast<const T*>(delta), A, static_cast<const T*>(B),
      static_cast<const T*>(C), D, delta_bias, static_cast<const T*>(dy), static_cast<T*>(du),
      static_cast<T*>(ddelta), dBC_part, dADb_part, seg_state, p);
  return cudaGetLastError();
}

// Calls f(T{}, NMAX tag) for the dtype code (0 float32, 1 float16, 2 bfloat16) and the state
// count: 3 dtypes x 2 state sizes per kernel. Returns -1 for an unknown dtype.
template <typename F>
int dispatch(int dtype, int nstate, F&& f) {
  auto by_n = [&](auto t_tag) {
    return nstate <= 8 ? f(t_tag, std::integral_constant<int, 8>{}) : f(t_tag, std::integral_constant<int, 16>{});
  };
  switch (dtype) {
    case 0: return by_n(float{});
    case 1: return by_n(__half{});
    case 2: return by_n(__nv_bfloat16{});
    default: return -1;
  }
}

bool valid_shape(const ScanShape& p) {
  return p.batch >= 1 && p.batch <= 2147483647 && p.dim >= 1 && p.dim <= 65535 * kMaxWarps * 32 && p.len >= 1 &&
         p.nstate >= 1 && p.nstate <= 16;
}

}  // namespace

// The C interface scan.py calls through ctypes. Tensors are contiguous and on the current device:
// u, delta, dy, y, du, ddelta (b, d, l) and B, C (b, n, l) in the dtype given by the code,
// A (d, n), D, delta_bias (d,) float32; buffers as in scan_bwd_kernel. Returns 0 or a CUDA error
// code (-1: bad arguments). Nothing here synchronises with the host.
extern "C" {

int mv_scan_channel_blocks(int dim) {
  int threads;
  return (int)block_grid(1, dim, &threads).y;
}

int mv_scan_seg_len(int nstate) { return nstate <= 8 ? seg_len<8>() : seg_len<16>(); }

int mv_scan_state_max(int nstate) { return nstate <= 8 ? 8 : 16; }

const char* mv_scan_error_string(int code) {
  return code == -1 ? "invalid arguments (dtype code or shape)" : cudaGetErrorString(static_cast<cudaError_t>(code));
}

int mv_scan_fwd(int dtype, int batch, int dim, int len, int nstate, int softplus, const void* u, const void* delta,
                const float* A, const void* B, const void* C, const float* D, const float* delta_bias, void* y,
                void* stream) {
  const ScanShape p{batch, dim, len, nstate, softplus != 0};
  if (!valid_shape(p)) return -1;
  return dispatch(dtype, nstate, [&](auto t_tag, auto n_tag) {
    return launch_fwd<decltype(t_tag), decltype(n_tag)::value>(p, u, delta, A, B, C, D, delta_bias, y,
                                                                 static_cast<cudaStream_t>(stream));
  });
}

int mv_scan_bwd(int dtype, int batch, int dim, int len, int nstate, int softplus, const void* u, const void* delta,
                const float* A, const void* B, const void* C, const float* D, const float* delta_bias, const void* dy,
                void* du, void* ddelta, float* dBC_part, float* dADb_part, float* seg_state, void* stream) {
  const ScanShape p{batch, dim, len, nstate, softplus != 0};
  if (!valid_shape(p)) return -1;
  return dispatch(dtype, nstate, [&](auto t_tag, auto n_tag) {
    return launch_bwd<decltype(t_tag), decltype(n_tag)::value>(p, u, delta, A, B, C, D, delta_bias, dy, du, ddelta,
                                                                 dBC_part, dADb_part, seg_state,
                                                                 static_cast<cudaStream_t>(stream));
  });
}

}  // extern "C"

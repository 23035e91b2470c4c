// Selective scan (Mamba's S6 recurrence) for MambaVision: forward and backward CUDA kernels.
//
// Math and names as in scan.py: for batch b, channel d, state n, token t, with h_{-1} = 0,
//     dt_t  = softplus(delta_t + delta_bias_d)
//     h_t,n = exp(dt_t * A_d,n) * h_{t-1},n + dt_t * B_t,n * u_t
//     y_t   = sum_n C_t,n * h_t,n + D_d * u_t
// u, delta, y: (b, d, l); B, C: (b, n, l), shared by all d channels; A: (d, n); D, delta_bias: (d,).
//
// Layout of the work. The scan is short along l (49..1024 in MambaVision) and wide along b x d.
// Each (b, d) row is owned by kSplit = 4 neighbouring lanes of a warp, each keeping NMAX / 4 of
// the states in registers (sums over states, such as y, take two shuffles). One thread per row
// would give too few warps to hide latency (T stage 3 has 20,480 rows: 1.25 warps per scheduler;
// measured 5.4 cycles per instruction). A block owns one batch row b and up to 64 channels; it
// stages kChunk tokens of u, delta (and dy) for its channels in shared memory with coalesced
// loads, turning delta into dt = softplus(delta + delta_bias) once per element on the way, and B,
// C (shared by all channels) once for the block. States beyond the real n (when n < NMAX) have
// A = B = C = 0 and stay zero. Tokens are processed in unrolled, branch-free groups of kGroup.
//
// Backward, per row, with g_t = dLoss/dh_t and a_t = exp(dt_t * A) (all per state n):
//     g_t       = a_{t+1} g_{t+1} + dy_t C_t                (reverse-time recurrence)
//     dC_t     += dy_t h_t                     (summed over channels)
//     dB_t     += g_t dt_t u_t                 (summed over channels)
//     du_t      = dt_t sum_n g_t B_t + D dy_t
//     d(dt_t)   = u_t sum_n g_t B_t + sum_n g_t h_{t-1} a_t A
//     dA       += g_t h_{t-1} a_t dt_t         (summed over batch and tokens)
//     ddelta_t  = d(dt_t) sigmoid(delta_t + delta_bias)     (softplus' derivative)
// The reverse pass needs h_{t-1}. Dividing by a_t is unstable, so the backward kernel first runs
// the recurrence forward and stores the state entering every segment of kGroup tokens (a scratch
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

constexpr int kChunk = 32;           // tokens staged in shared memory per pass (one per lane)
constexpr int kRowPad = kChunk + 1;  // padded row stride in shared memory: no bank conflicts
constexpr int kSplit = 4;            // lanes per (b, d) row, each with NMAX / kSplit states
constexpr int kMaxWarps = 8;         // at most 256 threads = 64 channels per block
constexpr int kGroup = 8;            // tokens per unrolled step group, also the backward's segment
constexpr int kRowsPerThread = kChunk / kSplit;  // staged rows per thread and tensor
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
static_assert(kChunk % kGroup == 0, "step groups must not straddle chunks");

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

// Sum x over the kSplit lanes that own one row; every one of them gets the same bits.
__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
  for (int offset = 1; offset < kSplit; offset *= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Per-thread staging context: the rows this thread loads (r = warp + j * warps) and their bias.
struct Stager {
  int lane, warp, warps, valid_rows, nstate, row_len;
  float bias[kRowsPerThread];
  __device__ Stager(const float* __restrict__ delta_bias, int d0, int valid_rows_, int nstate_, int row_len_)
      : lane(threadIdx.x % 32), warp(threadIdx.x / 32), warps(blockDim.x / 32), valid_rows(valid_rows_),
        nstate(nstate_), row_len(row_len_) {
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int r = warp + j * warps;
      bias[j] = r < valid_rows ? delta_bias[d0 + r] : 0.f;
    }
  }

  // Stage tokens [t0, t0 + len) in shared memory as float: R - 1 plain row tensors (b, d, l) of the
  // block's channels (rows[0] = u, rows[2] = dy), delta turned into dt = softplus(delta + bias)
  // (and, if s_sig, sigmoid(delta + bias), softplus' derivative), and S state tensors (b, n, l)
  // transposed to [token][NMAX] so that a lane reads its states of one token with one vector load.
  // Rows past the channel count, states past nstate and tokens past len read as 0 (their dt is
  // finite). Every global load of the chunk is issued before the first shared-memory store.
  template <typename T, int NMAX, int R, int S>
  __device__ __forceinline__ void stage(const T* const (&row_src)[R], float* const (&row_dst)[R], float* s_sig,
                                        bool softplus_on, const T* const (&state_src)[S],
                                        float* const (&state_dst)[S], int t0, int len) const {
    const bool in_len = lane < len;
    float rv[R][kRowsPerThread], sv[S][NMAX];
#pragma unroll
    for (int a = 0; a < R; ++a)
#pragma unroll
      for (int j = 0; j < kRowsPerThread; ++j) {
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
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int at = (warp + j * warps) * kRowPad + lane;
      const float x = rv[1][j] + bias[j];
      rv[1][j] = softplus_on ? softplus(x) : x;
      if (s_sig != nullptr) s_sig[at] = softplus_on ? sigmoid(x) : 1.f;
#pragma unroll
      for (int a = 0; a < R; ++a) row_dst[a][at] = rv[a][j];
    }
#pragma unroll
    for (int a = 0; a < S; ++a)
#pragma unroll
      for (int q = 0; q < NMAX; ++q) {
        const int n = warp + q * warps;
        if (n < NMAX) state_dst[a][lane * NMAX + n] = sv[a][q];
      }
  }

  template <typename T>
  __device__ __forceinline__ void store(T* __restrict__ dst, const float* s, int t0, int len) const {
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int r = warp + j * warps;
      if (r < valid_rows && lane < len) dst[(int64_t)r * row_len + t0 + lane] = from_float<T>(s[r * kRowPad + lane]);
    }
  }
};

// This lane's NT states of token c from a staged [token][NMAX] tile (one 8- or 16-byte load).
template <int NMAX, int NT>
__device__ __forceinline__ void read_states(const float* s, int c, int part, float (&out)[NT]) {
  const float* p = s + c * NMAX + part * NT;
  if constexpr (NT == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    out[0] = v.x; out[1] = v.y;
  } else {
    static_assert(NT == 4, "NT must be 2 or 4");
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
  }
}

// Sum each of M values over the lanes of a warp that share `lane % kSplit` (the warp's channels),
// in a fixed order (deterministic). Recursive halving: at each step a lane keeps half of its values
// and sends the other half to its partner `OFFSET` lanes away; once one value is left, plain
// butterflies finish. Afterwards v[0] holds value (lane >> (5 - log2 M)) % M of this lane's part.
// Template recursion keeps every array index a compile-time constant.
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
    for (int offset = OFFSET; offset >= kSplit; offset /= 2) v[0] += __shfl_xor_sync(0xffffffffu, v[0], offset);
  }
}

template <int M>
__device__ __forceinline__ void warp_sum_over_channels(float (&v)[M], int lane) {
  static_assert(M >= 2 && M <= 32 / kSplit && (M & (M - 1)) == 0, "M must be a power of two <= 32 / kSplit");
  warp_halving_steps<M / 2, 16, M>(v, lane);
}

template <typename T, int NMAX>
__global__ void __launch_bounds__(kMaxWarps * 32, NMAX <= 8 ? 3 : 2)
scan_fwd_kernel(const T* __restrict__ u, const T* __restrict__ delta, const float* __restrict__ A,
                const T* __restrict__ Bs, const T* __restrict__ Cs, const float* __restrict__ Dskip,
                const float* __restrict__ delta_bias, T* __restrict__ y, ScanShape p) {
  constexpr int NT = NMAX / kSplit;
  extern __shared__ float4 smem_f4[];
  float* smem = reinterpret_cast<float*>(smem_f4);
  const int rows = blockDim.x / kSplit;    // channels of this block
  float* s_u = smem;                       // [rows][kRowPad]: u, then y
  float* s_dt = s_u + rows * kRowPad;      // [rows][kRowPad]: dt
  float* s_B = s_dt + rows * kRowPad;      // [kChunk][NMAX]
  float* s_C = s_B + kChunk * NMAX;        // [kChunk][NMAX]

  const int b = blockIdx.x, d0 = blockIdx.y * rows, row = threadIdx.x / kSplit, part = threadIdx.x % kSplit;
  const int d = d0 + row, valid_rows = min(rows, p.dim - d0);
  const bool active = d < p.dim;
  const Stager st(delta_bias, d0, valid_rows, p.nstate, p.len);
  float A2[NT];  // this lane's states n = part * NT + i: A * log2(e), so exp(dt A) = 2^(dt A2)
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const int n = part * NT + i;
    A2[i] = (active && n < p.nstate) ? A[d * p.nstate + n] * kLog2e : 0.f;
  }
  const float D_d = active ? Dskip[d] : 0.f;

  const int64_t rows_off = ((int64_t)b * p.dim + d0) * p.len;  // (b, d0, 0)
  const int64_t bc_off = (int64_t)b * p.nstate * p.len;          // (b, 0, 0)
  float h[NT];
#pragma unroll
  for (int i = 0; i < NT; ++i) h[i] = 0.f;
  float* my_u = s_u + row * kRowPad;
  const float* my_dt = s_dt + row * kRowPad;

  for (int t0 = 0; t0 < p.len; t0 += kChunk) {
    const int len = min(kChunk, p.len - t0);
    st.stage<T, NMAX, 2, 2>({u + rows_off, delta + rows_off}, {s_u, s_dt}, nullptr, p.softplus,
                            {Bs + bc_off, Cs + bc_off}, {s_B, s_C}, t0, len);
    __syncthreads();
    // Tokens past len read as 0; their y is never stored and h is not used after the last chunk.
    for (int k0 = 0; k0 < len; k0 += kGroup) {
      float y_j[kGroup];
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        const int k = k0 + j;
        const float u_k = my_u[k], dt = my_dt[k], dtu = dt * u_k;
        float B_k[NT], C_k[NT];
        read_states<NMAX, NT>(s_B, k, part, B_k);
        read_states<NMAX, NT>(s_C, k, part, C_k);
        float y_part = 0.f;
#pragma unroll
        for (int i = 0; i < NT; ++i) {
          h[i] = exp2_approx(dt * A2[i]) * h[i] + dtu * B_k[i];
          y_part += C_k[i] * h[i];
        }
        y_j[j] = row_sum(y_part) + D_d * u_k;
      }
      __syncwarp();  // the row's other lanes have read u of these tokens
      if (part == 0) {
#pragma unroll
        for (int j = 0; j < kGroup; ++j) my_u[k0 + j] = y_j[j];
      }
    }
    __syncthreads();
    st.store(y + rows_off, s_u, t0, len);
    __syncthreads();  // s_u is overwritten by the next chunk's loads
  }
}

template <typename T, int NMAX>
__global__ void __launch_bounds__(kMaxWarps * 32, NMAX <= 8 ? 3 : 2)
scan_bwd_kernel(const T* __restrict__ u, const T* __restrict__ delta, const float* __restrict__ A,
                const T* __restrict__ Bs, const T* __restrict__ Cs, const float* __restrict__ Dskip,
                const float* __restrict__ delta_bias, const T* __restrict__ dy,
                T* __restrict__ du, T* __restrict__ ddelta,
                float* __restrict__ dBC_part,    // [gridDim.y][b][2 NMAX][l]: dB rows, then dC rows
                float* __restrict__ dADb_part,   // [b][d][NMAX + 2]: dA, dD, ddelta_bias
                float* __restrict__ seg_state,   // [b][d][n_seg][NMAX]: scratch, state entering each segment
                ScanShape p) {
  constexpr int NT = NMAX / kSplit, K = kGroup;
  constexpr int M = 2 * NT;  // values per lane and token summed over channels: dB, dC of its states
  extern __shared__ float4 smem_f4[];
  float* smem = reinterpret_cast<float*>(smem_f4);
  const int rows = blockDim.x / kSplit, warps = blockDim.x / 32;
  float* s_u = smem;                       // [rows][kRowPad]: u, then du
  float* s_dt = s_u + rows * kRowPad;      // [rows][kRowPad]: dt, then ddelta
  float* s_dy = s_dt + rows * kRowPad;     // [rows][kRowPad]
  float* s_sig = s_dy + rows * kRowPad;    // [rows][kRowPad]: sigmoid(delta + delta_bias)
  float* s_B = s_sig + rows * kRowPad;     // [kChunk][NMAX]
  float* s_C = s_B + kChunk * NMAX;        // [kChunk][NMAX]
  float* s_red = s_C + kChunk * NMAX;      // [warps][2 NMAX][kChunk]: per-warp sums of dB, dC

  const int b = blockIdx.x, d0 = blockIdx.y * rows, row = threadIdx.x / kSplit, part = threadIdx.x % kSplit;
  const int d = d0 + row, valid_rows = min(rows, p.dim - d0);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const bool active = d < p.dim;
  const Stager st(delta_bias, d0, valid_rows, p.nstate, p.len);
  float A2[NT];
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const int n = part * NT + i;
    A2[i] = (active && n < p.nstate) ? A[d * p.nstate + n] * kLog2e : 0.f;
  }
  const float D_d = active ? Dskip[d] : 0.f;

  const int64_t rows_off = ((int64_t)b * p.dim + d0) * p.len;
  const int64_t bc_off = (int64_t)b * p.nstate * p.len;
  const int n_seg = (p.len + K - 1) / K;
  float* my_seg_state = seg_state + ((int64_t)b * p.dim + (active ? d : 0)) * n_seg * NMAX + part * NT;
  float* my_u = s_u + row * kRowPad;
  float* my_dt = s_dt + row * kRowPad;
  const float* my_dy = s_dy + row * kRowPad;
  const float* my_sig = s_sig + row * kRowPad;

  // Pass 1, forward in time: store the state entering each segment (segment 0's is zero).
  {
    float h[NT];
#pragma unroll
    for (int i = 0; i < NT; ++i) h[i] = 0.f;
    for (int t0 = 0; t0 < p.len; t0 += kChunk) {
      const int len = min(kChunk, p.len - t0);
      st.stage<T, NMAX, 2, 1>({u + rows_off, delta + rows_off}, {s_u, s_dt}, nullptr, p.softplus, {Bs + bc_off},
                              {s_B}, t0, len);
      __syncthreads();
      for (int k0 = 0; k0 < len; k0 += K) {
        if (t0 + k0 > 0 && active) {
#pragma unroll
          for (int i = 0; i < NT; ++i) my_seg_state[((t0 + k0) / K) * NMAX + i] = h[i];
        }
#pragma unroll
        for (int j = 0; j < K; ++j) {  // past len: u = B = 0, and h is not used after this pass
          const int k = k0 + j;
          const float dt = my_dt[k], dtu = dt * my_u[k];
          float B_k[NT];
          read_states<NMAX, NT>(s_B, k, part, B_k);
#pragma unroll
          for (int i = 0; i < NT; ++i) h[i] = exp2_approx(dt * A2[i]) * h[i] + dtu * B_k[i];
        }
      }
      __syncthreads();
    }
  }

  // Pass 2, backward in time, chunk by chunk and segment by segment.
  float carry[NT];   // a_{t+1} g_{t+1}: the gradient reaching h_t through h_{t+1}
  float dA_acc[NT];
#pragma unroll
  for (int i = 0; i < NT; ++i) carry[i] = dA_acc[i] = 0.f;
  float dD_acc = 0.f, dbias_acc = 0.f;
  const int n_chunks = (p.len + kChunk - 1) / kChunk;
  for (int chunk = n_chunks - 1; chunk >= 0; --chunk) {
    const int t0 = chunk * kChunk, len = min(kChunk, p.len - t0);
    st.stage<T, NMAX, 3, 2>({u + rows_off, delta + rows_off, dy + rows_off}, {s_u, s_dt, s_dy}, s_sig, p.softplus,
                            {Bs + bc_off, Cs + bc_off}, {s_B, s_C}, t0, len);
    __syncthreads();
    for (int s = (len - 1) / K; s >= 0; --s) {
      const int k0 = s * K, seg = (t0 + k0) / K;
      // Recompute the segment's states: hist[j + 1] = h at token k0 + j, hist[0] = entering state.
      float hist[K + 1][NT];
#pragma unroll
      for (int i = 0; i < NT; ++i) hist[0][i] = (seg > 0 && active) ? my_seg_state[seg * NMAX + i] : 0.f;
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const int k = k0 + j;
        const float dt = my_dt[k], dtu = dt * my_u[k];
        float B_k[NT];
        read_states<NMAX, NT>(s_B, k, part, B_k);
#pragma unroll
        for (int i = 0; i < NT; ++i) hist[j + 1][i] = exp2_approx(dt * A2[i]) * hist[j][i] + dtu * B_k[i];
      }
      // Reverse steps over the segment, branch-free. Tokens past len (only in the sequence's last
      // segment, reached first, while carry is still 0) read u = dy = B = C = 0, so every
      // gradient term and the carry stay 0; their du, ddelta are never stored.
      float du_j[K], dd_j[K];
#pragma unroll
      for (int j = K - 1; j >= 0; --j) {
        const int k = k0 + j;
        const float u_k = my_u[k], dy_k = my_dy[k], dt = my_dt[k], dtu = dt * u_k;
        float B_k[NT], C_k[NT], red[M];
        read_states<NMAX, NT>(s_B, k, part, B_k);
        read_states<NMAX, NT>(s_C, k, part, C_k);
        float gB = 0.f, gaA2 = 0.f;
#pragma unroll
        for (int i = 0; i < NT; ++i) {
          const float g = carry[i] + dy_k * C_k[i];   // dLoss/dh_t
          const float a = exp2_approx(dt * A2[i]);
          const float gha = g * hist[j][i] * a;       // dLoss/da_t * a_t
          dA_acc[i] += gha * dt;
          gaA2 += gha * A2[i];
          gB += g * B_k[i];
          red[i] = g * dtu;                           // dB_t of state part * NT + i
          red[NT + i] = dy_k * hist[j + 1][i];        // dC_t of state part * NT + i
          carry[i] = a * g;
        }
        gB = row_sum(gB);
        const float ddt = u_k * gB + row_sum(gaA2) * kLn2;
        const float dd = ddt * my_sig[k];             // softplus' = sigmoid (1 without softplus)
        dD_acc += dy_k * u_k;
        dbias_acc += dd;
        du_j[j] = dt * gB + D_d * dy_k;
        dd_j[j] = dd;
        warp_sum_over_channels<M>(red, lane);
        constexpr int kLog2M = M == 2 ? 1 : (M == 4 ? 2 : 3);
        const int idx = (lane >> (5 - kLog2M)) % M;  // which of this part's values lane holds
        if (((lane >> 2) & (32 / kSplit / M - 1)) == 0) {
          const int n = part * NT + idx % NT, m = (idx / NT) * NMAX + n;
          s_red[(warp * 2 * NMAX + m) * kChunk + k] = red[0];
        }
      }
      __syncwarp();  // the row's other lanes have read u, dt of this segment
      if (part == 0) {
#pragma unroll
        for (int j = 0; j < K; ++j) {
          my_u[k0 + j] = du_j[j];
          my_dt[k0 + j] = dd_j[j];
        }
      }
    }
    __syncthreads();
    st.store(du + rows_off, s_u, t0, len);
    st.store(ddelta + rows_off, s_dt, t0, len);
    float* out = dBC_part + ((int64_t)blockIdx.y * p.batch + b) * 2 * NMAX * p.len;
    for (int i = threadIdx.x; i < 2 * NMAX * kChunk; i += blockDim.x) {
      const int m = i / kChunk, c = i % kChunk;
      if (c < len) {
        float sum = 0.f;
        for (int w = 0; w < warps; ++w) sum += s_red[(w * 2 * NMAX + m) * kChunk + c];  // fixed order
        out[(int64_t)m * p.len + t0 + c] = sum;
      }
    }
    __syncthreads();  // shared tiles are overwritten by the next chunk's loads
  }
  if (active) {
    float* out = dADb_part + ((int64_t)b * p.dim + d) * (NMAX + 2);
#pragma unroll
    for (int i = 0; i < NT; ++i) out[part * NT + i] = dA_acc[i];
    if (part == 0) {
      out[NMAX] = dD_acc;
      out[NMAX + 1] = dbias_acc;
    }
  }
}

// Channels per block: whole warps (32 / kSplit channels each), at most kMaxWarps, spread evenly
// over the fewest blocks.
dim3 block_grid(int batch, int dim, int* threads) {
  const int warps_total = std::max(1, (dim * kSplit + 31) / 32);
  const int n_blocks = (warps_total + kMaxWarps - 1) / kMaxWarps;
  const int warps = (warps_total + n_blocks - 1) / n_blocks;
  *threads = warps * 32;
  return dim3(batch, n_blocks);
}

size_t fwd_smem(int threads, int nmax) { return sizeof(float) * (2 * (threads / kSplit) * kRowPad + 2 * kChunk * nmax); }
size_t bwd_smem(int threads, int nmax) {
  return sizeof(float) * (4 * (threads / kSplit) * kRowPad + 2 * kChunk * nmax + (threads / 32) * 2 * nmax * kChunk);
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
  return p.batch >= 1 && p.batch <= 2147483647 && p.dim >= 1 && p.dim <= 65535 * kMaxWarps * 32 / kSplit && p.len >= 1 &&
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

int mv_scan_seg_len(int) { return kGroup; }

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

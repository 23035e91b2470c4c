// Selective scan (Mamba's S6 recurrence) for MambaVision: forward and backward CUDA kernels.
//
// Math and names as in scan.py: for batch b, channel d, state n, token t, with h_{-1} = 0,
//     dt_t  = softplus(delta_t + delta_bias_d)
//     h_t,n = exp(dt_t * A_d,n) * h_{t-1},n + dt_t * B_t,n * u_t
//     y_t   = sum_n C_t,n * h_t,n + D_d * u_t
// u, delta, y: (b, d, l); B, C: (b, n, l), shared by all d channels; A: (d, n); D, delta_bias: (d,).
//
// Layout of the work. The scan is short along l (49..1024 in MambaVision) and wide along b x d.
// Each (b, d) row is owned by kSplit = 4 neighbouring lanes of a warp, each keeping NT = NMAX / 4
// of the states in registers (one instance of each kernel: kWideSplit = 2 lanes of 4 states). A
// block owns one batch row b and 16..64 channels (4..8 warps; 2 lanes: 32..128). It stages kChunk =
// 32 tokens at a time in shared memory: every thread loads one token of 8 rows (2 lanes: 16) per
// tensor (coalesced, all loads in flight before the first use, 32-bit offsets, rows past the
// channel count and tokens past l clamped to a valid address, zeroed by a select where it
// matters, no predicated address arithmetic), turns delta into dt = softplus(delta + delta_bias)
// once per element, and writes one 16-byte record per (row, token), so that each lane reads
// everything it needs of a token with one vector load:
//     forward  x = (dt, dt u, D u, 0)       backward  x = (u, dt, dy, sigmoid(delta + delta_bias))
// The loads are issued early: the forward loads chunk c + 1 into registers before chunk c's token
// loop, the backward loads chunk c before it writes out chunk c + 1's results; the loaded values
// stay raw (no conversion, no select) until the staging that uses them, since an instruction that
// reads a loaded register waits for the load. B and C (shared by all channels) are staged once per
// block, transposed to [token][NMAX]. States beyond the real n (when n < NMAX) have A = B = C = 0
// and stay zero. Tokens are processed in unrolled, branch-free segments of K tokens (K = 8 for
// NMAX 8, 4 for NMAX 16).
//
// Sums over a row's states leave the token loops: once the lanes of a row have read a token's
// record, each writes its partial result over one field of it (forward: its share of y; backward:
// its pair's shares of du and ddelta), and the phase that writes the chunk's outputs adds them.
// For n <= 8 both kernels fit 64 registers, so that 4 blocks of 8 warps share an SM. Where the
// grid fits one wave at 3 blocks per SM (T stage 3), both run an 80-register instance; where it
// does not but the 2-lane grid fits one wave at 2 blocks per SM (B stage 3), both run their 2-lane
// instance (128 registers). Lanes write their per-token results in groups of tokens
// (forward 4, backward 2 at 80 and 128 registers, 1 at 64), after the group's reads, so that the
// group's steps (shared-memory loads, exp2, shuffle chains) overlap.
//
// Forward (scan_fwd_kernel): one pass. When gradients will be needed (scan.py's training op), it
// also writes the state entering every segment, seg_state[b][d][seg][NMAX] (float32: 4 bytes per
// token and channel for n <= 8, 16 for n <= 16), so that the backward needs no forward pass of
// its own; inference passes seg_state = nullptr and pays nothing.
//
// Backward (scan_bwd_kernel), per row, with g_t = dLoss/dh_t and a_t = exp(dt_t * A) (per state n):
//     g_t       = a_{t+1} g_{t+1} + dy_t C_t                (reverse-time recurrence)
//     dC_t     += dy_t h_t                     (summed over channels)
//     dB_t     += g_t dt_t u_t                 (summed over channels)
//     du_t      = dt_t sum_n g_t B_t + D dy_t
//     d(dt_t)   = u_t sum_n g_t B_t + sum_n g_t h_{t-1} a_t A
//     dA       += g_t h_{t-1} a_t dt_t         (summed over batch and tokens)
//     ddelta_t  = d(dt_t) sigmoid(delta_t + delta_bias)     (softplus' derivative)
// It walks chunks and segments last to first. For each segment it reloads the entering state that
// the forward saved (prefetched two segments ahead), recomputes the segment's K states and decays
// a_t into registers (dividing by a_t instead would be unstable), then runs the reverse steps over
// them. The two sums over states of a reverse step (sum_n g B and d(dt)) take one shuffle, over a
// pair of lanes; the output phase adds the two pairs' shares.
// Reductions are deterministic: dB, dC are summed over a block's channels by fixed-order warp
// shuffles and shared memory, then written as per-block partials; dA, dD, ddelta_bias are written
// per (b, d); a second small kernel (scan_bwd_finish_kernel) sums the partials in a fixed order
// (a block of 256 threads per 32 dA, dD, ddelta_bias elements, run first; then 4 consecutive dB or
// dC elements per thread where n l is a multiple of 4 (vector loads and stores), else 1) and writes
// the final gradients (dB, dC in the inputs' dtype). No atomics.
//
// The file includes no PyTorch header, so that it builds in seconds: scan.py allocates every
// buffer with torch and passes raw pointers and the current stream through ctypes to the
// extern "C" launchers at the end.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace {

constexpr int kChunk = 32;           // tokens staged in shared memory per pass (one per lane)
constexpr int kRowPad = kChunk + 1;  // padded row stride of the staged tiles: no bank conflicts
constexpr int kRedPad = kChunk + 4;  // row stride of the dB, dC sums: a warp's rows start 4 banks apart
constexpr int kSplit = 4;            // lanes per (b, d) row, each with NMAX / kSplit states
constexpr int kWideSplit = 2;        // the other layout (n <= 8, B stage 3): 2 lanes per row, 4 states each
constexpr int kMinWarps = 4;         // 4..8 warps per block
constexpr int kMaxWarps = 8;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int NMAX>  // loads per thread and state tensor that cover NMAX states with >= kMinWarps warps
constexpr int kStateLoads = (NMAX + kMinWarps - 1) / kMinWarps;

template <int NMAX>  // row pitch of the staged B, C tiles [kChunk][NMAX]: 4-way bank conflicts at staging, not 8
constexpr int kStatePitch = NMAX + 4;

template <int NMAX>  // tokens per segment: the backward keeps 2 K NT floats of a segment per lane
constexpr int kSegLen = NMAX <= 8 ? 8 : 4;

__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float log2_approx(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// PyTorch's softplus (beta 1, threshold 20) and its derivative sigmoid, branch-free from one fast
// exp: with e = exp(x), w = 1 + e, log(w) e / (w - 1) is log1p(e) to full float accuracy
// (Goldberg's trick), also for tiny e (where w == 1 and the quotient would be 0 / 0).
struct Softplus {
  float value, slope;  // softplus(x), sigmoid(x)
  __device__ __forceinline__ explicit Softplus(float x) {
    const float e = exp2_approx(x * kLog2e), w = 1.f + e;
    const float log1p_e = (log2_approx(w) * kLn2) * (e * rcp_approx(w - 1.f));
    value = x > 20.f ? x : (w == 1.f ? e : log1p_e);
    slope = x > 20.f ? 1.f : e * rcp_approx(w);
  }
};

// Element conversions (PyTorch's build flags turn off the implicit __half / __nv_bfloat16 ones).
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// p, hidden from the optimiser: an address base + offset then stays one IMAD.WIDE.U32 instead of
// being reassociated into 64-bit arithmetic on the offset.
template <typename P>
__device__ __forceinline__ P* opaque(P* p) {
  asm("" : "+l"(p));
  return p;
}

struct ScanShape {
  int batch, dim, len, nstate;  // b, d, l, n
  bool softplus;
};

// Sums of two values over a pair of lanes (parts 2 i, 2 i + 1) with one shuffle: afterwards the
// even part holds the pair's sum of p, the odd part the pair's sum of q.
__device__ __forceinline__ float pair_sum(float p, float q, int part) {
  const bool odd = part & 1;
  return (odd ? q : p) + __shfl_xor_sync(0xffffffffu, odd ? p : q, 1);
}

// The block's view of one batch row: the rows (channels d0 + r) this thread stages, and how. With
// KS lanes per row a warp owns kRows = 32 / KS rows, and a thread stages rows warp + j * warps,
// j < kRows; the real ones (d0 + r < dim) are a prefix j < nvalid.
// Loads past the channel count or past l read a clamped, valid address instead (row 0 of this
// thread, or token l - 1), so that no address needs a predicate; where the value matters, a select
// zeroes it. Offsets are unsigned 32-bit (one IMAD.WIDE.U32 per address).
template <int KS>
struct Tile {
  static constexpr int kRows = 32 / KS;
  int lane, warp, warps, len;
  int nvalid;         // this thread's real staged rows
  unsigned tok_base;  // (first real row) * l
  unsigned row_step;  // warps * l: offset between its staged rows

  __device__ Tile(int valid_rows, int len_)
      : lane(threadIdx.x % 32), warp(threadIdx.x / 32), warps(blockDim.x / 32), len(len_),
        nvalid(warp < valid_rows ? min(kRows, (valid_rows - warp + warps - 1) / warps) : 0),
        tok_base(warp < valid_rows ? warp * len_ : 0), row_step(warps * len_) {}

  // Load token t0 + lane of this thread's kRows rows of R tensors (b, d, l) (pointers at (b, d0, 0)),
  // raw: rows past the channel count and tokens past l read the clamped address's (finite) value.
  // Conversion and any masking (row_ok) belong to the consumer, after the code that the loads are
  // to overlap: an instruction that reads a loaded register waits for the load, and one placed
  // next to the load (in the same basic block) would end the overlap right there.
  template <typename T, int R>
  __device__ __forceinline__ void load_rows(const T* const (&src)[R], int t0, T (&v)[R][kRows]) const {
    const int t = t0 + lane;
    const unsigned tc = t < len ? t : len - 1;
    const int jmax = max(nvalid - 1, 0);
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      const unsigned off = tok_base + (unsigned)min(j, jmax) * row_step + tc;
#pragma unroll
      for (int a = 0; a < R; ++a) v[a][j] = __ldg(src[a] + off);
    }
  }

  // Whether load_rows' row j at token t0 + lane is real (a channel < dim, a token < l).
  __device__ __forceinline__ bool row_ok(int t0, int j) const { return t0 + lane < len && j < nvalid; }

  // Load token t0 + lane of S state tensors (b, n, l) (pointers at (b, 0, 0)), raw: v[s][i] is
  // state n = warp + i * warps of tensor s (the warps share the NMAX states). States past nstate
  // read state 0 and tokens past l the clamped address; store_states zeroes the former.
  template <typename T, int NMAX, int S>
  __device__ __forceinline__ void load_states(const T* const (&src)[S], int nstate, int t0,
                                              T (&v)[S][kStateLoads<NMAX>]) const {
    const unsigned tc = min(t0 + lane, len - 1);
#pragma unroll
    for (int i = 0; i < kStateLoads<NMAX>; ++i) {
      const int n = warp + i * warps;
      const unsigned off = (n < nstate ? (unsigned)n * len : 0u) + tc;
#pragma unroll
      for (int s = 0; s < S; ++s) v[s][i] = __ldg(src[s] + off);
    }
  }

  // Store what load_states loaded, as float, into S consecutive tiles [kChunk][kStatePitch] at dst;
  // states past nstate as 0 (their A, B, C must be 0).
  template <typename T, int NMAX, int S>
  __device__ __forceinline__ void store_states(const T (&v)[S][kStateLoads<NMAX>], int nstate, float* dst) const {
#pragma unroll
    for (int i = 0; i < kStateLoads<NMAX>; ++i) {
      const int n = warp + i * warps;
#pragma unroll
      for (int s = 0; s < S; ++s)
        if (n < NMAX) dst[(s * kChunk + lane) * kStatePitch<NMAX> + n] = n < nstate ? to_float(v[s][i]) : 0.f;
    }
  }

  // Write tokens [t0, t0 + 32) of this thread's real rows of W tensors dst (b, d, l) (pointers at
  // (b, d0, 0)) from the [rows][kRowPad] records s, whose field f < KS holds lane part f's partial
  // result of the (row, token): W = 1 writes the sum of all four fields (the forward: with 2 lanes,
  // fields 2 and 3 still hold D u and 0), W = 2 the sums of the even and of the odd fields < KS.
  template <typename T, int W>
  __device__ __forceinline__ void store_rows(T* const (&dst)[W], const float4* s, int t0) const {
    static_assert(W == 1 || W == 2, "one or two outputs per record");
    const int t = t0 + lane;
    if (t >= len) return;
    const float4* rec = s + warp * kRowPad + lane;  // record of row warp + j * warps
    const int rec_step = warps * kRowPad;
    unsigned off = tok_base + t;
#pragma unroll
    for (int j = 0; j < kRows; ++j, rec += rec_step, off += row_step) {
      if (j >= nvalid) break;
      const float4 x = *rec;
      if constexpr (W == 1) {
        dst[0][off] = from_float<T>((x.x + x.y) + (x.z + x.w));
      } else {
        dst[0][off] = from_float<T>(KS == 4 ? x.x + x.z : x.x);
        dst[1][off] = from_float<T>(KS == 4 ? x.y + x.w : x.y);
      }
    }
  }
};

// This lane's NT states of token c from a staged [token][kStatePitch] tile (one 8- or 16-byte load).
template <int NMAX, int NT>
__device__ __forceinline__ void read_states(const float* s, int c, int part, float (&out)[NT]) {
  const float* p = s + c * kStatePitch<NMAX> + part * NT;
  if constexpr (NT == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    out[0] = v.x; out[1] = v.y;
  } else {
    static_assert(NT == 4, "NT must be 2 or 4");
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
  }
}

template <int G>  // G consecutive floats, 4 G-byte aligned (one vector store)
__device__ __forceinline__ void store_group(float* p, const float (&v)[G]) {
  if constexpr (G == 1) {
    *p = v[0];
  } else if constexpr (G == 2) {
    *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
  } else {
    static_assert(G == 4, "G must be 1, 2 or 4");
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
}

template <int NT>  // from global memory (read-only)
__device__ __forceinline__ void load_state(const float* p, float (&h)[NT]) {
  if constexpr (NT == 2) {
    const float2 v = __ldg(reinterpret_cast<const float2*>(p));
    h[0] = v.x; h[1] = v.y;
  } else {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p));
    h[0] = v.x; h[1] = v.y; h[2] = v.z; h[3] = v.w;
  }
}

template <int NT>
__device__ __forceinline__ void store_state(float* p, const float (&h)[NT]) {
  if constexpr (NT == 2) {
    *reinterpret_cast<float2*>(p) = make_float2(h[0], h[1]);
  } else {
    *reinterpret_cast<float4*>(p) = make_float4(h[0], h[1], h[2], h[3]);
  }
}

// Sum each of M values over the lanes of a warp that share `lane % KS` (the warp's channels),
// in a fixed order (deterministic). Recursive halving: at each step a lane keeps half of its values
// and sends the other half to its partner `OFFSET` lanes away; once one value is left, plain
// butterflies finish. Afterwards v[0] holds value (lane >> (5 - log2 M)) % M of this lane's part.
// Template recursion keeps every array index a compile-time constant.
template <int KS, int HALF, int OFFSET, int M>
__device__ __forceinline__ void warp_halving_steps(float (&v)[M], int lane) {
  if constexpr (HALF >= 1) {
    const bool upper = lane & OFFSET;
#pragma unroll
    for (int i = 0; i < HALF; ++i) {
      const float send = upper ? v[i] : v[i + HALF];
      const float keep = upper ? v[i + HALF] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFFSET);
    }
    warp_halving_steps<KS, HALF / 2, OFFSET / 2, M>(v, lane);
  } else {
#pragma unroll
    for (int offset = OFFSET; offset >= KS; offset /= 2) v[0] += __shfl_xor_sync(0xffffffffu, v[0], offset);
  }
}

template <int KS, int M>
__device__ __forceinline__ void warp_sum_over_channels(float (&v)[M], int lane) {
  static_assert(M >= 2 && M <= 32 / KS && (M & (M - 1)) == 0, "M must be a power of two <= 32 / KS");
  warp_halving_steps<KS, M / 2, 16, M>(v, lane);
}

// delta_bias and D of the block's channels into s_par[rows] as (bias, D); 0 past the channel count.
__device__ __forceinline__ void stage_params(float2* s_par, const float* delta_bias, const float* Dskip, int d0,
                                             int rows, int valid_rows) {
  for (int r = threadIdx.x; r < rows; r += blockDim.x)
    s_par[r] = r < valid_rows ? make_float2(delta_bias[d0 + r], Dskip[d0 + r]) : make_float2(0.f, 0.f);
}

// KS lanes per row, MIN_BLOCKS per SM, as for the backward: 4 lanes and 3 blocks (80 registers) for
// n > 8 and where the grid fits one wave so (T stage 3); else, for n <= 8, 2 lanes of 4 states and 2
// blocks (128 registers) where that grid fits one wave (B stage 3); else 4 lanes and 4 blocks (64
// registers, where the chunk prefetched in registers leaves the token loop one record in flight).
template <typename T, int NMAX, int KS, int MIN_BLOCKS>
__global__ void __launch_bounds__(kMaxWarps * 32, MIN_BLOCKS)  // no spills
scan_fwd_kernel(const T* __restrict__ u, const T* __restrict__ delta, const float* __restrict__ A,
                const T* __restrict__ Bs, const T* __restrict__ Cs, const float* __restrict__ Dskip,
                const float* __restrict__ delta_bias, T* __restrict__ y,
                float* __restrict__ seg_state,  // [b][d][n_seg][NMAX] or nullptr: state entering each segment
                ScanShape p) {
  constexpr int NT = NMAX / KS, K = kSegLen<NMAX>;
  constexpr int G = 4;  // tokens per group of steps whose partial-y writes wait for the group's end
  extern __shared__ float4 smem_f4[];
  const int rows = blockDim.x / KS;
  float4* s_x = smem_f4;  // [rows][kRowPad]: (dt, dt u, D u, 0), then the lanes' partial y
  float* s_B = reinterpret_cast<float*>(s_x + rows * kRowPad);              // [kChunk][kStatePitch]
  float* s_C = s_B + kChunk * kStatePitch<NMAX>;                            // [kChunk][kStatePitch]
  float2* s_par = reinterpret_cast<float2*>(s_C + kChunk * kStatePitch<NMAX>);  // [rows]: (delta_bias, D)

  const int b = blockIdx.x, d0 = blockIdx.y * rows, row = threadIdx.x / KS, part = threadIdx.x % KS;
  const int d = d0 + row, valid_rows = min(rows, p.dim - d0);
  const bool active = d < p.dim;
  const Tile<KS> tile(valid_rows, p.len);
  stage_params(s_par, delta_bias, Dskip, d0, rows, valid_rows);
  float A2[NT];  // this lane's states n = part * NT + i: A * log2(e), so exp(dt A) = 2^(dt A2)
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const int n = part * NT + i;
    A2[i] = (active && n < p.nstate) ? A[d * p.nstate + n] * kLog2e : 0.f;
  }
  const int64_t rows_off = ((int64_t)b * p.dim + d0) * p.len;  // (b, d0, 0)
  const int64_t bc_off = (int64_t)b * p.nstate * p.len;          // (b, 0, 0)
  const T *u_b = opaque(u + rows_off), *delta_b = opaque(delta + rows_off);
  const T *B_b = opaque(Bs + bc_off), *C_b = opaque(Cs + bc_off);
  T* y_b = opaque(y + rows_off);
  const int n_seg = (p.len + K - 1) / K;
  float* my_seg_state =
      seg_state == nullptr ? nullptr : seg_state + ((int64_t)b * p.dim + d) * n_seg * NMAX + part * NT;
  float4* my_x = s_x + row * kRowPad;
  float h[NT];
#pragma unroll
  for (int i = 0; i < NT; ++i) h[i] = 0.f;
  // A chunk's inputs are loaded into registers one chunk ahead: their latency hides behind the
  // token loop of the chunk before.
  T v[2][Tile<KS>::kRows], bc[2][kStateLoads<NMAX>];  // u, delta; B, C
  tile.template load_rows<T, 2>({u_b, delta_b}, 0, v);
  tile.template load_states<T, NMAX, 2>({B_b, C_b}, p.nstate, 0, bc);
  __syncthreads();  // s_par

  for (int t0 = 0; t0 < p.len; t0 += kChunk) {
    tile.template store_states<T, NMAX, 2>(bc, p.nstate, s_B);
#pragma unroll
    for (int j = 0; j < Tile<KS>::kRows; ++j) {
      const int r = tile.warp + j * tile.warps;
      const float2 par = s_par[r];
      const float u_j = to_float(v[0][j]), x = to_float(v[1][j]) + par.x;
      const float dt = p.softplus ? Softplus(x).value : x;
      s_x[r * kRowPad + tile.lane] = make_float4(dt, dt * u_j, par.y * u_j, 0.f);
    }
    if (t0 + kChunk < p.len) {
      tile.template load_rows<T, 2>({u_b, delta_b}, t0 + kChunk, v);
      tile.template load_states<T, NMAX, 2>({B_b, C_b}, p.nstate, t0 + kChunk, bc);
    }
    __syncthreads();
    // Tokens past l read finite u, B, C; their y is never stored, and h is not used after the last
    // chunk (nor saved: their segments do not exist). Each lane sums C h over its own states only
    // (with 4 lanes, part 2 adds D u) and, once all lanes of its row have read the records of a
    // group of G tokens, writes its partial y over field `part` of each; the store phase adds the
    // four fields (with 2 lanes, fields 2 and 3 still hold D u and 0). (The writes wait for the
    // group's end so that the group's loads and steps overlap.)
    const int len = min(kChunk, p.len - t0);
    for (int k0 = 0; k0 < len; k0 += K) {
      if (my_seg_state != nullptr && active) store_state<NT>(my_seg_state + ((t0 + k0) / K) * NMAX, h);
#pragma unroll
      for (int j0 = 0; j0 < K; j0 += G) {
        float y_part[G];
#pragma unroll
        for (int j = 0; j < G; ++j) {
          const int k = k0 + j0 + j;
          const float4 x = my_x[k];  // (dt, dt u, D u, 0)
          float B_k[NT], C_k[NT];
          read_states<NMAX, NT>(s_B, k, part, B_k);
          read_states<NMAX, NT>(s_C, k, part, C_k);
          y_part[j] = (KS == 4 && part == 2) ? x.z : 0.f;
#pragma unroll
          for (int i = 0; i < NT; ++i) {
            h[i] = exp2_approx(x.x * A2[i]) * h[i] + x.y * B_k[i];
            y_part[j] += C_k[i] * h[i];
          }
        }
        __syncwarp();  // all four lanes of the row have read the group's records
#pragma unroll
        for (int j = 0; j < G; ++j) reinterpret_cast<float*>(my_x + k0 + j0 + j)[part] = y_part[j];
      }
    }
    __syncthreads();  // partial y complete; s_B, s_C free for the next chunk
    tile.template store_rows<T, 1>({y_b}, s_x, t0);  // then the same thread stages the next chunk's records
  }
}

// KS lanes per row, MIN_BLOCKS per SM. n > 8: 4 lanes, 2 blocks (128 registers). n <= 8, one of
// three, chosen by grid size (launch_bwd): 4 lanes and 3 blocks (80 registers) where the grid fits
// one wave so (T stage 3: 384 blocks, 396 slots); else 2 lanes of 4 states each and 2 blocks (128
// registers, 16 channels per warp) where that grid fits one wave (B stage 3: 256 blocks of 128
// channels); else 4 lanes and 4 blocks (64 registers, 55 KB of shared memory for 8 warps). G: tokens
// per group of reverse steps whose shared-memory writes wait for the group's end (the steps of a
// group overlap), as many as the registers fit without spills in the token loops: 1 at 64
// registers, 2 at 80 and in the 2-lane instance, 4 in the n > 8 one. (There 12-19 loop-invariant
// values live in local memory, reloaded once per chunk while the chunk's raw loads fly.)
template <typename T, int NMAX, int KS, int MIN_BLOCKS>
__global__ void __launch_bounds__(kMaxWarps * 32, MIN_BLOCKS)
scan_bwd_kernel(const T* __restrict__ u, const T* __restrict__ delta, const float* __restrict__ A,
                const T* __restrict__ Bs, const T* __restrict__ Cs, const float* __restrict__ Dskip,
                const float* __restrict__ delta_bias, const float* __restrict__ seg_state,  // from the forward
                const T* __restrict__ dy, T* __restrict__ du, T* __restrict__ ddelta,
                float* __restrict__ dBC_part,    // [gridDim.y][b][2][n][l]: dB rows, then dC rows
                float* __restrict__ dADb_part,   // [b][d][NMAX + 2]: dA, dD, ddelta_bias
                ScanShape p) {
  constexpr int NT = NMAX / KS, K = kSegLen<NMAX>;
  constexpr int M = 2 * NT;  // values per lane and token summed over channels: dB, dC of its states
  constexpr int G = MIN_BLOCKS == 4 ? 1 : (MIN_BLOCKS == 3 || KS == 2 ? 2 : 4);
  extern __shared__ float4 smem_f4[];
  const int rows = blockDim.x / KS, warps = blockDim.x / 32;
  float4* s_x = smem_f4;  // [rows][kRowPad]: (u, dt, dy, sigmoid), then partial (du, ddelta[, du, ddelta])
  float* s_B = reinterpret_cast<float*>(s_x + rows * kRowPad);  // [kChunk][kStatePitch]
  float* s_C = s_B + kChunk * kStatePitch<NMAX>;                // [kChunk][kStatePitch]
  float* s_red = s_C + kChunk * kStatePitch<NMAX>;  // [kMaxWarps][2 NMAX][kRedPad]: dB, dC sums
  float2* s_par = reinterpret_cast<float2*>(s_red + kMaxWarps * 2 * NMAX * kRedPad);  // [rows]: (delta_bias, D)

  const int b = blockIdx.x, d0 = blockIdx.y * rows, row = threadIdx.x / KS, part = threadIdx.x % KS;
  const int d = d0 + row, valid_rows = min(rows, p.dim - d0);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const bool active = d < p.dim;
  const Tile<KS> tile(valid_rows, p.len);
  stage_params(s_par, delta_bias, Dskip, d0, rows, valid_rows);
  for (int i = warps * 2 * NMAX * kRedPad + threadIdx.x; i < kMaxWarps * 2 * NMAX * kRedPad; i += blockDim.x)
    s_red[i] = 0.f;  // the slots of absent warps, summed with the others
  float A2[NT];
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const int n = part * NT + i;
    A2[i] = (active && n < p.nstate) ? A[d * p.nstate + n] * kLog2e : 0.f;
  }
  const float D_du = (active && part == 0) ? Dskip[d] : 0.f;  // D dy enters du once per row
  const int64_t rows_off = ((int64_t)b * p.dim + d0) * p.len;  // (b, d0, 0)
  const int64_t bc_off = (int64_t)b * p.nstate * p.len;          // (b, 0, 0)
  const T *u_b = opaque(u + rows_off), *delta_b = opaque(delta + rows_off), *dy_b = opaque(dy + rows_off);
  const T *B_b = opaque(Bs + bc_off), *C_b = opaque(Cs + bc_off);
  T *du_b = opaque(du + rows_off), *ddelta_b = opaque(ddelta + rows_off);
  const int n_seg = (p.len + K - 1) / K;
  // This lane's segment states: a block-wide base and a 32-bit offset (fewer live registers than a
  // per-thread pointer). Rows past the channel count read row d0's: their u = dy = 0 zero every term.
  const float* seg_state_b = seg_state + ((int64_t)b * p.dim + d0) * n_seg * NMAX;  // (b, d0, 0, 0)
  const unsigned my_seg_off = (active ? row : 0) * n_seg * NMAX + part * NT;
  const auto my_seg_state = [&](int seg) { return seg_state_b + (my_seg_off + seg * NMAX); };
  float4* my_x = s_x + row * kRowPad;
  // After warp_sum_over_channels, this lane holds the channel sum of value idx of its part: dB
  // (idx < NT) or dC of state part * NT + idx % NT; one lane per value (red_writer) stores it, into
  // row m of s_red. (The 16 writers' rows start 4 banks apart, kRedPad: at most 2-way conflicts
  // where a pitch of 32 floats put all 16 on one bank.)
  constexpr int kLog2M = M == 2 ? 1 : (M == 4 ? 2 : 3), kLog2KS = KS == 2 ? 1 : 2;
  const int idx = (lane >> (5 - kLog2M)) % M;
  const bool red_writer = ((lane >> kLog2KS) & (32 / KS / M - 1)) == 0;
  float* my_red = s_red + (warp * 2 * NMAX + (idx / NT) * NMAX + part * NT + idx % NT) * kRedPad;
  __syncthreads();  // s_par, s_red

  float carry[NT];   // a_{t+1} g_{t+1}: the gradient reaching h_t through h_{t+1}
  float dA_acc[NT];
  // The entering states of the next two segments to visit, prefetched two segments ahead. They
  // move up (next_state2 -> next_state) at the end of a segment's steps, before the next load into
  // next_state2 is issued: a copy right after that load would wait for it.
  float next_state[NT], next_state2[NT];
#pragma unroll
  for (int i = 0; i < NT; ++i) carry[i] = dA_acc[i] = 0.f;
  load_state<NT>(my_seg_state(n_seg - 1), next_state);
  load_state<NT>(my_seg_state(max(n_seg - 2, 0)), next_state2);
  float dD_acc = 0.f, dbias_acc = 0.f;
  const int n_chunks = (p.len + kChunk - 1) / kChunk;
  // Writes chunk t0's du, ddelta (from the records) and its dB, dC partials: the warps' sums in
  // s_red added in a fixed order; warp w writes rows m = w, w + warps, ... of s_red (dB of state m,
  // then dC of state m - NMAX), the real states' ones into the [2][n][l] slab, one token per lane.
  auto flush = [&](int t0) {
    tile.template store_rows<T, 2>({du_b, ddelta_b}, s_x, t0);
    float* out = dBC_part + ((int64_t)blockIdx.y * p.batch + b) * 2 * p.nstate * p.len + t0 + lane;
#pragma unroll
    for (int q = 0; q < (2 * NMAX + kMinWarps - 1) / kMinWarps; ++q) {
      const int m = warp + q * warps, state = m % NMAX;
      if (m < 2 * NMAX && state < p.nstate && t0 + lane < p.len) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < kMaxWarps; ++w) sum += s_red[(w * 2 * NMAX + m) * kRedPad + lane];  // absent warps: 0
        out[((m / NMAX) * p.nstate + state) * p.len] = sum;
      }
    }
  };
  for (int chunk = n_chunks - 1; chunk >= 0; --chunk) {
    const int t0 = chunk * kChunk, len = min(kChunk, p.len - t0);
    {
      // The chunk's loads fly while the chunk after it (done before) writes its outputs.
      T v[3][Tile<KS>::kRows], bc[2][kStateLoads<NMAX>];
      tile.template load_rows<T, 3>({u_b, delta_b, dy_b}, t0, v);
      tile.template load_states<T, NMAX, 2>({B_b, C_b}, p.nstate, t0, bc);
      if (chunk < n_chunks - 1) flush(t0 + kChunk);
      // Then the chunk's staging overwrites the records this thread has just written out and
      // s_B, s_C (read before the last barrier); s_red is written after the barrier below.
      tile.template store_states<T, NMAX, 2>(bc, p.nstate, s_B);
#pragma unroll
      for (int j = 0; j < Tile<KS>::kRows; ++j) {
        const int r = tile.warp + j * tile.warps;
        const bool ok = tile.row_ok(t0, j);  // u = dy = 0 past the channel count and past l
        const float x = to_float(v[1][j]) + s_par[r].x;
        const Softplus sp(x);
        s_x[r * kRowPad + tile.lane] = make_float4(ok ? to_float(v[0][j]) : 0.f, p.softplus ? sp.value : x,
                                                   ok ? to_float(v[2][j]) : 0.f, p.softplus ? sp.slope : 1.f);
      }
    }
    __syncthreads();
    for (int s = (len - 1) / K; s >= 0; --s) {
      const int k0 = s * K, seg = (t0 + k0) / K;
      // The segment's states and decays: hist[j + 1] = h at token k0 + j, hist[0] = entering state,
      // a[j] = exp(dt A) at token k0 + j.
      float hist[K + 1][NT], a[K][NT];
#pragma unroll
      for (int i = 0; i < NT; ++i) {
        hist[0][i] = next_state[i];
      }
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const float4 x = my_x[k0 + j];
        const float dtu = x.y * x.x;
        float B_k[NT];
        read_states<NMAX, NT>(s_B, k0 + j, part, B_k);
#pragma unroll
        for (int i = 0; i < NT; ++i) {
          a[j][i] = exp2_approx(x.y * A2[i]);
          hist[j + 1][i] = a[j][i] * hist[j][i] + dtu * B_k[i];
        }
      }
      // Reverse steps over the segment, branch-free. Tokens past l (only in the sequence's last
      // segment, reached first, while carry is still 0) read u = dy = 0, so every gradient term and
      // the carry stay 0; their du, ddelta are never stored. The steps go in groups of G tokens:
      // per token, this lane keeps its du or ddelta share (out) and the channel sum of one dB or
      // dC value (red_sum) in registers, and writes them after the group's last read, so that the
      // group's steps overlap. With G = 1 (64 registers), red_sum is stored one step late instead,
      // so that its shuffle chain overlaps the next step.
      float red_late = 0.f;  // G = 1: the channel sum of the step before, stored one step late
#pragma unroll
      for (int j0 = K - G; j0 >= 0; j0 -= G) {
        float out[G], red_sum[G];
#pragma unroll
        for (int jj = G - 1; jj >= 0; --jj) {
          const int j = j0 + jj, k = k0 + j;
          const float4 x = my_x[k];  // (u, dt, dy, sigmoid)
          const float u_k = x.x, dt = x.y, dy_k = x.z, dtu = dt * u_k;
          float B_k[NT], C_k[NT], red[M];
          read_states<NMAX, NT>(s_B, k, part, B_k);
          read_states<NMAX, NT>(s_C, k, part, C_k);
          float gB = 0.f, gaA2 = 0.f;
#pragma unroll
          for (int i = 0; i < NT; ++i) {
            const float g = carry[i] + dy_k * C_k[i];   // dLoss/dh_t
            carry[i] = a[j][i] * g;
            const float gha = carry[i] * hist[j][i];    // dLoss/da_t * a_t
            dA_acc[i] += gha * dt;
            gaA2 += gha * A2[i];
            gB += g * B_k[i];
            red[i] = g * dtu;                           // dB_t of state part * NT + i
            red[NT + i] = dy_k * hist[j + 1][i];        // dC_t of state part * NT + i
          }
          // Over the pair of lanes: even parts get sum g B, odd parts u sum g B + ln 2 sum g h a A2
          // (d(dt)), each over the pair's states; the pairs' du and ddelta shares go to the record.
          const float sum = pair_sum(gB, u_k * gB + kLn2 * gaA2, part);
          out[jj] = (part & 1) ? sum * x.w : dt * sum + D_du * dy_k;  // ddelta (odd), du (even)
          dD_acc += dy_k * u_k;
          dbias_acc += out[jj];  // a share of the ddelta sum in odd parts
          warp_sum_over_channels<KS, M>(red, lane);
          red_sum[jj] = red[0];
        }
        __syncwarp();  // all four lanes of the row have read the group's records
#pragma unroll
        for (int jj = 0; jj < G; ++jj) reinterpret_cast<float*>(my_x + k0 + j0 + jj)[part] = out[jj];
        if constexpr (G == 1) {
          if (j0 < K - 1 && red_writer) my_red[k0 + j0 + 1] = red_late;
          red_late = red_sum[0];
        } else if (red_writer) {
          store_group<G>(my_red + k0 + j0, red_sum);
        }
      }
      if (G == 1 && red_writer) my_red[k0] = red_late;
#pragma unroll
      for (int i = 0; i < NT; ++i) next_state[i] = next_state2[i];
      load_state<NT>(my_seg_state(max(seg - 2, 0)), next_state2);
    }
    __syncthreads();
  }
  flush(0);
  if constexpr (KS == 4) dbias_acc += __shfl_xor_sync(0xffffffffu, dbias_acc, 2);  // parts 1 and 3
  if (active) {
    float* out = dADb_part + ((int64_t)b * p.dim + d) * (NMAX + 2);
#pragma unroll
    for (int i = 0; i < NT; ++i) out[part * NT + i] = dA_acc[i];
    if (part == 0) out[NMAX] = dD_acc;
    if (part == 1) out[NMAX + 1] = dbias_acc;
  }
}

// The backward's last step, one launch of kFinishThreads-thread blocks: sums the partials in a
// fixed order into the final gradients. The first adb_blocks blocks (scheduled first, so that their
// longer sums do not form the tail) sum dADb_part over the batch: column j of the per-batch-row
// slab [d][NMAX + 2] is (d, k): dA (k < n), dD (k = NMAX), ddelta_bias (k = NMAX + 1). A block owns
// 32 columns, one per lane; warp w sums batch rows w, w + 8, ... (16 loads in flight per round),
// then warp 0 adds the 8 warps' sums in order. The other blocks sum the channel blocks' dBC_part
// for one batch row b: its [2][n][l] slab is laid out as dB[b] followed by dC[b], so a thread sums
// V consecutive elements (V = 4 where n l is a multiple of 4: vector loads and stores, no index
// division) over the channel blocks and writes them to dB or dC.
constexpr int kFinishWarps = 8, kFinishThreads = kFinishWarps * 32, kFinishLoads = 16;
constexpr int kFinishBlockLoads = 4;  // channel blocks' partials loaded per round

template <typename T, int V>  // V consecutive elements, one aligned vector access
struct alignas(sizeof(T) * V) Vec {
  T x[V];
};

template <typename T, int NMAX, int V>
__global__ void __launch_bounds__(kFinishThreads, 6)  // <= 40 registers: 6 blocks per SM
scan_bwd_finish_kernel(const float* __restrict__ dBC_part, const float* __restrict__ dADb_part,
                       T* __restrict__ dB, T* __restrict__ dC, float* __restrict__ dA, float* __restrict__ dD,
                       float* __restrict__ ddelta_bias, ScanShape p, int channel_blocks, int adb_blocks) {
  const int n = p.nstate, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if ((int)blockIdx.x < adb_blocks) {
    __shared__ float s_sum[kFinishWarps][32];
    const int cols = p.dim * (NMAX + 2), j = blockIdx.x * 32 + lane;  // column (d, k)
    const float* src = dADb_part + min(j, cols - 1);
    float sum = 0.f;
    for (int b0 = warp; b0 < p.batch; b0 += kFinishWarps * kFinishLoads) {
      float v[kFinishLoads];
#pragma unroll
      for (int i = 0; i < kFinishLoads; ++i) {
        const int b = b0 + i * kFinishWarps;
        v[i] = b < p.batch ? src[(int64_t)b * cols] : 0.f;
      }
#pragma unroll
      for (int i = 0; i < kFinishLoads; ++i) sum += v[i];
    }
    s_sum[warp][lane] = sum;
    __syncthreads();
    if (warp != 0 || j >= cols) return;
#pragma unroll
    for (int w = 1; w < kFinishWarps; ++w) sum += s_sum[w][lane];
    const int d = j / (NMAX + 2), k = j % (NMAX + 2);
    if (k < n) dA[d * n + k] = sum;
    else if (k == NMAX) dD[d] = sum;
    else if (k == NMAX + 1) ddelta_bias[d] = sum;
  } else {
    const int nl = n * p.len, row_blocks = (2 * nl / V + kFinishThreads - 1) / kFinishThreads;
    const int q = blockIdx.x - adb_blocks, b = q / row_blocks;
    const int i = ((q - b * row_blocks) * kFinishThreads + threadIdx.x) * V;  // element of the [2][n][l] slab
    if (i >= 2 * nl) return;
    const int64_t part_step = (int64_t)p.batch * 2 * nl;  // between channel blocks
    const float* src = dBC_part + (int64_t)b * 2 * nl + i;
    float sum[V] = {};
    for (int k0 = 0; k0 < channel_blocks; k0 += kFinishBlockLoads) {  // in rounds of loads all in flight
      Vec<float, V> x[kFinishBlockLoads] = {};
#pragma unroll
      for (int k = 0; k < kFinishBlockLoads; ++k)
        if (k0 + k < channel_blocks) x[k] = *reinterpret_cast<const Vec<float, V>*>(src + (k0 + k) * part_step);
#pragma unroll
      for (int k = 0; k < kFinishBlockLoads; ++k)
#pragma unroll
        for (int e = 0; e < V; ++e) sum[e] += x[k].x[e];
    }
    Vec<T, V> out;
#pragma unroll
    for (int e = 0; e < V; ++e) out.x[e] = from_float<T>(sum[e]);
    T* dst = (i < nl ? dB + i : dC + (i - nl)) + (int64_t)b * nl;
    *reinterpret_cast<Vec<T, V>*>(dst) = out;
  }
}

// Channels per block: whole warps (32 / ks channels each with ks lanes per channel),
// kMinWarps..kMaxWarps, spread evenly over the fewest blocks.
dim3 block_grid(int batch, int dim, int* threads, int ks = kSplit) {
  const int warps_total = std::max(kMinWarps, (dim * ks + 31) / 32);
  const int n_blocks = (warps_total + kMaxWarps - 1) / kMaxWarps;
  const int warps = (warps_total + n_blocks - 1) / n_blocks;
  *threads = warps * 32;
  return dim3(batch, n_blocks);
}

size_t fwd_smem(int threads, int nmax, int ks) {
  const int rows = threads / ks;
  return sizeof(float4) * rows * kRowPad + sizeof(float) * 2 * kChunk * (nmax + 4) + sizeof(float2) * rows;
}
size_t bwd_smem(int threads, int nmax, int ks) {
  const int rows = threads / ks;
  return sizeof(float4) * rows * kRowPad + sizeof(float) * 2 * kChunk * (nmax + 4) +
         sizeof(float) * kMaxWarps * 2 * nmax * kRedPad + sizeof(float2) * rows;
}

// Streaming multiprocessors of the current device (queried once per device; no synchronisation).
unsigned sm_count() {
  static int cached[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (cached[dev] == 0 && cudaDeviceGetAttribute(&cached[dev], cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 132;
  return cached[dev];
}

// The instance that runs a grid (the kernels' comments say why). n > 8: 4 lanes per row (kFour).
// n <= 8: 4 lanes at 3 blocks per SM where the grid fits one wave so (kFour); else 2 lanes at 2
// blocks where that grid fits one wave (kTwoLanes: grid and threads are set for it); else 4 lanes
// at 4 blocks (kFourAt4).
enum class Instance { kFour, kTwoLanes, kFourAt4 };
Instance pick_instance(const ScanShape& p, int nmax, dim3* grid, int* threads) {
  *grid = block_grid(p.batch, p.dim, threads);
  if (nmax > 8 || grid->x * grid->y <= 3u * sm_count()) return Instance::kFour;
  int wide_threads;
  const dim3 wide_grid = block_grid(p.batch, p.dim, &wide_threads, kWideSplit);
  if (wide_grid.x * wide_grid.y > 2u * sm_count()) return Instance::kFourAt4;
  *grid = wide_grid, *threads = wide_threads;
  return Instance::kTwoLanes;
}

template <typename T, int NMAX>
int launch_fwd(const ScanShape& p, const void* u, const void* delta, const float* A, const void* B, const void* C,
               const float* D, const float* delta_bias, void* y, float* seg_state, cudaStream_t stream) {
  int threads;
  dim3 grid;
  const Instance instance = pick_instance(p, NMAX, &grid, &threads);
  auto kernel = scan_fwd_kernel<T, NMAX, kSplit, 3>;
  if constexpr (NMAX <= 8) {
    if (instance == Instance::kTwoLanes) kernel = scan_fwd_kernel<T, NMAX, kWideSplit, 2>;
    if (instance == Instance::kFourAt4) kernel = scan_fwd_kernel<T, NMAX, kSplit, 4>;
  }
  const size_t smem = fwd_smem(threads, NMAX, instance == Instance::kTwoLanes ? kWideSplit : kSplit);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem, stream>>>(static_cast<const T*>(u), static_cast<const T*>(delta), A,
                                          static_cast<const T*>(B), static_cast<const T*>(C), D, delta_bias,
                                          static_cast<T*>(y), seg_state, p);
  return cudaGetLastError();
}

template <typename T, int NMAX>
int launch_bwd(const ScanShape& p, const void* u, const void* delta, const float* A, const void* B, const void* C,
               const float* D, const float* delta_bias, const float* seg_state, const void* dy, void* du,
               void* ddelta, float* dBC_part, float* dADb_part, void* dB, void* dC, float* dA, float* dD,
               float* ddelta_bias, cudaStream_t stream) {
  int threads;
  dim3 grid;
  const Instance instance = pick_instance(p, NMAX, &grid, &threads);
  auto kernel = scan_bwd_kernel<T, NMAX, kSplit, NMAX <= 8 ? 3 : 2>;
  if constexpr (NMAX <= 8) {
    if (instance == Instance::kTwoLanes) kernel = scan_bwd_kernel<T, NMAX, kWideSplit, 2>;
    if (instance == Instance::kFourAt4) kernel = scan_bwd_kernel<T, NMAX, kSplit, 4>;
  }
  const size_t smem = bwd_smem(threads, NMAX, instance == Instance::kTwoLanes ? kWideSplit : kSplit);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem, stream>>>(
      static_cast<const T*>(u), static_cast<const T*>(delta), A, static_cast<const T*>(B),
      static_cast<const T*>(C), D, delta_bias, seg_state, static_cast<const T*>(dy), static_cast<T*>(du),
      static_cast<T*>(ddelta), dBC_part, dADb_part, p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int adb_blocks = (p.dim * (NMAX + 2) + 31) / 32;
  const bool vec4 = p.nstate * p.len % 4 == 0;
  const int per_thread = vec4 ? 4 : 1, row_span = per_thread * kFinishThreads;
  const int64_t bc_blocks = p.batch * (int64_t)((2 * p.nstate * p.len + row_span - 1) / row_span);
  if (adb_blocks + bc_blocks > 2147483647) return -1;
  auto finish = vec4 ? scan_bwd_finish_kernel<T, NMAX, 4> : scan_bwd_finish_kernel<T, NMAX, 1>;
  finish<<<(unsigned)(adb_blocks + bc_blocks), kFinishThreads, 0, stream>>>(
      dBC_part, dADb_part, static_cast<T*>(dB), static_cast<T*>(dC), dA, dD, ddelta_bias, p, (int)grid.y,
      adb_blocks);
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
  // 32-bit offsets inside one batch row's (d, l) and (2 NMAX, l) slabs, one block's segment states
  // (64 rows x 4 l) and the (d, NMAX + 2) partials
  return p.batch >= 1 && p.dim >= 1 && p.dim <= 65535 * kMaxWarps * 32 / kSplit && p.len >= 1 && p.nstate >= 1 &&
         p.nstate <= 16 && (int64_t)p.dim * p.len < 2147483647 && (int64_t)p.dim * 18 < 2147483647 &&
         (int64_t)p.len * 128 < 2147483647;
}

}  // namespace

// The C interface scan.py calls through ctypes. Tensors are contiguous and on the current device:
// u, delta, dy, y, du, ddelta (b, d, l) and B, C (b, n, l) in the dtype given by the code,
// A (d, n), D, delta_bias (d,) float32; seg_state (b, d, ceil(l / seg_len), state_max) float32;
// partial buffers as in scan_bwd_kernel; gradients dB, dC (b, n, l) in the dtype given, dA (d, n),
// dD, ddelta_bias (d,) float32. Returns 0 or a CUDA error code (-1: bad arguments). Nothing here
// synchronises with the host.
extern "C" {

// Channel blocks of the backward's 4-lane layout: the most any instance uses (dBC_part's size).
int mv_scan_channel_blocks(int dim) {
  int threads;
  return (int)block_grid(1, dim, &threads).y;
}

int mv_scan_seg_len(int nstate) { return nstate <= 8 ? kSegLen<8> : kSegLen<16>; }

int mv_scan_state_max(int nstate) { return nstate <= 8 ? 8 : 16; }

const char* mv_scan_error_string(int code) {
  return code == -1 ? "invalid arguments (dtype code or shape)" : cudaGetErrorString(static_cast<cudaError_t>(code));
}

// seg_state: nullptr (inference) or the buffer the backward will read.
int mv_scan_fwd(int dtype, int batch, int dim, int len, int nstate, int softplus, const void* u, const void* delta,
                const float* A, const void* B, const void* C, const float* D, const float* delta_bias, void* y,
                float* seg_state, void* stream) {
  const ScanShape p{batch, dim, len, nstate, softplus != 0};
  if (!valid_shape(p)) return -1;
  return dispatch(dtype, nstate, [&](auto t_tag, auto n_tag) {
    return launch_fwd<decltype(t_tag), decltype(n_tag)::value>(p, u, delta, A, B, C, D, delta_bias, y, seg_state,
                                                                 static_cast<cudaStream_t>(stream));
  });
}

int mv_scan_bwd(int dtype, int batch, int dim, int len, int nstate, int softplus, const void* u, const void* delta,
                const float* A, const void* B, const void* C, const float* D, const float* delta_bias,
                const float* seg_state, const void* dy, void* du, void* ddelta, float* dBC_part, float* dADb_part,
                void* dB, void* dC, float* dA, float* dD, float* ddelta_bias, void* stream) {
  const ScanShape p{batch, dim, len, nstate, softplus != 0};
  if (!valid_shape(p) || seg_state == nullptr) return -1;
  return dispatch(dtype, nstate, [&](auto t_tag, auto n_tag) {
    return launch_bwd<decltype(t_tag), decltype(n_tag)::value>(p, u, delta, A, B, C, D, delta_bias, seg_state, dy,
                                                                 du, ddelta, dBC_part, dADb_part, dB, dC, dA, dD,
                                                                 ddelta_bias, static_cast<cudaStream_t>(stream));
  });
}

}  // extern "C"

// Quantized-weight matmul for XLA:CPU, as an XLA FFI custom call.
//
//   y[T, O] = x[T, I] @ W^T,   W[o, i] = scales[o, i / g] * q[o, i] + mins[o, i / g]
//
// q is output-major, one row of W per output o, in groups of g consecutive inputs:
//   bits=4: uint8 [O, I/2], element i in byte i/2, low nibble = even i, high nibble = odd i (0..15)
//   bits=8: int8  [O, I]    (-128..127; also holds 5/6-bit values one per byte)
// scales, mins: float32 [O, I/g]; with has_mins=false the mins buffer is ignored.
//
// Why a custom kernel: XLA:CPU turns int8 dots into int32 loops and dequantizes elementwise at a few
// G elements/s, so quantized weights run slower than f32 ones. Decode streams every weight once per
// token: reading 4 or 8 bits per weight instead of 32 is the whole point, if unpacking keeps up.
//
// A sibling target, JaxinferCpuF32Matmul, takes float32 weights (section "float32 weights" below).
//
// Built by pallas_kernels/cpu_qmatmul.py; see there for the Python op and the jnp reference.

#include <algorithm>
#include <array>
#include <cstdlib>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QMM_AVX2 1
#else
#define QMM_AVX2 0
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 64-byte aligned storage for the dequantized tiles (aligned vector loads and stores).
template <typename T>
struct AlignedAlloc {
  using value_type = T;
  AlignedAlloc() = default;
  template <typename U>
  AlignedAlloc(const AlignedAlloc<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64)); }
  void deallocate(T* ptr, size_t) { std::free(ptr); }
  bool operator==(const AlignedAlloc&) const { return true; }
  bool operator!=(const AlignedAlloc&) const { return false; }
};

// One call's operands, plus x prepared once per call for the row kernels.
struct Problem {
  const float* x;        // [T, I]
  const uint8_t* q;      // [O, I/2] (bits=4) or [O, I] (bits=8, read as int8)
  const float* scales;   // [O, G]
  const float* mins;     // [O, G], or nullptr
  float* y;              // [T, O]
  int64_t T, I, O, g, G;
  int bits;
  bool vector;           // AVX2 path (needs g % 16 == 0); else the portable loops
  const float* xk;       // [T, I] x in kernel order (bits=4: see PrepareX)
  const float* xsum;     // [T, G] sum of x over each group, for the mins term
};

// ---------------------------------------------------------------------------------------------------
// Portable path: plain loops, any g. Used without AVX2, for g % 16 != 0, and by the tests.

float ScalarWeight(const Problem& p, int64_t o, int64_t i) {
  if (p.bits == 4) {
    uint8_t b = p.q[o * (p.I / 2) + i / 2];
    return static_cast<float>((i & 1) ? (b >> 4) : (b & 15));
  }
  return static_cast<float>(reinterpret_cast<const int8_t*>(p.q)[o * p.I + i]);
}

void ScalarRows(const Problem& p, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t t = 0; t < p.T; ++t) {
      const float* x = p.x + t * p.I;
      float acc = 0.f;
      for (int64_t gi = 0; gi < p.G; ++gi) {
        float part = 0.f;  // sum over the group of x * q, scaled once
        for (int64_t i = gi * p.g; i < (gi + 1) * p.g; ++i) part += x[i] * ScalarWeight(p, o, i);
        acc += part * p.scales[o * p.G + gi];
        if (p.mins) acc += p.mins[o * p.G + gi] * p.xsum[t * p.G + gi];
      }
      p.y[t * p.O + o] = acc;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// AVX2 path. Measured on a 2-core EPYC: one core unpacks and multiplies ~14 G weights/s from cache (4 or
// 8 bits alike: the int->float conversion and FMA dominate), so 4-bit decode is bound by this loop, not
// by memory (~22 GB/s); 8-bit is close to both limits and needs the software prefetch below.
// The inner step takes 16 weights of one row as two float vectors (a, b) and the matching
// 16 x values from xk. For bits=4, 8 packed bytes widen to 8 int32 lanes each holding two nibbles:
// `& 15` gives the even elements, `>> 4` the odd ones, so no byte shuffle is needed if x is stored
// with each 16-block reordered as [x0 x2 .. x14 | x1 x3 .. x15] (PrepareX does that once per call).

#if QMM_AVX2
template <int Bits>
inline void Load16(const uint8_t* row, int64_t i, __m256& a, __m256& b) {
  if constexpr (Bits == 4) {
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + i / 2)));
    a = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
    b = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
  } else {
    a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + i))));
    b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + i + 8))));
  }
}

constexpr int64_t kAhead = 2;  // row blocks to prefetch ahead: 1..8 measured alike, none ~2x slower at 8 bits

inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One token, R rows at once: each x load feeds R rows. Per group, x*q accumulates unscaled and is
// scaled once at the group end (two FMAs per 16 weights); mins enter as mins * sum(x over group).
template <int Bits, int R>
void RowsT1(const Problem& p, int64_t o) {
  const int64_t row_bytes = Bits == 4 ? p.I / 2 : p.I;
  const uint8_t* rows[R];
  __m256 out[R];
  for (int r = 0; r < R; ++r) rows[r] = p.q + (o + r) * row_bytes, out[r] = _mm256_setzero_ps();
  // Software prefetch kAhead row blocks ahead: rows are contiguous, so the block is one byte stream
  // consumed evenly over the groups; the hardware prefetcher alone leaves a single core latency-bound.
  const int64_t chunk = R * row_bytes / p.G;
  const uint8_t* pf = rows[0] + kAhead * R * row_bytes;
  for (int64_t gi = 0; gi < p.G; ++gi) {
    for (int64_t off = gi * chunk; off < (gi + 1) * chunk; off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(pf + off), _MM_HINT_T0);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t i = gi * p.g; i < (gi + 1) * p.g; i += 16) {
      const __m256 xa = _mm256_loadu_ps(p.xk + i), xb = _mm256_loadu_ps(p.xk + i + 8);
      for (int r = 0; r < R; ++r) {
        __m256 a, b;
        Load16<Bits>(rows[r], i, a, b);
        acc[r] = _mm256_fmadd_ps(a, xa, acc[r]);
        acc[r] = _mm256_fmadd_ps(b, xb, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r)
      out[r] = _mm256_fmadd_ps(acc[r], _mm256_set1_ps(p.scales[(o + r) * p.G + gi]), out[r]);
  }
  for (int r = 0; r < R; ++r) {
    float mterm = 0.f;
    if (p.mins)
      for (int64_t gi = 0; gi < p.G; ++gi) mterm += p.mins[(o + r) * p.G + gi] * p.xsum[gi];
    p.y[o + r] = HSum(out[r]) + mterm;
  }
}

// T <= 4: TT tokens (t0 .. t0+TT-1), R rows: each weight is dequantized once in registers (q * s + m) and
// used for all TT tokens. R * TT <= 8 keeps the accumulators in the 16 ymm registers.
template <int Bits, int R, int TT>
void RowsTn(const Problem& p, int64_t o, int64_t t0) {
  const int64_t row_bytes = Bits == 4 ? p.I / 2 : p.I;
  const float* xt = p.xk + t0 * p.I;
  const uint8_t* rows[R];
  __m256 acc[R][TT];
  for (int r = 0; r < R; ++r) {
    rows[r] = p.q + (o + r) * row_bytes;
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_setzero_ps();
  }
  for (int64_t gi = 0; gi < p.G; ++gi) {
    __m256 s[R], m[R];
    for (int r = 0; r < R; ++r) {
      s[r] = _mm256_set1_ps(p.scales[(o + r) * p.G + gi]);
      m[r] = _mm256_set1_ps(p.mins ? p.mins[(o + r) * p.G + gi] : 0.f);
    }
    for (int64_t i = gi * p.g; i < (gi + 1) * p.g; i += 16) {
      for (int r = 0; r < R; ++r) {
        __m256 a, b;
        Load16<Bits>(rows[r], i, a, b);
        a = _mm256_fmadd_ps(a, s[r], m[r]);
        b = _mm256_fmadd_ps(b, s[r], m[r]);
        for (int t = 0; t < TT; ++t) {
          acc[r][t] = _mm256_fmadd_ps(a, _mm256_loadu_ps(xt + t * p.I + i), acc[r][t]);
          acc[r][t] = _mm256_fmadd_ps(b, _mm256_loadu_ps(xt + t * p.I + i + 8), acc[r][t]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) p.y[(t0 + t) * p.O + o + r] = HSum(acc[r][t]);
}

template <int Bits, int R>
void RowsTnAny(const Problem& p, int64_t o, int64_t t0, int64_t tt) {
  switch (tt) {
    case 1: return RowsTn<Bits, R, 1>(p, o, t0);
    case 2: return RowsTn<Bits, R, 2>(p, o, t0);
    case 3: return RowsTn<Bits, R, 3>(p, o, t0);
    default: return RowsTn<Bits, R, 4>(p, o, t0);
  }
}

// T > 4: each tile of kTileRows rows x (up to kMaxChunk) inputs is dequantized ONCE into a float32
// buffer (w = q * s + m, exact float32 as in the reference) that stays in L1/L2, then an FMA
// micro-kernel runs every token against it. Buffer rows are in xk order (bits=4: the even/odd split
// of each 16-block), so x needs no further shuffling. The micro-kernel is dot-product shaped: MR tokens x
// NR rows of vector accumulators over k, one horizontal sum per (token, row) at the end of the chunk.
// Measured on the 2-core EPYC, one core, SmolLM2 shapes (O x I = 3072 x 576, 576 x 1536), 4-bit:
// 24 rows x all of I ~57-77 GFLOP/s at T = 16..256; 256-input chunks (L1-sized tiles, but a horizontal
// sum per chunk) or 48-row tiles were slower. At T <= 4 a weight is used by one token block only, so
// the buffer is pure overhead there and RowsTn (dequantize in registers) stays ~20% faster.
constexpr int64_t kTileRows = 24;    // rows per dequantized tile (multiple of kNR)
constexpr int64_t kMaxChunk = 2048;  // inputs per tile: 24 x 2048 floats = 192 KB, well inside L2
constexpr int kMR = 4, kNR = 3;      // micro-kernel: 4 tokens x 3 rows = 12 accumulators

// Rows [o, o + nr) x inputs [k0, k1) (multiples of 16) -> buf, row r at buf + r * (k1 - k0).
template <int Bits>
void DequantTile(const Problem& p, int64_t o, int64_t nr, int64_t k0, int64_t k1, float* buf) {
  const int64_t row_bytes = Bits == 4 ? p.I / 2 : p.I;
  for (int64_t r = 0; r < nr; ++r) {
    const uint8_t* row = p.q + (o + r) * row_bytes;
    float* dst = buf + r * (k1 - k0) - k0;
    for (int64_t gi = k0 / p.g; gi * p.g < k1; ++gi) {
      const __m256 s = _mm256_set1_ps(p.scales[(o + r) * p.G + gi]);
      const __m256 m = _mm256_set1_ps(p.mins ? p.mins[(o + r) * p.G + gi] : 0.f);
      const int64_t i1 = std::min(k1, (gi + 1) * p.g);
      for (int64_t i = std::max(k0, gi * p.g); i < i1; i += 16) {
        __m256 a, b;
        Load16<Bits>(row, i, a, b);
        _mm256_store_ps(dst + i, _mm256_fmadd_ps(a, s, m));
        _mm256_store_ps(dst + i + 8, _mm256_fmadd_ps(b, s, m));
      }
    }
  }
}

// y[t, r] (+)= sum_k x[t, k] * w[r, k] for MR tokens (x rows ldx apart), NR buffer rows (ldw apart).
template <int MR, int NR>
void Micro(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t kc, float* y, int64_t ldy,
           bool accumulate) {
  __m256 acc[MR][NR];
  for (int t = 0; t < MR; ++t)
    for (int r = 0; r < NR; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; k += 8) {
    __m256 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm256_load_ps(w + r * ldw + k);
    for (int t = 0; t < MR; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * ldx + k);
      for (int r = 0; r < NR; ++r) acc[t][r] = _mm256_fmadd_ps(wv[r], xv, acc[t][r]);
    }
  }
  for (int t = 0; t < MR; ++t)
    for (int r = 0; r < NR; ++r) {
      const float v = HSum(acc[t][r]);
      y[t * ldy + r] = accumulate ? y[t * ldy + r] + v : v;
    }
}

using MicroFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, bool);

template <int MR, int... NRs>
constexpr std::array<MicroFn, sizeof...(NRs)> MicroRow(std::integer_sequence<int, NRs...>) {
  return {&Micro<MR, NRs + 1>...};
}
template <int... MRs>
constexpr std::array<std::array<MicroFn, kNR>, kMR> MicroTable(std::integer_sequence<int, MRs...>) {
  return {MicroRow<MRs + 1>(std::make_integer_sequence<int, kNR>())...};
}
constexpr auto kMicro = MicroTable(std::make_integer_sequence<int, kMR>());  // [MR - 1][NR - 1]

template <int Bits>
void TiledRows(const Problem& p, int64_t o0, int64_t o1) {
  const int64_t n_chunks = (p.I + kMaxChunk - 1) / kMaxChunk;
  const int64_t chunk = (p.I / n_chunks + 15) / 16 * 16;  // I % 16 == 0 here (g % 16 == 0)
  thread_local std::vector<float, AlignedAlloc<float>> tile;
  tile.resize(kTileRows * std::min(chunk, p.I));
  for (int64_t o = o0; o < o1; o += kTileRows) {
    const int64_t nr = std::min(kTileRows, o1 - o);
    for (int64_t k0 = 0; k0 < p.I; k0 += chunk) {
      const int64_t k1 = std::min(p.I, k0 + chunk), kc = k1 - k0;
      DequantTile<Bits>(p, o, nr, k0, k1, tile.data());
      for (int64_t t0 = 0; t0 < p.T; t0 += kMR) {
        const int64_t mr = std::min<int64_t>(kMR, p.T - t0);
        for (int64_t r0 = 0; r0 < nr; r0 += kNR) {
          const int64_t nrr = std::min<int64_t>(kNR, nr - r0);
          kMicro[mr - 1][nrr - 1](p.xk + t0 * p.I + k0, p.I, tile.data() + r0 * kc, kc, kc,
                                  p.y + t0 * p.O + o + r0, p.O, k0 > 0);
        }
      }
    }
  }
}

template <int Bits>
void VectorRows(const Problem& p, int64_t o0, int64_t o1) {
  if (p.T == 1) {
    int64_t o = o0;
    for (; o + 4 <= o1; o += 4) RowsT1<Bits, 4>(p, o);
    for (; o < o1; ++o) RowsT1<Bits, 1>(p, o);
    return;
  }
  if (p.T > 4) return TiledRows<Bits>(p, o0, o1);
  for (int64_t t0 = 0; t0 < p.T; t0 += 4) {
    const int64_t tt = std::min<int64_t>(4, p.T - t0);
    int64_t o = o0;
    for (; o + 2 <= o1; o += 2) RowsTnAny<Bits, 2>(p, o, t0, tt);
    for (; o < o1; ++o) RowsTnAny<Bits, 1>(p, o, t0, tt);
  }
}
#endif  // QMM_AVX2

void RunRows(const Problem& p, int64_t o0, int64_t o1) {
#if QMM_AVX2
  if (p.vector) return p.bits == 4 ? VectorRows<4>(p, o0, o1) : VectorRows<8>(p, o0, o1);
#endif
  ScalarRows(p, o0, o1);
}

// x reordered for the kernels (bits=4: even/odd split inside each 16-block) and per-group sums of x.
void PrepareX(Problem& p, std::vector<float>& scratch) {
  const bool reorder = p.vector && p.bits == 4;
  scratch.resize((reorder ? p.T * p.I : 0) + p.T * p.G);
  float* xsum = scratch.data() + (reorder ? p.T * p.I : 0);
  for (int64_t t = 0; t < p.T; ++t) {
    const float* x = p.x + t * p.I;
    for (int64_t gi = 0; gi < p.G; ++gi) {
      float s = 0.f;
      for (int64_t i = gi * p.g; i < (gi + 1) * p.g; ++i) s += x[i];
      xsum[t * p.G + gi] = s;
    }
    if (reorder) {
      float* xk = scratch.data() + t * p.I;
      for (int64_t blk = 0; blk < p.I; blk += 16)
        for (int j = 0; j < 8; ++j) xk[blk + j] = x[blk + 2 * j], xk[blk + 8 + j] = x[blk + 2 * j + 1];
    }
  }
  p.xk = reorder ? scratch.data() : p.x;
  p.xsum = xsum;
}

// ---------------------------------------------------------------------------------------------------
// float32 weights, y[T, O] = x[T, I] @ W, W either input-major [I, O] (how the model stores its matmul
// weights) or output-major [O, I] (a tied embedding used as the LM head). For a few tokens XLA:CPU's
// dot packs W and costs ~2x a 1-token step at T = 4; here each weight vector loaded into a
// register serves a block of up to 4 tokens, and further blocks take the same rows while they are in
// L1/L2, so a step of a few tokens reads W from memory once.

struct F32Problem {
  const float* x;    // [T, I]
  const float* w;    // [I, O] (input-major) or [O, I] (output-major)
  float* y;          // [T, O]
  int64_t T, I, O;
  bool out_major;    // W is [O, I]
  bool vector;       // AVX2 path
};

// Portable path: y over outputs [o0, o1), all tokens. Input-major streams rows of W (contiguous).
void ScalarF32(const F32Problem& p, int64_t o0, int64_t o1) {
  for (int64_t t = 0; t < p.T; ++t) {
    const float* x = p.x + t * p.I;
    float* y = p.y + t * p.O;
    if (p.out_major) {
      for (int64_t o = o0; o < o1; ++o) {
        float acc = 0.f;
        for (int64_t i = 0; i < p.I; ++i) acc += x[i] * p.w[o * p.I + i];
        y[o] = acc;
      }
      continue;
    }
    for (int64_t o = o0; o < o1; ++o) y[o] = 0.f;
    for (int64_t i = 0; i < p.I; ++i)
      for (int64_t o = o0; o < o1; ++o) y[o] += x[i] * p.w[i * p.O + o];
  }
}

#if QMM_AVX2
// Input-major, TT tokens x 8R columns [o, o + 8R), inputs [i0, i1), accumulated into out [T, O]: per
// input i, R vectors of row i of W, each FMAed with x[t, i] broadcast for the TT tokens.
// Each thread takes whole rows of W (contiguous memory), kSubRows at a time across all of O. With `pf`
// a tile prefetches the same tile kSubRows rows on (what the next sub-block reads). Measured on the
// 2-core EPYC, 30 chained matrices: it helps rows of <= 4 KB at 2-8 tokens (576 x 576 and 1536 x 576
// at T = 4: 10-20% faster), and costs 5-10% at one token and on 12 KB rows (576 x 3072), where the
// hardware prefetcher follows the rows alone.
constexpr int64_t kSubRows = 8;

template <int R, int TT>
void ColsTn(const F32Problem& p, float* out, int64_t o, int64_t t0, int64_t i0, int64_t i1, bool pf) {
  const float* xt = p.x + t0 * p.I;
  float* yt = out + t0 * p.O + o;
  __m256 acc[TT][R];
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_loadu_ps(yt + t * p.O + 8 * r);
  const float* wi = p.w + i0 * p.O + o;
  for (int64_t i = i0; i < i1; ++i, wi += p.O) {
    if (pf && i + kSubRows < p.I)
      for (int r = 0; r < R; r += 2)
        _mm_prefetch(reinterpret_cast<const char*>(wi + kSubRows * p.O + 8 * r), _MM_HINT_T0);
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_ps(wi + 8 * r);
    for (int t = 0; t < TT; ++t) {
      const __m256 xb = _mm256_broadcast_ss(xt + t * p.I + i);
      for (int r = 0; r < R; ++r) acc[t][r] = _mm256_fmadd_ps(xb, wv[r], acc[t][r]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(yt + t * p.O + 8 * r, acc[t][r]);
}

// Inputs [i0, i1) of every output, added into out [T, O]; every 4-token block of a sub-block in turn.
// Tiles of 32 columns for up to 2 tokens (4 accumulator chains at one token), 16 for 3-4 (R * TT <= 8
// accumulators in the 16 ymm registers).
void ColsF32(const F32Problem& p, float* out, int64_t i0, int64_t i1) {
  const int64_t o_vec = p.O / 8 * 8;
  const bool pf = p.T > 1 && p.O * sizeof(float) <= 4096;
  for (int64_t s0 = i0; s0 < i1; s0 += kSubRows) {
    const int64_t s1 = std::min(i1, s0 + kSubRows);
    for (int64_t t0 = 0; t0 < p.T; t0 += 4) {
      const int64_t tt = std::min<int64_t>(4, p.T - t0);
      int64_t o = 0;
      switch (tt) {
        case 1: for (; o + 32 <= o_vec; o += 32) ColsTn<4, 1>(p, out, o, t0, s0, s1, pf); break;
        case 2: for (; o + 32 <= o_vec; o += 32) ColsTn<4, 2>(p, out, o, t0, s0, s1, pf); break;
        case 3: for (; o + 16 <= o_vec; o += 16) ColsTn<2, 3>(p, out, o, t0, s0, s1, pf); break;
        default: for (; o + 16 <= o_vec; o += 16) ColsTn<2, 4>(p, out, o, t0, s0, s1, pf); break;
      }
      for (; o < o_vec; o += 8) {
        switch (tt) {
          case 1: ColsTn<1, 1>(p, out, o, t0, s0, s1, pf); break;
          case 2: ColsTn<1, 2>(p, out, o, t0, s0, s1, pf); break;
          case 3: ColsTn<1, 3>(p, out, o, t0, s0, s1, pf); break;
          default: ColsTn<1, 4>(p, out, o, t0, s0, s1, pf); break;
        }
      }
    }
  }
  for (int64_t t = 0; t < p.T; ++t)  // the last O % 8 columns
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t o = o_vec; o < p.O; ++o) out[t * p.O + o] += p.x[t * p.I + i] * p.w[i * p.O + o];
}

// Output-major: R rows of W x TT tokens, dot-product shaped (as RowsTn without the dequantization).
template <int R, int TT>
void RowsF32Tn(const F32Problem& p, int64_t o, int64_t t0) {
  const float* xt = p.x + t0 * p.I;
  const float* rows[R];
  __m256 acc[R][TT];
  for (int r = 0; r < R; ++r) {
    rows[r] = p.w + (o + r) * p.I;
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_setzero_ps();
  }
  const float* pf = rows[0] + 8 * R * p.I;  // 8 row blocks ahead (2 measured ~5% slower)
  const int64_t i_vec = p.I / 8 * 8;
  for (int64_t i = 0; i < i_vec; i += 8) {
    if ((i & 15) == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(pf + r * p.I + i), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_loadu_ps(rows[r] + i);
      for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xt + t * p.I + i), acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) {
      float v = HSum(acc[r][t]);
      for (int64_t i = i_vec; i < p.I; ++i) v += xt[t * p.I + i] * rows[r][i];
      p.y[(t0 + t) * p.O + o + r] = v;
    }
}

// R rows x TT tokens, R * TT <= 8 accumulators: tt up to 8 / R (callers keep to it).
template <int R>
void RowsF32TnAny(const F32Problem& p, int64_t o, int64_t t0, int64_t tt) {
  if (tt == 1) return RowsF32Tn<R, 1>(p, o, t0);
  if constexpr (R <= 4)
    if (tt == 2) return RowsF32Tn<R, 2>(p, o, t0);
  if constexpr (R <= 2) {
    if (tt == 3) return RowsF32Tn<R, 3>(p, o, t0);
    return RowsF32Tn<R, 4>(p, o, t0);
  }
}

// Groups of R rows from o, every token block of a group while its rows are in L1.
template <int R>
void RowGroupsF32(const F32Problem& p, int64_t& o, int64_t o1) {
  for (; o + R <= o1; o += R)
    for (int64_t t0 = 0; t0 < p.T; t0 += 4) RowsF32TnAny<R>(p, o, t0, std::min<int64_t>(4, p.T - t0));
}

// 8 rows at one token (at 4 rows it took ~6% longer than XLA's dot on the 49152 x 576 LM head), 4 rows
// at 2 tokens, else 2.
void RowsF32(const F32Problem& p, int64_t o0, int64_t o1) {
  int64_t o = o0;
  if (p.T == 1) RowGroupsF32<8>(p, o, o1);
  if (p.T <= 2) RowGroupsF32<4>(p, o, o1);
  RowGroupsF32<2>(p, o, o1);
  RowGroupsF32<1>(p, o, o1);
}
#endif  // QMM_AVX2

void RunRows(const F32Problem& p, int64_t o0, int64_t o1) {
#if QMM_AVX2
  if (p.vector) return RowsF32(p, o0, o1);  // output-major (input-major runs RunInputChunks)
#endif
  ScalarF32(p, o0, o1);
}

// ---------------------------------------------------------------------------------------------------
// Threading. Work is cut into chunks that threads claim from an atomic counter, so a thread slowed
// by another process simply claims fewer. The calling thread always works too and only waits for
// chunks already claimed (being computed), never for a helper that has not started: no deadlock if
// the pool is busy or runs tasks late, and a late helper finds nothing left and exits. The job lives
// in a shared_ptr because such a late helper may touch it after the call has returned (`run` is
// only called for a claimed chunk, so it may refer to the caller's stack).

struct Job {
  int64_t n_chunks;
  std::function<void(int64_t chunk, int64_t who)> run;  // who: 0 = the caller, 1.. the helpers
  std::atomic<int64_t> next{0}, done{0}, arrived{0};

  void Work(bool caller) {
    const int64_t who = caller ? 0 : 1 + arrived.fetch_add(1, std::memory_order_relaxed);
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < n_chunks;) {
      run(c, who);
      done.fetch_add(1, std::memory_order_release);
    }
  }
  // Waits for chunks other threads hold. Spins briefly (a chunk takes microseconds), then yields: on a
  // machine shared with other processes the holder may be preempted, and spinning would keep it off.
  void WaitDone() {
    for (int spins = 0; done.load(std::memory_order_acquire) < n_chunks; ++spins) {
      if (spins < 4096) {
#if QMM_AVX2
        _mm_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }
};

// Threads to use: below ~256K multiply-adds (tens of microseconds) handing work to another thread costs
// more than it saves.
int64_t Threads(ffi::ThreadPool& xla_pool, int64_t macs, int64_t pool) {
  return pool == 0 && macs >= (1 << 18) ? std::max<int64_t>(1, xla_pool.num_threads()) : 1;
}

// Runs chunks 0 .. n_chunks - 1 on the caller and up to threads - 1 helpers.
void RunJob(ffi::ThreadPool& xla_pool, int64_t threads, int64_t n_chunks,
            std::function<void(int64_t, int64_t)> run) {
  auto job = std::make_shared<Job>();
  job->n_chunks = n_chunks;
  job->run = std::move(run);
  const int64_t helpers = std::min(threads, n_chunks) - 1;
  for (int64_t k = 0; k < helpers; ++k) xla_pool.Schedule([job] { job->Work(false); });
  job->Work(true);
  job->WaitDone();
}

// Splits outputs [0, O) into chunks of whole `unit`s: ~8 chunks per thread, fine enough to rebalance
// around a busy core, coarse enough that each chunk streams a good run of rows.
template <typename P>
void RunOutputChunks(ffi::ThreadPool& xla_pool, const P& p, int64_t threads, int64_t unit) {
  const int64_t rows_per_chunk = std::max<int64_t>(unit, (p.O / (8 * threads) + unit - 1) / unit * unit);
  RunJob(xla_pool, threads, (p.O + rows_per_chunk - 1) / rows_per_chunk, [&p, rows_per_chunk](int64_t c, int64_t) {
    RunRows(p, c * rows_per_chunk, std::min(p.O, (c + 1) * rows_per_chunk));
  });
}

#if QMM_AVX2
// Input-major float32 W on AVX2: chunks of whole rows of W (inputs), each thread summing into its own
// [T, O] (the caller's is y), added into y at the end.
void RunInputChunks(ffi::ThreadPool& xla_pool, const F32Problem& p, int64_t threads) {
  const int64_t rows_per_chunk = std::max<int64_t>(kSubRows, (p.I / (8 * threads) + kSubRows - 1) / kSubRows * kSubRows);
  const int64_t n_chunks = (p.I + rows_per_chunk - 1) / rows_per_chunk;
  threads = std::min(threads, n_chunks);
  const int64_t size = p.T * p.O;
  std::vector<float> part((threads - 1) * size);
  std::vector<char> used(threads, 0);
  std::fill(p.y, p.y + size, 0.f);
  RunJob(xla_pool, threads, n_chunks, [&](int64_t c, int64_t who) {
    float* out = who == 0 ? p.y : part.data() + (who - 1) * size;
    if (!used[who]) {
      if (who) std::fill(out, out + size, 0.f);
      used[who] = 1;
    }
    ColsF32(p, out, c * rows_per_chunk, std::min(p.I, (c + 1) * rows_per_chunk));
  });
  for (int64_t k = 1; k < threads; ++k)
    if (used[k])
      for (int64_t j = 0; j < size; ++j) p.y[j] += part[(k - 1) * size + j];
}
#endif  // QMM_AVX2

// ---------------------------------------------------------------------------------------------------
// FFI handler.

ffi::Error Check(bool ok, const char* what) {
  return ok ? ffi::Error::Success() : ffi::Error::InvalidArgument(std::string("cpu_qmatmul: ") + what);
}

// pool: 0 = XLA's intra-op thread pool (the caller plus num_threads - 1 helper tasks), 1 = caller only.
// portable: run the plain loops even where AVX2 is compiled in (tests cover that path this way).
ffi::Error QMatmulImpl(ffi::ThreadPool xla_pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q,
                       ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> mins,
                       ffi::ResultBuffer<ffi::F32> y, int64_t bits, int64_t group_size, bool has_mins,
                       int64_t pool, bool portable) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = scales.dimensions();
  if (auto e = Check(xd.size() == 2 && qd.size() == 2 && sd.size() == 2, "x, q, scales must be 2-D");
      e.failure())
    return e;
  Problem p{};
  p.T = xd[0], p.I = xd[1], p.O = qd[0], p.g = group_size, p.bits = static_cast<int>(bits);
  p.G = p.g > 0 ? p.I / p.g : 0;
  const auto qtype = bits == 4 ? ffi::DataType::U8 : ffi::DataType::S8;
  if (auto e = Check(bits == 4 || bits == 8, "bits must be 4 or 8"); e.failure()) return e;
  if (auto e = Check(q.element_type() == qtype, "q must be uint8 (bits=4) or int8 (bits=8)"); e.failure())
    return e;
  if (auto e = Check(p.g > 0 && p.I % p.g == 0 && qd[1] == (bits == 4 ? p.I / 2 : p.I) &&
                         (bits == 8 || p.I % 2 == 0) && sd[0] == p.O && sd[1] == p.G,
                     "inconsistent shapes");
      e.failure())
    return e;
  if (has_mins) {
    auto md = mins.dimensions();
    if (auto e = Check(md.size() == 2 && md[0] == p.O && md[1] == p.G, "mins shape"); e.failure()) return e;
  }
  p.x = x.typed_data();
  p.q = static_cast<const uint8_t*>(q.untyped_data());
  p.scales = scales.typed_data();
  p.mins = has_mins ? mins.typed_data() : nullptr;
  p.y = y->typed_data();
  p.vector = QMM_AVX2 && !portable && p.g % 16 == 0;
  if (p.T == 0 || p.O == 0) return ffi::Error::Success();

  thread_local std::vector<float> scratch;  // the caller outlives every chunk of its job
  PrepareX(p, scratch);

  // T > 4 chunks are whole dequantized tiles (kTileRows = 24 rows); else multiples of 16 rows.
  RunOutputChunks(xla_pool, p, Threads(xla_pool, p.T * p.O * p.I, pool), p.T > 4 ? 24 : 16);
  return ffi::Error::Success();
}

ffi::Error F32MatmulImpl(ffi::ThreadPool xla_pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::ResultBuffer<ffi::F32> y, bool out_major, int64_t pool, bool portable) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (auto e = Check(xd.size() == 2 && wd.size() == 2, "x, w must be 2-D"); e.failure()) return e;
  F32Problem p{};
  p.T = xd[0], p.I = xd[1], p.O = out_major ? wd[0] : wd[1];
  if (auto e = Check((out_major ? wd[1] : wd[0]) == p.I, "inconsistent shapes"); e.failure()) return e;
  p.x = x.typed_data(), p.w = w.typed_data(), p.y = y->typed_data();
  p.out_major = out_major;
  p.vector = QMM_AVX2 && !portable;
  if (p.T == 0 || p.O == 0) return ffi::Error::Success();
  const int64_t threads = Threads(xla_pool, p.T * p.O * p.I, pool);
  if (p.vector && !p.out_major) {
#if QMM_AVX2
    RunInputChunks(xla_pool, p, threads);
#endif
  } else {
    RunOutputChunks(xla_pool, p, threads, 16);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferCpuQMatmul, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [T, I]
                                  .Arg<ffi::AnyBuffer>()         // q [O, I/2] u8 or [O, I] s8
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scales [O, G]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mins [O, G] (ignored without has_mins)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [T, O]
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<bool>("has_mins")
                                  .Attr<int64_t>("pool")
                                  .Attr<bool>("portable"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferCpuF32Matmul, F32MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [T, I]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [I, O], or [O, I] with out_major
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [T, O]
                                  .Attr<bool>("out_major")
                                  .Attr<int64_t>("pool")
                                  .Attr<bool>("portable"));

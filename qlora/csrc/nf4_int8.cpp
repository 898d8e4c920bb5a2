// NF4 decoding with int8 dot products, and a bfloat16 GEMV for the output layer.
//
// qlora/int8_decode.py prepares everything this file reads and holds the pure-PyTorch reference
// of the same arithmetic; the formulas below are the ones it states.
//
// Weights (repacked once from the NF4 bytes, see int8_decode.repack): W [N, K], N % 4 == 0,
// K % 64 == 0. Output rows are taken four at a time (a "group" g: rows 4g..4g+3) and K in blocks
// of 32 (block j: k = 32j..32j+31). For each (g, j) 64 bytes; byte 16r + p (r = 0..3, p = 0..15)
// holds the 4-bit code of W[4g+r, 32j+p] in its low nibble and of W[4g+r, 32j+16+p] in its high
// nibble. One scale per (row, 64 weights), float16:
//
//     scale[g, s, r] = fp16(absmax(row 4g+r, k = 64s..64s+63) * 2^e / 127)
//
// (e: one exponent per weight that keeps every scale in float16's normal range; the output is
// multiplied by out_scale = 2^-e, exactly). scales are [N/4, S_pad, 4], S = K/64 padded with
// zeros to a multiple of 4 (S_pad), so four superblocks' scales are one 32-byte load.
//
// The 16 NF4 levels as int8: T[q] = round(127 NF4_CODE[q]), in [-127, 127].
//
// Activations, per input row m and block j of 32:
//
//     amax_j = max |x_k|,  dx_j = amax_j / 127,  xq_k = round_even(x_k * (127 / amax_j))
//
// (xq in [-127, 127]; a zero block gives xq = 0, dx = 0). Then, for output row n = 4g + r,
// "lane" c = 0..3 of block j holds the exact integer
//
//     D[j, c] = sum_{b<4} T[lo(16r+4c+b)] xq[32j+4c+b] + T[hi(16r+4c+b)] xq[32j+16+4c+b]
//
// and the output is, in float32 with fused multiply-adds:
//
//     acc[j&1][c] = fma(float(D[j, c]), scale[g, j/2, r] * dx_j, acc[j&1][c])   (j = 0, 1, ...)
//     l_c         = acc[0][c] + acc[1][c]
//     y[m, n]     = ((l_0 + l_1) + (l_2 + l_3)) * out_scale  (+ bias[n])
//
// Every code path computes exactly these operations in this order, so the three builds give
// the same bits, and the reference reproduces them.
//
// Code paths (QLORA_ISA): 3 = AVX-512 with VNNI: one byte shuffle looks up 64 codes, vpdpbusd
// sums four u8 x s8 products per 32-bit lane; the table is stored as T + 128 (unsigned), so
// each lane starts from -128 * (the sum of its eight xq) and ends at D exactly. 2 = AVX2:
// vpmaddubsw on |T| and xq carrying T's sign (pairs <= 2 * 127 * 127, no saturation), then
// vpmaddwd with ones. 0 = scalar C++.
//
// gemv_bf16: y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) for bfloat16 x and w, float32 sums:
// AVX-512 BF16's vdpbf16ps where the CPU has it, else the weights widened to float32 (exact) and
// fused multiply-adds. Its sum order differs from torch's, so it matches F.linear to float32
// rounding, not bit for bit.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#ifndef QLORA_ISA
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define QLORA_ISA 3
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QLORA_ISA 2
#else
#define QLORA_ISA 0
#endif
#endif

#if QLORA_ISA == 3 && !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__))
#error "QLORA_ISA=3 needs AVX-512F, AVX-512BW and AVX-512 VNNI (-march=native on such a CPU)"
#endif
#if QLORA_ISA == 2 && !(defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#error "QLORA_ISA=2 needs AVX2, FMA and F16C"
#endif
#if QLORA_ISA != 0 && QLORA_ISA != 2 && QLORA_ISA != 3
#error "QLORA_ISA must be 0 (scalar), 2 (AVX2) or 3 (AVX-512 VNNI)"
#endif
#if QLORA_ISA != 0
#include <immintrin.h>
#endif

#ifndef QLORA_NAMESPACE
#define QLORA_NAMESPACE qlora_int8
#endif

// Bytes of repacked codes ahead of the current block to prefetch (each thread reads one
// contiguous range; the hardware prefetcher alone falls behind DRAM at this decode rate).
#ifndef QLORA_PREFETCH
#define QLORA_PREFETCH 4096
#endif

namespace {

constexpr int kRows = 4;     // output rows per group
constexpr int kBlock = 32;   // activation block (and half a scale block)
constexpr int kMaxTile = 4;  // input rows that share one decode of the weights

inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float32 -> bfloat16 bits, round to nearest even; NaN -> 0xFFFF (torch's CPU conversion)
inline uint16_t bf16_bits(float f) {
  if (f != f) return 0xFFFF;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// One input row, quantized: xq [K] int8, dx [K/32], and (VNNI) the lane corrections
// corr [K/32][4] = -128 * (sum of the eight xq lane c multiplies).
struct XRow {
  const int8_t* xq;
  const float* dx;
  const int32_t* corr;
};

struct Args {
  const uint8_t* codes;    // [N/4][K/32][64]
  const uint16_t* scales;  // [N/4][S_pad][4] float16 bits
  int64_t K, J, S, S_pad;  // J = K/32 blocks, S = K/64 superblocks
  int8_t table[16];        // T
};

// Quantize x[m] (float32 or bfloat16 bits) into xq/dx/corr. False if the row holds a value that
// is not finite or a block whose largest magnitude is below 1e-30 (127 / amax would overflow):
// the caller then returns no result and Python takes the exact path.
template <typename In>
bool quantize_row(const In* x, int64_t K, int8_t* xq, float* dx, int32_t* corr) {
  for (int64_t j = 0; j < K / kBlock; ++j) {
    float v[kBlock];
    float amax = 0.0f;
    for (int i = 0; i < kBlock; ++i) {
      if constexpr (sizeof(In) == 2)
        v[i] = bf16_to_float(x[j * kBlock + i]);
      else
        v[i] = x[j * kBlock + i];
      amax = std::max(amax, std::fabs(v[i]));
    }
    if (!std::isfinite(amax) || (amax > 0.0f && amax < 1e-30f)) return false;
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    dx[j] = amax / 127.0f;
    for (int i = 0; i < kBlock; ++i) {
      const float r = std::nearbyint(v[i] * inv);  // round half to even (default mode)
      xq[j * kBlock + i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
    }
    for (int c = 0; c < 4; ++c) {
      int32_t s = 0;
      for (int b = 0; b < 4; ++b) s += xq[j * kBlock + 4 * c + b] + xq[j * kBlock + 16 + 4 * c + b];
      corr[j * 4 + c] = -128 * s;
    }
  }
  return true;
}

// Row m of x [M, K] (float32 or bfloat16) quantized into xq [K], dx [K / 32] and corr
// [K / 32 * 4] by quantize_row; false when the row declines.
inline bool quantize_x_row(const at::Tensor& x, int64_t m, int8_t* xq, float* dx, int32_t* corr) {
  const int64_t K = x.size(1);
  if (x.scalar_type() == at::kBFloat16)
    return quantize_row(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + m * K, K, xq,
                        dx, corr);
  return quantize_row(x.data_ptr<float>() + m * K, K, xq, dx, corr);
}

// The bias [N] (float32 or bfloat16), read as float32; empty when there is none.
struct Bias {
  const float* f32 = nullptr;
  const uint16_t* bf16 = nullptr;
  bool empty() const { return f32 == nullptr && bf16 == nullptr; }
  float operator[](int64_t n) const { return bf16 != nullptr ? bf16_to_float(bf16[n]) : f32[n]; }
};

inline Bias bias_view(const std::optional<at::Tensor>& bias, int64_t N) {
  Bias b;
  if (!bias.has_value()) return b;
  TORCH_CHECK(bias->numel() == N && bias->is_contiguous(), "bias must be contiguous [N]");
  if (bias->scalar_type() == at::kFloat) {
    b.f32 = bias->data_ptr<float>();
  } else {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16, "bias must be float32 or bfloat16");
    b.bf16 = reinterpret_cast<const uint16_t*>(bias->data_ptr<at::BFloat16>());
  }
  return b;
}

// y[r * MT + m] for the four rows of group g and MT input rows: the formula at the top.
#if QLORA_ISA == 3
template <int MT>
void group_dot(const Args& a, int64_t g, const XRow* xr, float* y) {
  const uint8_t* codes = a.codes + g * a.J * 64;
  const uint16_t* sc = a.scales + g * a.S_pad * 4;
  __m128i t16;
  {
    uint8_t u[16];
    for (int i = 0; i < 16; ++i) u[i] = static_cast<uint8_t>(a.table[i] + 128);
    t16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u));
  }
  // the table in all four 128-bit lanes: vpshufb looks up within a lane; vpermb (VBMI) reads 6
  // index bits, and the repetition makes bits 4-5 irrelevant, so its nibbles need no mask
  const __m512i table = _mm512_broadcast_i32x4(t16);
#if !defined(__AVX512VBMI__)
  const __m512i low4 = _mm512_set1_epi8(0x0F);
#endif
  __m512 acc0[MT], acc1[MT];
  for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  const __m512i quarter = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  for (int64_t s0 = 0; s0 < a.S; s0 += 4) {
    // lanes 4i + r: the scale of row r, superblock s0 + i
    const __m512 s16 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + s0 * 4)));
    const int n = static_cast<int>(std::min<int64_t>(4, a.S - s0));
    for (int i = 0; i < n; ++i) {
      // lane 4r + c: row r's scale
      const __m512 sv = _mm512_permutexvar_ps(_mm512_add_epi32(quarter, _mm512_set1_epi32(4 * i)), s16);
      const int64_t j = 2 * (s0 + i);
      const uint8_t* p = codes + j * 64;
      _mm_prefetch(reinterpret_cast<const char*>(p + QLORA_PREFETCH), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p + QLORA_PREFETCH + 64), _MM_HINT_T0);
      const __m512i v0 = _mm512_loadu_si512(p);
      const __m512i v1 = _mm512_loadu_si512(p + 64);
#if defined(__AVX512VBMI__)
      const __m512i lo0 = _mm512_permutexvar_epi8(v0, table);
      const __m512i hi0 = _mm512_permutexvar_epi8(_mm512_srli_epi16(v0, 4), table);
      const __m512i lo1 = _mm512_permutexvar_epi8(v1, table);
      const __m512i hi1 = _mm512_permutexvar_epi8(_mm512_srli_epi16(v1, 4), table);
#else
      const __m512i lo0 = _mm512_shuffle_epi8(table, _mm512_and_si512(v0, low4));
      const __m512i hi0 = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(v0, 4), low4));
      const __m512i lo1 = _mm512_shuffle_epi8(table, _mm512_and_si512(v1, low4));
      const __m512i hi1 = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(v1, 4), low4));
#endif
      for (int m = 0; m < MT; ++m) {
        const int8_t* xq = xr[m].xq + j * kBlock;
        auto bcast = [](const void* q) {
          return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
        };
        __m512i d0 = bcast(xr[m].corr + j * 4);
        d0 = _mm512_dpbusd_epi32(d0, lo0, bcast(xq));
        d0 = _mm512_dpbusd_epi32(d0, hi0, bcast(xq + 16));
        __m512i d1 = bcast(xr[m].corr + j * 4 + 4);
        d1 = _mm512_dpbusd_epi32(d1, lo1, bcast(xq + 32));
        d1 = _mm512_dpbusd_epi32(d1, hi1, bcast(xq + 48));
        const __m512 f0 = _mm512_mul_ps(sv, _mm512_set1_ps(xr[m].dx[j]));
        const __m512 f1 = _mm512_mul_ps(sv, _mm512_set1_ps(xr[m].dx[j + 1]));
        acc0[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), f0, acc0[m]);
        acc1[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), f1, acc1[m]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    __m512 t = _mm512_add_ps(acc0[m], acc1[m]);
    t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));  // (l0 + l1), (l2 + l3)
    t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));  // (l0 + l1) + (l2 + l3) in lane 4r
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, t);
    for (int r = 0; r < kRows; ++r) y[r * MT + m] = lanes[4 * r];
  }
}
constexpr int kTile = 4;

#elif QLORA_ISA == 2
template <int MT>
void group_dot(const Args& a, int64_t g, const XRow* xr, float* y) {
  const uint8_t* codes = a.codes + g * a.J * 64;
  const uint16_t* sc = a.scales + g * a.S_pad * 4;
  const __m256i table =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.table)));
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  // acc[h][parity][m]: h = rows 0-1 / rows 2-3, lane 4 (r % 2) + c
  __m256 acc[2][2][MT];
  for (int h = 0; h < 2; ++h)
    for (int m = 0; m < MT; ++m) acc[h][0][m] = acc[h][1][m] = _mm256_setzero_ps();
  const __m256i half0 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const __m256i half1 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
  for (int64_t s = 0; s < a.S; ++s) {
    const __m256 s4 = _mm256_castps128_ps256(
        _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + s * 4))));
    const __m256 sv[2] = {_mm256_permutevar8x32_ps(s4, half0), _mm256_permutevar8x32_ps(s4, half1)};
    for (int par = 0; par < 2; ++par) {
      const int64_t j = 2 * s + par;
      const uint8_t* p = codes + j * 64;
      _mm_prefetch(reinterpret_cast<const char*>(p + QLORA_PREFETCH), _MM_HINT_T0);
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * h));
        const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(v, low4));
        const __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
        const __m256i alo = _mm256_sign_epi8(lo, lo), ahi = _mm256_sign_epi8(hi, hi);  // |T|
        for (int m = 0; m < MT; ++m) {
          const int8_t* xq = xr[m].xq + j * kBlock;
          const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq)));
          const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + 16)));
          const __m256i pl = _mm256_madd_epi16(_mm256_maddubs_epi16(alo, _mm256_sign_epi8(xl, lo)), ones);
          const __m256i ph = _mm256_madd_epi16(_mm256_maddubs_epi16(ahi, _mm256_sign_epi8(xh, hi)), ones);
          const __m256 f = _mm256_mul_ps(sv[h], _mm256_set1_ps(xr[m].dx[j]));
          acc[h][par][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(pl, ph)), f, acc[h][par][m]);
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int h = 0; h < 2; ++h) {
      __m256 t = _mm256_add_ps(acc[h][0][m], acc[h][1][m]);
      t = _mm256_add_ps(t, _mm256_permute_ps(t, 0xB1));
      t = _mm256_add_ps(t, _mm256_permute_ps(t, 0x4E));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, t);
      y[(2 * h) * MT + m] = lanes[0];
      y[(2 * h + 1) * MT + m] = lanes[4];
    }
}
constexpr int kTile = 2;

#else
template <int MT>
void group_dot(const Args& a, int64_t g, const XRow* xr, float* y) {
  const uint8_t* codes = a.codes + g * a.J * 64;
  const uint16_t* sc = a.scales + g * a.S_pad * 4;
  for (int m = 0; m < MT; ++m) {
    for (int r = 0; r < kRows; ++r) {
      float acc[2][4] = {};
      for (int64_t j = 0; j < a.J; ++j) {
        const uint8_t* p = codes + j * 64 + 16 * r;
        const int8_t* xq = xr[m].xq + j * kBlock;
        const float f = half_to_float(sc[(j / 2) * 4 + r]) * xr[m].dx[j];
        for (int c = 0; c < 4; ++c) {
          int32_t d = 0;
          for (int b = 0; b < 4; ++b) {
            const uint8_t byte = p[4 * c + b];
            d += a.table[byte & 0xF] * xq[4 * c + b] + a.table[byte >> 4] * xq[16 + 4 * c + b];
          }
          acc[j & 1][c] = std::fma(static_cast<float>(d), f, acc[j & 1][c]);
        }
      }
      float l[4];
      for (int c = 0; c < 4; ++c) l[c] = acc[0][c] + acc[1][c];
      y[r * MT + m] = (l[0] + l[1]) + (l[2] + l[3]);
    }
  }
}
constexpr int kTile = 4;
#endif

using GroupFn = void (*)(const Args&, int64_t, const XRow*, float*);

// out [M, N] = the formula at the top for x [M, K] (float32 or bfloat16); float32, or rounded
// once to bfloat16 if bf16_out. A 0-element result: x holds a value the quantization does not
// take (not finite, or a block below 1e-30): the caller takes the exact path.
at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                       const at::Tensor& table, int64_t out_features, double out_scale,
                       const std::optional<at::Tensor>& bias, bool bf16_out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be contiguous 2-D CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  TORCH_CHECK(K % 64 == 0 && N % kRows == 0, "K must be a multiple of 64 and N of 4, got ", K, ", ", N);
  const int64_t G = N / kRows, J = K / kBlock, S = K / 64, S_pad = (S + 3) / 4 * 4;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() == G * J * 64,
              "codes must be contiguous uint8 of N K / 2 bytes");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.numel() == G * S_pad * 4,
              "scales must be contiguous float16 [N/4, S_pad, 4]");
  TORCH_CHECK(table.scalar_type() == at::kChar && table.numel() == 16, "table must be int8 [16]");
  const Bias b = bias_view(bias, N);
  Args a{};
  a.codes = codes.data_ptr<uint8_t>();
  a.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  a.K = K;
  a.J = J;
  a.S = S;
  a.S_pad = S_pad;
  std::memcpy(a.table, table.data_ptr<int8_t>(), 16);

  // the quantized activations, once per call (64-byte aligned buffers from a tensor)
  at::Tensor xq_t = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor dx_t = at::empty({M, J}, x.options().dtype(at::kFloat));
  at::Tensor corr_t = at::empty({M, J * 4}, x.options().dtype(at::kInt));
  int8_t* xq = xq_t.data_ptr<int8_t>();
  float* dx = dx_t.data_ptr<float>();
  int32_t* corr = corr_t.data_ptr<int32_t>();
  for (int64_t m = 0; m < M; ++m)
    if (!quantize_x_row(x, m, xq + m * K, dx + m * J, corr + m * J * 4))
      return at::empty({0}, x.options().dtype(at::kFloat));
  at::Tensor out = at::empty({M, N}, x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  if (M == 0 || N == 0) return out;
  float* y_f32 = bf16_out ? nullptr : out.data_ptr<float>();
  uint16_t* y_bf16 = bf16_out ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  const GroupFn fns[5] = {nullptr, group_dot<1>, group_dot<2>, kTile >= 3 ? group_dot<3> : nullptr,
                          kTile >= 4 ? group_dot<4> : nullptr};
  const float post = static_cast<float>(out_scale);
  const int64_t grain = std::max<int64_t>(1, 16384 / K);  // groups per task: >= 64k weights
  at::parallel_for(0, G, grain, [&](int64_t begin, int64_t end) {
    XRow xr[kMaxTile];
    float yt[kRows * kMaxTile];
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t m0 = 0; m0 < M; m0 += kTile) {
        const int mt = static_cast<int>(std::min<int64_t>(kTile, M - m0));
        for (int m = 0; m < mt; ++m)
          xr[m] = {xq + (m0 + m) * K, dx + (m0 + m) * J, corr + (m0 + m) * J * 4};
        fns[mt](a, g, xr, yt);
        for (int r = 0; r < kRows; ++r) {
          const int64_t n = g * kRows + r;
          for (int m = 0; m < mt; ++m) {
            float v = yt[r * mt + m] * post;
            if (!b.empty()) v += b[n];
            const int64_t at = (m0 + m) * N + n;
            if (bf16_out)
              y_bf16[at] = bf16_bits(v);
            else
              y_f32[at] = v;
          }
        }
      }
    }
  });
  return out;
}

// (xq int8 [M, K], dx float32 [M, K/32]) of float32/bfloat16 x [M, K], K % 32 == 0: the
// quantization int8_matmul applies, for tests. Empty tensors where int8_matmul declines.
std::vector<at::Tensor> quantize_activations(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % kBlock == 0, "x: contiguous [M, K], K % 32 == 0");
  const int64_t M = x.size(0), K = x.size(1), J = K / kBlock;
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor dx = at::empty({M, J}, x.options().dtype(at::kFloat));
  std::vector<int32_t> corr(J * 4);
  for (int64_t m = 0; m < M; ++m)
    if (!quantize_x_row(x, m, xq.data_ptr<int8_t>() + m * K, dx.data_ptr<float>() + m * J, corr.data()))
      return {at::empty({0}, xq.options()), at::empty({0}, dx.options())};
  return {xq, dx};
}

// ---------------------------------------------------------------------------------------------
// bfloat16 GEMV
// ---------------------------------------------------------------------------------------------

constexpr int kGemvRows = 4;  // weight rows per step: one x load serves four rows
constexpr int kGemvTile = 4;  // input rows per pass over a weight row group

// y[m][r] for rows n0..n0+R-1 of w and input rows x_rows[0..MT-1], all bfloat16 bits.
template <int R, int MT>
void gemv_rows(const uint16_t* w, int64_t K, const uint16_t* const* x_rows, float* y) {
#if QLORA_ISA == 3
  __m512 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
    __m512i wv[R], xv[MT];
    for (int r = 0; r < R; ++r) {
      // the same columns of the next group of rows: one group ahead in the order we read
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * K + k), _MM_HINT_T0);
      wv[r] = _mm512_maskz_loadu_epi16(mask, w + r * K + k);
    }
    for (int m = 0; m < MT; ++m) xv[m] = _mm512_maskz_loadu_epi16(mask, x_rows[m] + k);
#if defined(__AVX512BF16__)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m)
        acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv[r], (__m512bh)xv[m]);
#else
    // bfloat16 -> float32 is a 16-bit shift: even elements << 16, odd elements masked
    const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int m = 0; m < MT; ++m) {
      const __m512 xe = _mm512_castsi512_ps(_mm512_slli_epi32(xv[m], 16));
      const __m512 xo = _mm512_castsi512_ps(_mm512_and_si512(xv[m], hi_mask));
      for (int r = 0; r < R; ++r) {
        const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(wv[r], 16));
        const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(wv[r], hi_mask));
        acc[r][m] = _mm512_fmadd_ps(we, xe, _mm512_fmadd_ps(wo, xo, acc[r][m]));
      }
    }
#endif
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) y[r * MT + m] = _mm512_reduce_add_ps(acc[r][m]);
#elif QLORA_ISA == 2
  __m256 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256i wv[R];
    for (int r = 0; r < R; ++r) {
      if (k % 32 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * K + k), _MM_HINT_T0);
      wv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k));
    }
    for (int m = 0; m < MT; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_rows[m] + k));
      const __m256 xe = _mm256_castsi256_ps(_mm256_slli_epi32(xv, 16));
      const __m256 xo = _mm256_castsi256_ps(_mm256_and_si256(xv, hi_mask));
      for (int r = 0; r < R; ++r) {
        const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wv[r], 16));
        const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wv[r], hi_mask));
        acc[r][m] = _mm256_fmadd_ps(we, xe, _mm256_fmadd_ps(wo, xo, acc[r][m]));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r][m]), _mm256_extractf128_ps(acc[r][m], 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_movehdup_ps(s));
      float v = _mm_cvtss_f32(s);
      for (int64_t kk = k; kk < K; ++kk) v += bf16_to_float(w[r * K + kk]) * bf16_to_float(x_rows[m][kk]);
      y[r * MT + m] = v;
    }
#else
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      float v = 0.0f;
      for (int64_t k = 0; k < K; ++k) v += bf16_to_float(w[r * K + k]) * bf16_to_float(x_rows[m][k]);
      y[r * MT + m] = v;
    }
#endif
}

using GemvFn = void (*)(const uint16_t*, int64_t, const uint16_t* const*, float*);

template <int R>
GemvFn gemv_fn(int mt) {
  switch (mt) {
    case 1: return gemv_rows<R, 1>;
    case 2: return gemv_rows<R, 2>;
    case 3: return gemv_rows<R, 3>;
    default: return gemv_rows<R, 4>;
  }
}

// y [M, N] = x [M, K] w [N, K]^T (+ bias), bfloat16 x and w, float32 or bfloat16 out.
at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                     bool bf16_out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "x must be contiguous bfloat16 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kBFloat16 && w.size(1) == x.size(1),
              "w must be contiguous bfloat16 [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const Bias b = bias_view(bias, N);
  at::Tensor out = at::empty({M, N}, x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  if (M == 0 || N == 0) return out;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* y_f32 = bf16_out ? nullptr : out.data_ptr<float>();
  uint16_t* y_bf16 = bf16_out ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  const int64_t groups = (N + kGemvRows - 1) / kGemvRows;
  const int64_t grain = std::max<int64_t>(1, 32768 / (kGemvRows * K));  // >= 64 KiB per task
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    const uint16_t* x_rows[kGemvTile];
    float yt[kGemvRows * kGemvTile];
    for (int64_t gi = begin; gi < end; ++gi) {
      const int64_t n0 = gi * kGemvRows;
      const int rows = static_cast<int>(std::min<int64_t>(kGemvRows, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += kGemvTile) {
        const int mt = static_cast<int>(std::min<int64_t>(kGemvTile, M - m0));
        for (int m = 0; m < mt; ++m) x_rows[m] = xp + (m0 + m) * K;
        if (rows == kGemvRows) {
          gemv_fn<kGemvRows>(mt)(wp + n0 * K, K, x_rows, yt);
        } else {
          for (int r = 0; r < rows; ++r) gemv_fn<1>(mt)(wp + (n0 + r) * K, K, x_rows, yt + r * mt);
        }
        for (int r = 0; r < rows; ++r)
          for (int m = 0; m < mt; ++m) {
            float v = yt[r * mt + m];
            if (!b.empty()) v += b[n0 + r];
            const int64_t at = (m0 + m) * N + n0 + r;
            if (bf16_out)
              y_bf16[at] = bf16_bits(v);
            else
              y_f32[at] = v;
          }
      }
    }
  });
  return out;
}

int64_t isa() { return QLORA_ISA; }

int64_t bf16_dot() {
#if QLORA_ISA == 3 && defined(__AVX512BF16__)
  return 1;
#else
  return 0;
#endif
}

}  // namespace

#define QLORA_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

QLORA_LIBRARY(QLORA_NAMESPACE, m) {
  m.def(
      "int8_matmul(Tensor x, Tensor codes, Tensor scales, Tensor table, int out_features, "
      "float out_scale, Tensor? bias, bool bf16_out) -> Tensor",
      &int8_matmul);
  m.def("quantize_activations(Tensor x) -> Tensor[]", &quantize_activations);
  m.def("gemv_bf16(Tensor x, Tensor w, Tensor? bias, bool bf16_out) -> Tensor", &gemv_bf16);
  m.def("isa() -> int", &isa);
  m.def("bf16_dot() -> int", &bf16_dot);
}

// NF4 decoding with int16 dot products, and a bfloat16 GEMV for the output layer.
//
// qlora/int16_decode.py prepares everything this file reads and holds the pure-PyTorch
// reference of the same arithmetic; the formulas below are the ones it states.
//
// Weights (repacked once from the NF4 bytes, see int16_decode.repack): W [N, K], N % 4 == 0,
// K % 64 == 0. Output rows are taken four at a time (a "group" g: rows 4g..4g+3) and K in blocks
// of 32 (block j: k = 32j..32j+31). For each (g, j) 64 bytes; byte 16r + p (r = 0..3, p = 0..15)
// holds the 4-bit code of W[4g+r, 32j+p] in its low nibble and of W[4g+r, 32j+16+p] in its high
// nibble. One scale per (row, superblock s of 64 weights: blocks 2s and 2s+1), float32:
//
//     scale[g, s, r] = fp32(absmax(row 4g+r, k = 64s..64s+63) / 16383)
//
// (absmax: the NF4 block scale as the exact path restores it). scales are [N/4, S, 4], S = K/64.
//
// The 16 NF4 levels as int16: T[q] = round(16383 NF4_CODE[q]), in [-16383, 16383].
//
// Activations, per input row m and superblock s (the same 64 k as the weight scale):
//
//     amax_s = max |x_k|,  dx_s = amax_s / 16383,  xq_k = round_even(x_k * (16383 / amax_s))
//
// (xq in [-16383, 16383]; a zero superblock gives xq = 0, dx = 0). Then, for output row
// n = 4g + r, "lane" c = 0..7 of superblock s holds the exact integer (eight products, so
// |D| <= 8 * 16383^2 < 2^31: no int32 sum can overflow)
//
//     D[s, c] = sum_{j in {2s, 2s+1}} sum_{i in {0, 1}}  T[lo(16r+2c+i)] xq[32j+2c+i]
//                                                      + T[hi(16r+2c+i)] xq[32j+16+2c+i]
//
// (lo/hi: the nibbles of block j's byte) and the output is, in float32 with fused multiply-adds:
//
//     f_s      = scale[g, s, r] * dx_s                       (one float32 product)
//     acc[c]   = fma(float(D[s, c]), f_s, acc[c])             (s = 0, 1, ..., from acc = 0)
//     y[m, n]  = ((acc0 + acc1) + (acc2 + acc3)) + ((acc4 + acc5) + (acc6 + acc7))  (+ bias[n])
//
// float(D) rounds to nearest (D may exceed 2^24). Every code path computes exactly these
// operations in this order, so the three builds give the same bits, and the reference
// reproduces them.
//
// Code paths (QLORA_ISA): 3 = AVX-512 with VNNI: vpmovzxbw widens 32 code bytes (rows r, r+1) to
// 16-bit words, vpermw looks the nibbles up in T (held twice, so a word's bit 4 is irrelevant and
// the low nibble needs no mask), and vpdpwssd sums two int16 x int16 products per 32-bit lane:
// lane 8(r%2) + c of one accumulator is D[s, c] of row r. 2 = AVX2: two byte shuffles look up
// T's low and high bytes, an unpack joins them into words, vpmaddwd sums pairs; lanes are then
// regrouped to the D[s, c] above (integer adds: exact). 0 = scalar C++.
//
// gemv_bf16: y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) for bfloat16 x and w, float32 sums:
// AVX-512 BF16's vdpbf16ps where the CPU has it, else the weights widened to float32 (exact) and
// fused multiply-adds. Its sum order differs from torch's, so it matches F.linear to float32
// rounding, not bit for bit.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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
#define QLORA_NAMESPACE qlora_int16
#endif

// Bytes of repacked codes ahead of the current block to prefetch (each thread reads one
// contiguous range; the hardware prefetcher alone falls behind DRAM at this decode rate).
#ifndef QLORA_PREFETCH
#define QLORA_PREFETCH 4096
#endif

namespace {

constexpr int kRows = 4;      // output rows per group
constexpr int kSuper = 64;    // weights per scale, activations per scale
constexpr int kLevel = 16383; // the largest |T| and |xq|
constexpr int kMaxTile = 4;   // input rows that share one decode of the weights

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

// One input row, quantized: xq [K] int16 in element order, dx [K/64].
struct XRow {
  const int16_t* xq;
  const float* dx;
};

struct Args {
  const uint8_t* codes;    // [N/4][K/32][64]
  const float* scales;     // [N/4][S][4]
  int64_t K, S;            // S = K/64 superblocks
  int16_t table[16];       // T
};

// Quantize x[m] (float32 or bfloat16 bits) into xq/dx. False if the row holds a value that is
// not finite or a superblock whose largest magnitude is below 1e-30 (16383 / amax would
// overflow): the caller then returns no result and Python takes the exact path.
template <typename In>
bool quantize_row(const In* x, int64_t K, int16_t* xq, float* dx) {
  for (int64_t s = 0; s < K / kSuper; ++s) {
    float v[kSuper];
    float amax = 0.0f;
    for (int i = 0; i < kSuper; ++i) {
      if constexpr (sizeof(In) == 2)
        v[i] = bf16_to_float(x[s * kSuper + i]);
      else
        v[i] = x[s * kSuper + i];
      amax = std::max(amax, std::fabs(v[i]));
    }
    if (!std::isfinite(amax) || (amax > 0.0f && amax < 1e-30f)) return false;
    const float inv = amax > 0.0f ? static_cast<float>(kLevel) / amax : 0.0f;
    dx[s] = amax / static_cast<float>(kLevel);
    for (int i = 0; i < kSuper; ++i) {
      const float r = std::nearbyint(v[i] * inv);  // round half to even (default mode)
      const float lim = static_cast<float>(kLevel);
      xq[s * kSuper + i] = static_cast<int16_t>(std::min(lim, std::max(-lim, r)));
    }
  }
  return true;
}

// y[r * MT + m] for the four rows of group g and MT input rows: the formula at the top.
#if QLORA_ISA == 3
template <int MT>
void group_dot(const Args& a, int64_t g, const XRow* xr, float* y) {
  const uint8_t* codes = a.codes + g * a.S * 128;
  const float* sc = a.scales + g * a.S * 4;
  // T in words 0-15 and again in 16-31: vpermw reads 5 index bits
  __m512i table;
  {
    alignas(64) int16_t t32[32];
    for (int i = 0; i < 32; ++i) t32[i] = a.table[i & 15];
    table = _mm512_load_si512(t32);
  }
  // scale lanes: rows 0/1 (and 2/3) eight lanes each
  const __m512i pick01 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i pick23 = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  __m512 acc01[MT], acc23[MT];
  for (int m = 0; m < MT; ++m) acc01[m] = acc23[m] = _mm512_setzero_ps();
  for (int64_t s = 0; s < a.S; ++s) {
    __m512i d01[MT], d23[MT];
    for (int m = 0; m < MT; ++m) d01[m] = d23[m] = _mm512_setzero_si512();
    for (int h = 0; h < 2; ++h) {
      const int64_t j = 2 * s + h;
      const uint8_t* p = codes + j * 64;
      _mm_prefetch(reinterpret_cast<const char*>(p + QLORA_PREFETCH), _MM_HINT_T0);
      // words 16i + p: the code byte p of row i (of the pair), both nibbles
      const __m512i w01 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      const __m512i w23 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
      const __m512i lo01 = _mm512_permutexvar_epi16(w01, table);
      const __m512i hi01 = _mm512_permutexvar_epi16(_mm512_srli_epi16(w01, 4), table);
      const __m512i lo23 = _mm512_permutexvar_epi16(w23, table);
      const __m512i hi23 = _mm512_permutexvar_epi16(_mm512_srli_epi16(w23, 4), table);
      for (int m = 0; m < MT; ++m) {
        // xq[32j..32j+15] (and [32j+16..32j+31]) in both 256-bit halves, one per row of the pair
        const int16_t* xq = xr[m].xq + j * 32;
        const __m512i xl = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
        const __m512i xh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16)));
        d01[m] = _mm512_dpwssd_epi32(d01[m], lo01, xl);
        d01[m] = _mm512_dpwssd_epi32(d01[m], hi01, xh);
        d23[m] = _mm512_dpwssd_epi32(d23[m], lo23, xl);
        d23[m] = _mm512_dpwssd_epi32(d23[m], hi23, xh);
      }
    }
    const __m512 s4 = _mm512_castps128_ps512(_mm_loadu_ps(sc + s * 4));
    const __m512 s01 = _mm512_permutexvar_ps(pick01, s4), s23 = _mm512_permutexvar_ps(pick23, s4);
    for (int m = 0; m < MT; ++m) {
      const __m512 dx = _mm512_set1_ps(xr[m].dx[s]);
      acc01[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d01[m]), _mm512_mul_ps(s01, dx), acc01[m]);
      acc23[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d23[m]), _mm512_mul_ps(s23, dx), acc23[m]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int h = 0; h < 2; ++h) {
      __m512 t = h == 0 ? acc01[m] : acc23[m];
      t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));  // acc0 + acc1, acc2 + acc3, ...
      t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));  // (acc0 + acc1) + (acc2 + acc3), ...
      t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, 0xB1));  // + the other four lanes
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, t);
      y[(2 * h) * MT + m] = lanes[0];
      y[(2 * h + 1) * MT + m] = lanes[8];
    }
}
constexpr int kTile = 4;

#elif QLORA_ISA == 2
template <int MT>
void group_dot(const Args& a, int64_t g, const XRow* xr, float* y) {
  const uint8_t* codes = a.codes + g * a.S * 128;
  const float* sc = a.scales + g * a.S * 4;
  // T's low bytes and high bytes, each in both 128-bit lanes (vpshufb looks up within a lane)
  __m256i tlo, thi;
  {
    alignas(16) uint8_t lo[16], hi[16];
    for (int i = 0; i < 16; ++i) {
      const uint16_t u = static_cast<uint16_t>(a.table[i]);
      lo[i] = static_cast<uint8_t>(u & 0xFF);
      hi[i] = static_cast<uint8_t>(u >> 8);
    }
    tlo = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(lo)));
    thi = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(hi)));
  }
  const __m128i low4 = _mm_set1_epi8(0x0F);
  __m256 acc[kRows][MT];
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t s = 0; s < a.S; ++s) {
    // xu: xq[32j+0..7 | 32j+16..23], xv: xq[32j+8..15 | 32j+24..31], the order of the words below
    __m256i xu[2][MT], xv[2][MT];
    for (int h = 0; h < 2; ++h)
      for (int m = 0; m < MT; ++m) {
        const int16_t* xq = xr[m].xq + (2 * s + h) * 32;
        const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
        const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16));
        xu[h][m] = _mm256_permute2x128_si256(a0, a1, 0x20);
        xv[h][m] = _mm256_permute2x128_si256(a0, a1, 0x31);
      }
    const float* sr = sc + s * 4;
    _mm_prefetch(reinterpret_cast<const char*>(codes + s * 128 + QLORA_PREFETCH), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(codes + s * 128 + QLORA_PREFETCH + 64), _MM_HINT_T0);
    for (int r = 0; r < kRows; ++r) {
      __m256i pu[MT], pv[MT];
      for (int m = 0; m < MT; ++m) pu[m] = pv[m] = _mm256_setzero_si256();
      for (int h = 0; h < 2; ++h) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + (2 * s + h) * 64 + 16 * r));
        const __m256i idx = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low4), _mm_and_si128(b, low4));
        const __m256i bl = _mm256_shuffle_epi8(tlo, idx), bh = _mm256_shuffle_epi8(thi, idx);
        const __m256i u = _mm256_unpacklo_epi8(bl, bh);  // T at k = 0..7 | 16..23 of block 2s+h
        const __m256i v = _mm256_unpackhi_epi8(bl, bh);  // T at k = 8..15 | 24..31
        for (int m = 0; m < MT; ++m) {
          pu[m] = _mm256_add_epi32(pu[m], _mm256_madd_epi16(u, xu[h][m]));
          pv[m] = _mm256_add_epi32(pv[m], _mm256_madd_epi16(v, xv[h][m]));
        }
      }
      for (int m = 0; m < MT; ++m) {
        // lanes c = 0..3 from u (k = 2c, 2c+1 | 16+2c, 17+2c), c = 4..7 from v
        const __m256i d = _mm256_add_epi32(_mm256_permute2x128_si256(pu[m], pv[m], 0x20),
                                           _mm256_permute2x128_si256(pu[m], pv[m], 0x31));
        const __m256 f = _mm256_set1_ps(sr[r] * xr[m].dx[s]);
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), f, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < MT; ++m) {
      __m256 t = acc[r][m];
      t = _mm256_add_ps(t, _mm256_permute_ps(t, 0xB1));
      t = _mm256_add_ps(t, _mm256_permute_ps(t, 0x4E));
      t = _mm256_add_ps(t, _mm256_permute2f128_ps(t, t, 0x01));
      y[r * MT + m] = _mm256_cvtss_f32(t);
    }
}
constexpr int kTile = 2;

#else
template <int MT>
void group_dot(const Args& a, int64_t g, const XRow* xr, float* y) {
  const uint8_t* codes = a.codes + g * a.S * 128;
  const float* sc = a.scales + g * a.S * 4;
  for (int m = 0; m < MT; ++m) {
    for (int r = 0; r < kRows; ++r) {
      float acc[8] = {};
      for (int64_t s = 0; s < a.S; ++s) {
        const float f = sc[s * 4 + r] * xr[m].dx[s];
        for (int c = 0; c < 8; ++c) {
          int32_t d = 0;
          for (int64_t j = 2 * s; j < 2 * s + 2; ++j) {
            const uint8_t* p = codes + j * 64 + 16 * r;
            const int16_t* xq = xr[m].xq + j * 32;
            for (int i = 0; i < 2; ++i) {
              const uint8_t byte = p[2 * c + i];
              d += static_cast<int32_t>(a.table[byte & 0xF]) * xq[2 * c + i] +
                   static_cast<int32_t>(a.table[byte >> 4]) * xq[16 + 2 * c + i];
            }
          }
          acc[c] = std::fma(static_cast<float>(d), f, acc[c]);
        }
      }
      y[r * MT + m] = (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])));
    }
  }
}
constexpr int kTile = 4;
#endif

using GroupFn = void (*)(const Args&, int64_t, const XRow*, float*);

// An optional bias of N values, float32 or bfloat16: exactly one of the two pointers is set, or
// neither when there is no bias.
static void read_bias(const std::optional<at::Tensor>& bias, int64_t N, const float*& f32,
                      const uint16_t*& bf16) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->numel() == N && bias->is_contiguous(), "bias must be contiguous [N]");
  if (bias->scalar_type() == at::kFloat) {
    f32 = bias->data_ptr<float>();
  } else {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16, "bias must be float32 or bfloat16");
    bf16 = reinterpret_cast<const uint16_t*>(bias->data_ptr<at::BFloat16>());
  }
}

// out [M, N] = the formula at the top for x [M, K] (float32 or bfloat16); float32, or rounded
// once to bfloat16 if bf16_out. A 0-element result: x holds a value the quantization does not
// take (not finite, or a superblock below 1e-30): the caller takes the exact path.
at::Tensor int16_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                        const at::Tensor& table, int64_t out_features, const std::optional<at::Tensor>& bias,
                        bool bf16_out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be contiguous 2-D CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  TORCH_CHECK(K % kSuper == 0 && N % kRows == 0, "K must be a multiple of 64 and N of 4, got ", K, ", ", N);
  const int64_t G = N / kRows, S = K / kSuper;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() == G * S * 128,
              "codes must be contiguous uint8 of N K / 2 bytes");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == G * S * 4,
              "scales must be contiguous float32 [N/4, K/64, 4]");
  TORCH_CHECK(table.scalar_type() == at::kShort && table.numel() == 16, "table must be int16 [16]");
  const float* bias_f32 = nullptr;
  const uint16_t* bias_bf16 = nullptr;
  read_bias(bias, N, bias_f32, bias_bf16);
  Args a{};
  a.codes = codes.data_ptr<uint8_t>();
  a.scales = scales.data_ptr<float>();
  a.K = K;
  a.S = S;
  std::memcpy(a.table, table.data_ptr<int16_t>(), 32);
  for (int i = 0; i < 16; ++i)
    TORCH_CHECK(std::abs(a.table[i]) <= kLevel, "table entries must lie in [-16383, 16383]");

  // the quantized activations, once per call
  at::Tensor xq_t = at::empty({M, K}, x.options().dtype(at::kShort));
  at::Tensor dx_t = at::empty({M, S}, x.options().dtype(at::kFloat));
  int16_t* xq = xq_t.data_ptr<int16_t>();
  float* dx = dx_t.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const bool ok = x.scalar_type() == at::kBFloat16
                        ? quantize_row(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + m * K, K,
                                       xq + m * K, dx + m * S)
                        : quantize_row(x.data_ptr<float>() + m * K, K, xq + m * K, dx + m * S);
    if (!ok) return at::empty({0}, x.options().dtype(at::kFloat));
  }
  at::Tensor out = at::empty({M, N}, x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  if (M == 0 || N == 0) return out;
  float* y_f32 = bf16_out ? nullptr : out.data_ptr<float>();
  uint16_t* y_bf16 = bf16_out ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  const GroupFn fns[5] = {nullptr, group_dot<1>, group_dot<2>, kTile >= 3 ? group_dot<3> : nullptr,
                          kTile >= 4 ? group_dot<4> : nullptr};
  const int64_t grain = std::max<int64_t>(1, 16384 / K);  // groups per task: >= 64k weights
  at::parallel_for(0, G, grain, [&](int64_t begin, int64_t end) {
    XRow xr[kMaxTile];
    float yt[kRows * kMaxTile];
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t m0 = 0; m0 < M; m0 += kTile) {
        const int mt = static_cast<int>(std::min<int64_t>(kTile, M - m0));
        for (int m = 0; m < mt; ++m) xr[m] = {xq + (m0 + m) * K, dx + (m0 + m) * S};
        fns[mt](a, g, xr, yt);
        for (int r = 0; r < kRows; ++r) {
          const int64_t n = g * kRows + r;
          for (int m = 0; m < mt; ++m) {
            float v = yt[r * mt + m];
            if (bias_f32) v += bias_f32[n];
            if (bias_bf16) v += bf16_to_float(bias_bf16[n]);
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

// (xq int16 [M, K], dx float32 [M, K/64]) of float32/bfloat16 x [M, K], K % 64 == 0: the
// quantization int16_matmul applies, for tests. Empty tensors where int16_matmul declines.
std::vector<at::Tensor> quantize_activations(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % kSuper == 0, "x: contiguous [M, K], K % 64 == 0");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1), S = K / kSuper;
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kShort));
  at::Tensor dx = at::empty({M, S}, x.options().dtype(at::kFloat));
  for (int64_t m = 0; m < M; ++m) {
    const bool ok = x.scalar_type() == at::kBFloat16
                        ? quantize_row(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + m * K, K,
                                       xq.data_ptr<int16_t>() + m * K, dx.data_ptr<float>() + m * S)
                        : quantize_row(x.data_ptr<float>() + m * K, K, xq.data_ptr<int16_t>() + m * K,
                                       dx.data_ptr<float>() + m * S);
    if (!ok) return {at::empty({0}, xq.options()), at::empty({0}, dx.options())};
  }
  return {xq, dx};
}

// packed uint8 [N K / 2]: the NF4 bytes in element order (element e in the high nibble of byte
// e/2 when e is even, the low nibble when odd) from the repacked codes, the inverse of
// int16_decode.repack's permutation. The exact path reads these; a weight served from the
// repacked layout alone (int16_decode.RepackedNF4Weight) rebuilds them per call.
at::Tensor nf4_bytes(const at::Tensor& codes, int64_t N, int64_t K) {
  TORCH_CHECK(N % kRows == 0 && K % kSuper == 0, "N must be a multiple of 4 and K of 64");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() == N * K / 2,
              "codes must be contiguous uint8 of N K / 2 bytes");
  at::Tensor out = at::empty({N * K / 2}, codes.options());
  const uint8_t* c = codes.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  const int64_t G = N / kRows, J = K / 32;
  at::parallel_for(0, G, std::max<int64_t>(1, 65536 / K), [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      for (int64_t j = 0; j < J; ++j)
        for (int r = 0; r < kRows; ++r) {
          const uint8_t* p = c + (g * J + j) * 64 + 16 * r;  // byte p: k = 32j + p | 32j + 16 + p
          uint8_t* row = o + ((g * kRows + r) * K + 32 * j) / 2;
          for (int i = 0; i < 8; ++i) {
            row[i] = static_cast<uint8_t>(((p[2 * i] & 0xF) << 4) | (p[2 * i + 1] & 0xF));
            row[8 + i] = static_cast<uint8_t>((p[2 * i] & 0xF0) | (p[2 * i + 1] >> 4));
          }
        }
  });
  return out;
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
  const float* bias_f32 = nullptr;
  const uint16_t* bias_bf16 = nullptr;
  read_bias(bias, N, bias_f32, bias_bf16);
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
            if (bias_f32) v += bias_f32[n0 + r];
            if (bias_bf16) v += bf16_to_float(bias_bf16[n0 + r]);
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
      "int16_matmul(Tensor x, Tensor codes, Tensor scales, Tensor table, int out_features, "
      "Tensor? bias, bool bf16_out) -> Tensor",
      &int16_matmul);
  m.def("quantize_activations(Tensor x) -> Tensor[]", &quantize_activations);
  m.def("nf4_bytes(Tensor codes, int out_features, int in_features) -> Tensor", &nf4_bytes);
  m.def("gemv_bf16(Tensor x, Tensor w, Tensor? bias, bool bf16_out) -> Tensor", &gemv_bf16);
  m.def("isa() -> int", &isa);
  m.def("bf16_dot() -> int", &bf16_dot);
}

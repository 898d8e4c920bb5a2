// NF4 on the CPU: a fused matmul for the few input rows of decoding, and a fast dequantize.
//
// The weight W [N, K] (out, in) is stored as qlora/nf4.py describes: flattened row-major and cut
// into blocks of B values (B a power of two >= 32); byte i of `packed` holds element 2i in its
// high nibble and 2i+1 in its low nibble; block b has one scale
//
//     absmax_b                                   (float32, plain)
//     absmax_b = DYNAMIC_CODE[a_b] * s_j + c     (double quant: uint8 a_b, j = b / 256; the
//                                                 product and the sum each rounded to float32)
//
// and element e of block b decodes to  w_e = NF4_CODE[q_e] * absmax_b  (one float32 product).
//
//   dequantize(out):  out[e] = fl(NF4_CODE[q_e] * absmax_b), cast to bfloat16 by round to
//                     nearest even (NaN -> 0xFFFF), as torch's CPU .to(torch.bfloat16) does
//   matmul:           y[m, n] = sum_k x[m, k] W[n, k] in float32, W never written to memory;
//                     optionally + bias, + a LoRA update s B (A x[m]) on chosen rows (struct Lora)
//
// The lookup NF4_CODE[q] is a permute: the 16 floats fill one AVX-512 register, and
// _mm512_permutexvar_ps reads only the low 4 bits of each 32-bit index, so a nibble needs a
// shift to bit 0 and no mask. AVX2's 8-entry permute needs two permutes and a blend.
//
// Dequantize multiplies the 16-entry table by absmax_b once per block ("the scaled table"), so
// a lookup returns fl(NF4_CODE[q] * absmax_b), the reference's value bit for bit.
//
// The matmul reads 64 bytes (128 weights) as 16 dwords: nibble p of every dword is one shift and
// one permute away, and x is rearranged once per call to meet those nibbles in order (see
// row_dot_groups). The products of a group are summed unscaled per lane and multiplied by the
// lane's block scale once per group. This changes only the rounding of the float32 sum, so y is
// within float32 rounding of F.linear(x, dequantized W) (tests/test_kernel.py states the bound).
// Each y[m, n] is computed from x[m] alone, in an order fixed by the weight's shape: the same
// row gives the same bits alone or in a batch, on any number of threads.
//
// Code paths, fixed at compile time by QLORA_ISA: 3 = AVX-512F, 2 = AVX2 + FMA, 0 = scalar C++.
// Unset, the best one the compiler targets is taken (the build uses -march=native). Compile with
// -ffp-contract=off: a fused multiply-add in place of the reference's separate product and sum
// would change the restored absmax, and with it every decoded bit.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>
#include <cmath>

#ifndef QLORA_ISA
#if defined(__AVX512F__)
#define QLORA_ISA 3
#elif defined(__AVX2__) && defined(__FMA__)
#define QLORA_ISA 2
#else
#define QLORA_ISA 0
#endif
#endif

#if QLORA_ISA == 3 && !defined(__AVX512F__)
#error "QLORA_ISA=3 needs a compiler target with AVX-512F (-march=native on such a CPU)"
#endif
#if QLORA_ISA == 2 && !(defined(__AVX2__) && defined(__FMA__))
#error "QLORA_ISA=2 needs a compiler target with AVX2 and FMA"
#endif
#if QLORA_ISA != 0 && QLORA_ISA != 2 && QLORA_ISA != 3
#error "QLORA_ISA must be 0 (scalar), 2 (AVX2) or 3 (AVX-512)"
#endif
#if QLORA_ISA != 0
#include <immintrin.h>
#endif

#ifndef QLORA_NAMESPACE  // the op namespace; each build variant has its own (see kernel.py)
#define QLORA_NAMESPACE qlora_nf4
#endif

// Bytes ahead of the current group to prefetch: decoding keeps the core busy enough that the
// hardware prefetcher alone falls behind DRAM, so the kernel asks for the bytes it will read
// about one DRAM latency x bandwidth ahead (several KiB).
#ifndef QLORA_PREFETCH
#define QLORA_PREFETCH 8192
#endif

namespace {

// ---------------------------------------------------------------------------------------------
// Block scales
// ---------------------------------------------------------------------------------------------

// Everything needed to restore absmax_b.
struct Scales {
  bool double_quant;
  const float* absmax_f32;    // [n_blocks], plain
  const uint8_t* absmax_u8;   // [n_blocks], double quant
  const float* dynamic_code;  // [256]
  const float* absmax_scale;  // [ceil(n_blocks / 256)]
  float absmax_offset;        // c
  int group_shift;            // log2(256): j = b >> group_shift

  template <bool DQ>
  inline float get(int64_t b) const {
    if constexpr (!DQ) {
      return absmax_f32[b];
    } else {
      const float scaled = dynamic_code[absmax_u8[b]] * absmax_scale[b >> group_shift];
      return scaled + absmax_offset;  // two roundings, as restore_absmax
    }
  }
  inline float operator()(int64_t b) const { return double_quant ? get<true>(b) : get<false>(b); }
};

// float32 -> bfloat16 bits, round to nearest even; NaN -> 0xFFFF (torch's CPU conversion)
inline uint16_t bf16_bits(float f) {
  if (f != f) return 0xFFFF;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_to_float(uint16_t bits) {  // exact: bfloat16 is the top half of a float32
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---------------------------------------------------------------------------------------------
// SIMD helpers
// ---------------------------------------------------------------------------------------------
//
// Per ISA: Vec (kLanes floats) and its arithmetic; the grouped layout of the matmul, kGroup =
// 8 kLanes weights read as kLanes dwords (load_group, lookup_nibble<p>, lane_scales); and
// decode_pairs, which turns kLanes bytes into the 2 kLanes weights in element order for
// dequantize.

#if QLORA_ISA == 3
using Vec = __m512;
using Bits = __m512i;
constexpr int kLanes = 16;
constexpr int kMaxTile = 4;  // input rows sharing one decode: 4 x 3 accumulators + temporaries
constexpr int kMaxBlocksPerGroup = 4;  // kGroup / 32
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline float vsum(Vec a) { return _mm512_reduce_add_ps(a); }

struct Code {
  __m512 all16;
};
inline Code load_code(const float* code) { return {_mm512_loadu_ps(code)}; }
inline Bits load_group(const uint8_t* bytes) { return _mm512_loadu_si512(bytes); }
// the 16 weights whose nibble sits at bits 0-3 of each dword, unscaled
inline Vec lookup_nibble(Bits v, const Code& code) {
  return _mm512_permutexvar_ps(v, code.all16);  // reads bits 0-3 only
}
inline Bits shift_nibble(Bits v) { return _mm512_srli_epi32(v, 4); }
// lane d = the scale of the block of element 8d: BPG blocks of 16 / BPG lanes each, `first`
// the group's first block
template <int BPG, bool DQ>
inline Vec lane_scales(const Scales& s, int64_t first) {
  Vec sv = _mm512_set1_ps(s.get<DQ>(first));
  for (int i = 1; i < BPG; ++i)
    sv = _mm512_mask_blend_ps(static_cast<__mmask16>(0xFFFF << (i * (kLanes / BPG))), sv,
                              _mm512_set1_ps(s.get<DQ>(first + i)));
  return sv;
}

// 16 bytes -> 32 weights scaled by the table, in element order: [h0 l0 h1 l1 ...]
inline void decode_pairs(const uint8_t* bytes, __m512 table, __m512& first16, __m512& last16) {
  const __m512i v =
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);  // byte >> 4
  const __m512 lo = _mm512_permutexvar_ps(v, table);                        // bits 0-3 only
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i last =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  first16 = _mm512_permutex2var_ps(hi, first, lo);
  last16 = _mm512_permutex2var_ps(hi, last, lo);
}
// 16 floats -> 16 bfloat16, as bf16_bits
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 is_nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, is_nan, _mm512_set1_epi32(0xFFFF));
  return _mm512_cvtepi32_epi16(r);
}
inline void store_f32(float* out, __m512 a, __m512 b) {
  _mm512_storeu_ps(out, a);
  _mm512_storeu_ps(out + 16, b);
}
inline void store_bf16(uint16_t* out, __m512 a, __m512 b) {
  _mm512_storeu_si512(out, _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16(a)), to_bf16(b), 1));
}
inline __m512 scale_table(const float* code, float absmax) {
  return _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(absmax));
}

#elif QLORA_ISA == 2
using Vec = __m256;
using Bits = __m256i;
constexpr int kLanes = 8;
constexpr int kMaxTile = 2;  // 16 ymm registers: 2 x 3 accumulators, tables and temporaries
constexpr int kMaxBlocksPerGroup = 2;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline float vsum(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct Code {
  __m256 low8, high8;  // table entries 0-7 and 8-15
};
inline Code load_code(const float* code) { return {_mm256_loadu_ps(code), _mm256_loadu_ps(code + 8)}; }
inline Bits load_group(const uint8_t* bytes) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
}
// A 16-entry lookup from two 8-entry permutes: the permute reads index bits 0-2; bit 3, moved
// into the sign bit by `select`, picks the upper half through blendv.
inline __m256 lookup16(const Code& code, __m256i index, __m256i select) {
  const __m256 a = _mm256_permutevar8x32_ps(code.low8, index);
  const __m256 b = _mm256_permutevar8x32_ps(code.high8, index);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(select));
}
inline Vec lookup_nibble(Bits v, const Code& code) {
  // index: bits 0-2; the nibble's bit 3 << 28 -> the sign bit
  return lookup16(code, v, _mm256_slli_epi32(v, 28));
}
inline Bits shift_nibble(Bits v) { return _mm256_srli_epi32(v, 4); }
template <int BPG, bool DQ>
inline Vec lane_scales(const Scales& s, int64_t first) {
  const float s0 = s.get<DQ>(first);
  if constexpr (BPG == 1) {
    return _mm256_set1_ps(s0);
  } else {  // B = 32: lanes 0-3 are one block, 4-7 the next
    return _mm256_insertf128_ps(_mm256_set1_ps(s0), _mm_set1_ps(s.get<DQ>(first + 1)), 1);
  }
}

// 8 bytes -> 16 weights scaled by the table, in element order
inline void decode_pairs(const uint8_t* bytes, Code table, __m256& first8, __m256& last8) {
  const __m256i v =
      _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
  // high nibble: index byte >> 4, its bit 3 is the byte's bit 7 (<< 24 -> sign bit);
  // low nibble: index bits 0-2 read as they are, bit 3 << 28 -> sign bit
  const __m256 hi = lookup16(table, _mm256_srli_epi32(v, 4), _mm256_slli_epi32(v, 24));
  const __m256 lo = lookup16(table, v, _mm256_slli_epi32(v, 28));
  const __m256 a = _mm256_unpacklo_ps(hi, lo);  // [h0 l0 h1 l1 | h4 l4 h5 l5]
  const __m256 b = _mm256_unpackhi_ps(hi, lo);  // [h2 l2 h3 l3 | h6 l6 h7 l7]
  first8 = _mm256_permute2f128_ps(a, b, 0x20);
  last8 = _mm256_permute2f128_ps(a, b, 0x31);
}
inline __m128i to_bf16(__m256 v) {  // 8 floats -> 8 bfloat16, as bf16_bits
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0xFFFF), is_nan);
  const __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit lane: [r0-3 r0-3 | r4-7 r4-7]
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}
inline void store_f32(float* out, __m256 a, __m256 b) {
  _mm256_storeu_ps(out, a);
  _mm256_storeu_ps(out + 8, b);
}
inline void store_bf16(uint16_t* out, __m256 a, __m256 b) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_set_m128i(to_bf16(b), to_bf16(a)));
}
inline Code scale_table(const float* code, float absmax) {
  const __m256 s = _mm256_set1_ps(absmax);
  return {_mm256_mul_ps(_mm256_loadu_ps(code), s), _mm256_mul_ps(_mm256_loadu_ps(code + 8), s)};
}

#else
constexpr int kMaxTile = 4;
#endif

#if QLORA_ISA != 0
constexpr int64_t kGroup = 8 * kLanes;  // weights per group: kLanes dwords of 8 nibbles
#endif

// ---------------------------------------------------------------------------------------------
// Fused matmul
// ---------------------------------------------------------------------------------------------

// What every row kernel reads; x_rows[m] points at input row m in the kernel's layout.
struct RowArgs {
  const uint8_t* bytes;  // packed, [N K / 2]
  int64_t K, B;
  int block_shift;  // log2(B): element e is in block e >> block_shift
  Scales scales;
  const float* code;  // NF4_CODE [16]
};
using RowFn = void (*)(const RowArgs&, int64_t n, const float* const* x_rows, float* y);

// The general row kernel, scalar: any even K and any B, y[m] = sum_k x[m][k] W[n][k] for output
// row n. x_rows[m] = [xe | xo], x de-interleaved (xe[i] = x[2i], xo[i] = x[2i+1]) so that
// byte i of the row meets xe[i] (its high nibble) and xo[i] (its low nibble).
//
// The row's elements are the flat indices [n K, n K + K); K is even, so the row starts on a byte
// and every block boundary (a multiple of the even B) falls between bytes. The row is walked in
// segments, one per block it touches (a block straddles two rows when B does not divide K), and
// each segment scales the 16-entry table once.
template <int MT>
void row_dot_general_one(const RowArgs& a, int64_t n, const float* const* x_rows, float* y) {
  const int64_t n_bytes = a.K / 2, row_first = n * a.K;
  const uint8_t* row = a.bytes + n * n_bytes;
  int64_t b = row_first >> a.block_shift;         // the block of the row's first element
  int64_t block_end = (b + 1) * a.B - row_first;  // its end, in elements from the row start
  // four partial sums per input row, (high, low nibble) x (byte pair's first, second): one
  // chain of float adds would wait out the add latency on every product
  float sum[MT][4] = {};
  float table[16];
  for (int64_t j = 0; j < n_bytes; ++b, block_end += a.B) {
    const int64_t seg_end = std::min(n_bytes, block_end / 2);  // bytes [j, seg_end) are block b
    const float absmax = a.scales(b);
    for (int i = 0; i < 16; ++i) table[i] = a.code[i] * absmax;
    for (; j + 2 <= seg_end; j += 2) {
      const uint8_t b0 = row[j], b1 = row[j + 1];
      const float w0 = table[b0 >> 4], w1 = table[b0 & 0xF];
      const float w2 = table[b1 >> 4], w3 = table[b1 & 0xF];
      for (int m = 0; m < MT; ++m) {
        const float* xe = x_rows[m] + j;
        const float* xo = x_rows[m] + n_bytes + j;
        sum[m][0] += w0 * xe[0];
        sum[m][1] += w1 * xo[0];
        sum[m][2] += w2 * xe[1];
        sum[m][3] += w3 * xo[1];
      }
    }
    if (j < seg_end) {  // a segment of odd length (a block straddling rows)
      const uint8_t b0 = row[j];
      for (int m = 0; m < MT; ++m) {
        sum[m][0] += table[b0 >> 4] * x_rows[m][j];
        sum[m][1] += table[b0 & 0xF] * x_rows[m][n_bytes + j];
      }
      ++j;
    }
  }
  for (int m = 0; m < MT; ++m) y[m] = (sum[m][0] + sum[m][2]) + (sum[m][1] + sum[m][3]);
}

template <int R, int MT>
void row_dot_general(const RowArgs& a, int64_t n, const float* const* x_rows, float* y) {
  for (int r = 0; r < R; ++r) row_dot_general_one<MT>(a, n + r, x_rows, y + r * MT);
}

#if QLORA_ISA != 0
// The SIMD row kernel, for K a multiple of kGroup (so that a group lies inside one row, and
// inside one block when B >= kGroup; BPG = kGroup / B blocks per group otherwise):
//
//     y[m] = sum_g sum_d  scale_{g,d} * sum_p NF4_CODE[nibble p of dword d of group g] xg[m]
//
// Dword d of group g holds elements g kGroup + 8d .. + 7, and nibble p (bits 4p..4p+3) is element
// 8d + (p ^ 1): p even a low nibble (the odd element), p odd a high nibble. x is rearranged to
// match: xg[m][g kGroup + p kLanes + d] = x[m][g kGroup + 8d + (p ^ 1)]. Per group and input
// row: 8 FMAs into two accumulators, then one FMA by the lanes' block scales into the total.
// Accumulator chains per (output row, input row) and group: two, so that consecutive FMAs of
// one chain are independent of each other. The same for every tile size, so that a row's sum
// order never depends on how many rows share its tile (batch invariance).
constexpr int kChains = 2;

template <int R, int MT, bool DQ, int BPG>
void row_dot_groups(const RowArgs& a, int64_t n, const float* const* xg, float* y) {
  constexpr int C = kChains;
  const Scales scales = a.scales;
  const Code code = load_code(a.code);
  Vec total[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) total[r][m] = vzero();
  for (int64_t g = 0; g < a.K / kGroup; ++g) {
    Bits vp[R];  // nibble p of row r's group at bits 0-3 of vp[r] = v >> 4p
    Vec sv[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* group = a.bytes + (n + r) * (a.K / 2) + g * (kGroup / 2);
      _mm_prefetch(reinterpret_cast<const char*>(group + QLORA_PREFETCH), _MM_HINT_T0);
      vp[r] = load_group(group);
      sv[r] = lane_scales<BPG, DQ>(scales, ((n + r) * a.K + g * kGroup) >> a.block_shift);
    }
    Vec acc[R][MT][C];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m)
        for (int c = 0; c < C; ++c) acc[r][m][c] = vzero();
    const float* x0[MT];
    for (int m = 0; m < MT; ++m) x0[m] = xg[m] + g * kGroup;
    // one load of x serves all R rows; shifting the previous vp by 4 keeps the group in a
    // register (shifting the loaded bytes anew costs a load per nibble)
#define QLORA_NIBBLE(p)                                                    \
  {                                                                        \
    Vec w[R];                                                              \
    for (int r = 0; r < R; ++r) w[r] = lookup_nibble(vp[r], code);         \
    for (int m = 0; m < MT; ++m) {                                         \
      const Vec xv = vload(x0[m] + p * kLanes);                            \
      for (int r = 0; r < R; ++r)                                          \
        acc[r][m][p % C] = vfma(w[r], xv, acc[r][m][p % C]);               \
    }                                                                      \
    if (p < 7)                                                             \
      for (int r = 0; r < R; ++r) vp[r] = shift_nibble(vp[r]);             \
  }
    QLORA_NIBBLE(0) QLORA_NIBBLE(1) QLORA_NIBBLE(2) QLORA_NIBBLE(3)
    QLORA_NIBBLE(4) QLORA_NIBBLE(5) QLORA_NIBBLE(6) QLORA_NIBBLE(7)
#undef QLORA_NIBBLE
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) {
        Vec sum = acc[r][m][0];
        for (int c = 1; c < C; ++c) sum = vadd(sum, acc[r][m][c]);
        total[r][m] = vfma(sum, sv[r], total[r][m]);  // the block scales, once per group
      }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) y[r * MT + m] = vsum(total[r][m]);
}

template <int R, int MT, bool DQ>
RowFn pick_groups(int bpg) {
  if (bpg == 1) return &row_dot_groups<R, MT, DQ, 1>;
  if constexpr (kMaxBlocksPerGroup >= 4) {
    if (bpg == 4) return &row_dot_groups<R, MT, DQ, 4>;
  }
  return &row_dot_groups<R, MT, DQ, 2>;
}
#endif

// The row kernel for R output rows (2: a pair sharing the loads of x) and MT input rows;
// y[r MT + m] = output row n + r for input row m.
template <int R, int MT>
RowFn pick_row_kernel(bool grouped, bool dq, int bpg) {
#if QLORA_ISA != 0
  if (grouped) return dq ? pick_groups<R, MT, true>(bpg) : pick_groups<R, MT, false>(bpg);
#endif
  return &row_dot_general<R, MT>;
}

Scales make_scales(const at::Tensor& absmax, const std::optional<at::Tensor>& dynamic_code,
                   const std::optional<at::Tensor>& absmax_scale,
                   const std::optional<at::Tensor>& absmax_offset, int64_t absmax_group) {
  TORCH_CHECK(absmax_group > 0 && (absmax_group & (absmax_group - 1)) == 0,
              "absmax_group must be a power of two, got ", absmax_group);
  Scales s{};
  while ((int64_t{1} << s.group_shift) < absmax_group) ++s.group_shift;
  s.double_quant = dynamic_code.has_value();
  if (s.double_quant) {
    TORCH_CHECK(absmax.scalar_type() == at::kByte, "double-quant absmax must be uint8");
    TORCH_CHECK(absmax_scale.has_value() && absmax_offset.has_value(),
                "double quant needs absmax_scale and absmax_offset");
    TORCH_CHECK(absmax_offset->scalar_type() == at::kFloat && absmax_offset->numel() == 1,
                "absmax_offset must be one float32");
    s.absmax_offset = *absmax_offset->data_ptr<float>();
    TORCH_CHECK(dynamic_code->scalar_type() == at::kFloat && dynamic_code->numel() == 256 &&
                    dynamic_code->is_contiguous(),
                "dynamic_code must be contiguous float32 [256]");
    TORCH_CHECK(absmax_scale->scalar_type() == at::kFloat && absmax_scale->is_contiguous(),
                "absmax_scale must be contiguous float32");
    TORCH_CHECK(absmax_scale->numel() * absmax_group >= absmax.numel(),
                "absmax_scale has too few entries for absmax");
    s.absmax_u8 = absmax.data_ptr<uint8_t>();
    s.dynamic_code = dynamic_code->data_ptr<float>();
    s.absmax_scale = absmax_scale->data_ptr<float>();
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, "plain absmax must be float32");
    s.absmax_f32 = absmax.data_ptr<float>();
  }
  return s;
}

int check_common(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                 int64_t numel, int64_t blocksize) {
  TORCH_CHECK(packed.device().is_cpu() && absmax.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be contiguous uint8");
  TORCH_CHECK(absmax.is_contiguous(), "absmax must be contiguous");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16 && code.is_contiguous(),
              "nf4_code must be contiguous float32 [16]");
  TORCH_CHECK(blocksize >= 32 && (blocksize & (blocksize - 1)) == 0,
              "blocksize must be a power of two >= 32, got ", blocksize);
  TORCH_CHECK(packed.numel() == (numel + 1) / 2, "packed has ", packed.numel(),
              " bytes, the weight needs ", (numel + 1) / 2);
  TORCH_CHECK(absmax.numel() == (numel + blocksize - 1) / blocksize, "absmax has ",
              absmax.numel(), " entries, the weight has ", (numel + blocksize - 1) / blocksize,
              " blocks");
  int shift = 0;
  while ((int64_t{1} << shift) < blocksize) ++shift;
  return shift;
}

// sum_k a[k] b[k] in float32, in an order fixed by n (four SIMD chains, then the tail)
float dot_f32(const float* a, const float* b, int64_t n) {
  int64_t k = 0;
  float total = 0.0f;
#if QLORA_ISA != 0
  Vec acc[4] = {vzero(), vzero(), vzero(), vzero()};
  for (; k + 4 * kLanes <= n; k += 4 * kLanes)
    for (int c = 0; c < 4; ++c) acc[c] = vfma(vload(a + k + c * kLanes), vload(b + k + c * kLanes), acc[c]);
  total = vsum(vadd(vadd(acc[0], acc[1]), vadd(acc[2], acc[3])));
#endif
  for (; k < n; ++k) total += a[k] * b[k];
  return total;
}

// The LoRA update of the fused matmul (optional): for the input rows m it covers,
//
//     h[m, j] = sum_k A[j, k] x[m, k]                       (float32, dot_f32's order)
//     u[m, n] = fl(s * sum_j B[n, j] h[m, j])               (j = 0 .. r-1 in order)
//     y[m, n] = fl(fl(sum_k x[m, k] W[n, k] + b[n]) + u[m, n]), rounded once to bfloat16 if asked
//
// The rows covered: every row, or those of the batch items in `rows` (item i = input rows
// i*span .. i*span + span - 1). The others get the base alone, bit for bit as without LoRA.
struct Lora {
  const float* b = nullptr;  // [N, r]; nullptr: no LoRA
  int64_t r = 0;
  float scaling = 0.0f;
  std::vector<int64_t> slot;  // input row m -> its row of h, or -1
  std::vector<float> h;       // [rows covered, r]

  // u[c * (end - begin) + n - begin] for every covered row c and output n in [begin, end):
  // eight outputs at a time, so that eight independent chains hide the add latency (each
  // output's own sum still runs j = 0 .. r-1 in order)
  void updates(int64_t begin, int64_t end, std::vector<float>& u) const {
    const int64_t len = end - begin, covered = static_cast<int64_t>(h.size()) / r;
    u.assign(covered * len, 0.0f);
    for (int64_t c = 0; c < covered; ++c) {
      const float* hc = h.data() + c * r;
      for (int64_t n = begin; n < end; n += 8) {
        const int64_t cnt = std::min<int64_t>(8, end - n);
        float d[8] = {};
        for (int64_t j = 0; j < r; ++j)
          for (int64_t i = 0; i < cnt; ++i) d[i] += b[(n + i) * r + j] * hc[j];
        for (int64_t i = 0; i < cnt; ++i) u[c * len + n - begin + i] = scaling * d[i];
      }
    }
  }
};

// A float32 or bfloat16 tensor's elements, read as float32 (bfloat16 widens exactly).
struct FloatView {
  const float* f32 = nullptr;
  const uint16_t* bf16 = nullptr;
  bool empty() const { return f32 == nullptr && bf16 == nullptr; }
  float operator[](int64_t i) const { return bf16 != nullptr ? bf16_to_float(bf16[i]) : f32[i]; }
};

inline FloatView float_view(const at::Tensor& t) {
  FloatView v;
  if (t.scalar_type() == at::kBFloat16)
    v.bf16 = reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
  else
    v.f32 = t.data_ptr<float>();
  return v;
}

// The bias [N] (float32 or bfloat16), checked; an empty view when there is none.
inline FloatView bias_view(const std::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return {};
  TORCH_CHECK(bias->numel() == N && bias->is_contiguous() && bias->device().is_cpu(),
              "bias must be a contiguous CPU tensor of out_features elements");
  TORCH_CHECK(bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16,
              "bias must be float32 or bfloat16");
  return float_view(*bias);
}

// lora.slot for M input rows: every row in order, or the rows of the batch items in `rows`
// (item i = input rows i*span .. i*span + span - 1) in the order they are first named; returns
// the number of rows covered.
inline int64_t assign_lora_slots(Lora& lora, int64_t M, const std::optional<at::Tensor>& rows,
                                 int64_t span) {
  lora.slot.assign(M, -1);
  int64_t covered = 0;
  if (!rows.has_value()) {
    for (int64_t m = 0; m < M; ++m) lora.slot[m] = covered++;
    return covered;
  }
  TORCH_CHECK(rows->scalar_type() == at::kLong && rows->is_contiguous() && rows->device().is_cpu(),
              "lora_rows must be a contiguous int64 CPU tensor");
  TORCH_CHECK(span > 0 && M % span == 0, "lora_span must divide the rows");
  const int64_t* items = rows->data_ptr<int64_t>();
  for (int64_t i = 0; i < rows->numel(); ++i) {
    TORCH_CHECK(items[i] >= 0 && items[i] < M / span, "lora_rows out of range");
    for (int64_t m = items[i] * span; m < (items[i] + 1) * span; ++m)
      if (lora.slot[m] < 0) lora.slot[m] = covered++;
  }
  return covered;
}

// The LoRA update's inputs, checked: B, s, the covered rows, and h = A x for those rows.
inline Lora make_lora(const FloatView& x, int64_t M, int64_t K, int64_t N, const at::Tensor& lora_a,
                      const std::optional<at::Tensor>& lora_b, double lora_scaling,
                      const std::optional<at::Tensor>& lora_rows, int64_t lora_span) {
  Lora lora;
  TORCH_CHECK(lora_b.has_value(), "lora_a needs lora_b");
  TORCH_CHECK(lora_a.scalar_type() == at::kFloat && lora_a.is_contiguous() && lora_a.dim() == 2 &&
                  lora_a.size(1) == K,
              "lora_a must be contiguous float32 [r, in_features]");
  lora.r = lora_a.size(0);
  TORCH_CHECK(lora_b->scalar_type() == at::kFloat && lora_b->is_contiguous() &&
                  lora_b->dim() == 2 && lora_b->size(0) == N && lora_b->size(1) == lora.r,
              "lora_b must be contiguous float32 [out_features, r]");
  lora.b = lora_b->data_ptr<float>();
  lora.scaling = static_cast<float>(lora_scaling);
  const int64_t covered = assign_lora_slots(lora, M, lora_rows, lora_span);
  // h = A x for the covered rows, from x in float32
  const float* a = lora_a.data_ptr<float>();
  std::vector<float> xm(K);
  lora.h.assign(covered * lora.r, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    if (lora.slot[m] < 0) continue;
    for (int64_t k = 0; k < K; ++k) xm[k] = x[m * K + k];
    for (int64_t j = 0; j < lora.r; ++j)
      lora.h[lora.slot[m] * lora.r + j] = dot_f32(a + j * K, xm.data(), K);
  }
  return lora;
}

// The row kernel for every tile shape: fn[R][MT], R output rows by MT input rows.
struct RowKernels {
  RowFn fn[3][kMaxTile + 1] = {};
};

inline RowKernels pick_row_kernels(bool grouped, bool dq, int bpg) {
  RowKernels k;
  k.fn[1][1] = pick_row_kernel<1, 1>(grouped, dq, bpg);
  k.fn[2][1] = pick_row_kernel<2, 1>(grouped, dq, bpg);
  k.fn[1][2] = pick_row_kernel<1, 2>(grouped, dq, bpg);
  k.fn[2][2] = pick_row_kernel<2, 2>(grouped, dq, bpg);
  if constexpr (kMaxTile >= 4) {
    k.fn[1][3] = pick_row_kernel<1, 3>(grouped, dq, bpg);
    k.fn[2][3] = pick_row_kernel<2, 3>(grouped, dq, bpg);
    k.fn[1][4] = pick_row_kernel<1, 4>(grouped, dq, bpg);
    k.fn[2][4] = pick_row_kernel<2, 4>(grouped, dq, bpg);
  }
  return k;
}

// x [M, K] in float32, rearranged once per call into the row kernel's layout: grouped, xg
// (row_dot_groups); general, [xe | xo] (row_dot_general). A tensor: 64-byte aligned, so no SIMD
// load of x crosses a cache line.
inline at::Tensor kernel_layout(const at::Tensor& x, const FloatView& xv, bool grouped) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor x_layout = at::empty({M, K}, x.options().dtype(at::kFloat));
  float* xs = x_layout.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    float* dst = xs + m * K;
    for (int64_t k = 0; k < K; ++k) {
      int64_t to = (k % 2) * (K / 2) + k / 2;
#if QLORA_ISA != 0
      if (grouped) {
        const int64_t g = k / kGroup, r = k % kGroup;  // r = 8 d + (p ^ 1)
        to = g * kGroup + ((r % 8) ^ 1) * kLanes + r / 8;
      }
#else
      (void)grouped;
#endif
      dst[to] = xv[m * K + k];
    }
  }
  return x_layout;
}

// y [M, N] as float32, or bfloat16 rounded once from the float32 value.
struct Output {
  float* f32 = nullptr;
  uint16_t* bf16 = nullptr;
  explicit Output(at::Tensor& out) {
    if (out.scalar_type() == at::kBFloat16)
      bf16 = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    else
      f32 = out.data_ptr<float>();
  }
  void store(int64_t i, float v) const {
    if (bf16 != nullptr)
      bf16[i] = bf16_bits(v);
    else
      f32[i] = v;
  }
};

// y [M, N] = x [M, K] (float32 or bfloat16) W^T (+ bias [N], added in float32) (+ the LoRA
// update above), in float32, or rounded once to bfloat16 when bf16_out.
at::Tensor matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                  const at::Tensor& nf4_code, const std::optional<at::Tensor>& dynamic_code,
                  const std::optional<at::Tensor>& absmax_scale,
                  const std::optional<at::Tensor>& absmax_offset, int64_t absmax_group,
                  int64_t out_features, int64_t blocksize, const std::optional<at::Tensor>& bias,
                  bool bf16_out, const std::optional<at::Tensor>& lora_a,
                  const std::optional<at::Tensor>& lora_b, double lora_scaling,
                  const std::optional<at::Tensor>& lora_rows, int64_t lora_span) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  TORCH_CHECK(K % 2 == 0, "in_features must be even, got ", K);
  const FloatView b = bias_view(bias, N);
  RowArgs args{};
  args.block_shift = check_common(packed, absmax, nf4_code, N * K, blocksize);
  args.scales = make_scales(absmax, dynamic_code, absmax_scale, absmax_offset, absmax_group);
  args.bytes = packed.data_ptr<uint8_t>();
  args.code = nf4_code.data_ptr<float>();
  args.K = K;
  args.B = blocksize;
  at::Tensor out = at::empty({M, N}, x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  if (M == 0 || N == 0) return out;
  const FloatView xv = float_view(x);
  const Lora lora = lora_a.has_value()
                        ? make_lora(xv, M, K, N, *lora_a, lora_b, lora_scaling, lora_rows, lora_span)
                        : Lora{};

#if QLORA_ISA != 0
  const bool grouped = K % kGroup == 0;
  const int bpg = static_cast<int>(std::max<int64_t>(1, kGroup / blocksize));
#else
  const bool grouped = false;
  const int bpg = 1;
#endif
  const RowKernels kernels = pick_row_kernels(grouped, args.scales.double_quant, bpg);
  const at::Tensor x_layout = kernel_layout(x, xv, grouped);
  const float* xs = x_layout.data_ptr<float>();
  const Output y(out);
  // enough rows per task that a thread's share is worth waking it for (>= 32k weights)
  const int64_t grain = std::max<int64_t>(1, 32768 / K);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    const float* x_rows[kMaxTile];
    float y_tile[2 * kMaxTile];
    std::vector<float> u;  // the LoRA updates of this chunk's outputs
    if (lora.b != nullptr) lora.updates(begin, end, u);
    for (int64_t n = begin; n < end; n += 2) {
      const int rows = end - n >= 2 ? 2 : 1;  // output rows in pairs: one x load serves both
      for (int64_t m0 = 0; m0 < M; m0 += kMaxTile) {
        const int mt = static_cast<int>(std::min<int64_t>(kMaxTile, M - m0));
        for (int m = 0; m < mt; ++m) x_rows[m] = xs + (m0 + m) * K;
        kernels.fn[rows][mt](args, n, x_rows, y_tile);
        for (int r = 0; r < rows; ++r)
          for (int m = 0; m < mt; ++m) {
            // one float32 add, as y + bias.float(); then the LoRA update, one more
            float v = b.empty() ? y_tile[r * mt + m] : y_tile[r * mt + m] + b[n + r];
            if (lora.b != nullptr && lora.slot[m0 + m] >= 0)
              v += u[lora.slot[m0 + m] * (end - begin) + n + r - begin];
            y.store((m0 + m) * N + n + r, v);
          }
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Dequantize
// ---------------------------------------------------------------------------------------------

// out [numel] float32 or bfloat16 = the decoded weight, flat.
void dequantize(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& nf4_code,
                const std::optional<at::Tensor>& dynamic_code,
                const std::optional<at::Tensor>& absmax_scale, const std::optional<at::Tensor>& absmax_offset,
                int64_t absmax_group, int64_t blocksize, at::Tensor& out) {
  const int64_t n = out.numel();
  TORCH_CHECK(out.is_contiguous() && out.device().is_cpu(), "out must be a contiguous CPU tensor");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16,
              "out must be float32 or bfloat16, got ", out.scalar_type());
  check_common(packed, absmax, nf4_code, n, blocksize);
  const Scales scales = make_scales(absmax, dynamic_code, absmax_scale, absmax_offset,
                                    absmax_group);
  const uint8_t* bytes = packed.data_ptr<uint8_t>();
  const float* code = nf4_code.data_ptr<float>();
  const bool bf16_out = out.scalar_type() == at::kBFloat16;
  float* out_f32 = bf16_out ? nullptr : out.data_ptr<float>();
  uint16_t* out_bf16 =
      bf16_out ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  const int64_t grain = std::max<int64_t>(1, 65536 / blocksize);  // blocks per task
  at::parallel_for(0, absmax.numel(), grain, [&](int64_t begin, int64_t end) {
    float table[16];
    for (int64_t b = begin; b < end; ++b) {
      const float absmax_b = scales(b);
      int64_t e = b * blocksize;  // even: a block starts on a byte
      const int64_t last = std::min(n, e + blocksize);
#if QLORA_ISA != 0
      constexpr int64_t kStep = 2 * kLanes;  // weights per SIMD step, from kLanes bytes
      const auto tab = scale_table(code, absmax_b);
      for (; e + kStep <= last; e += kStep) {
        Vec first, second;
        decode_pairs(bytes + e / 2, tab, first, second);
        if (bf16_out)
          store_bf16(out_bf16 + e, first, second);
        else
          store_f32(out_f32 + e, first, second);
      }
      if (e == last) continue;
#endif
      // the partial last block: the same products, one at a time
      for (int i = 0; i < 16; ++i) table[i] = code[i] * absmax_b;
      for (; e < last; e += 2) {
        const uint8_t byte = bytes[e / 2];
        const float hi = table[byte >> 4], lo = table[byte & 0xF];
        if (bf16_out) {
          out_bf16[e] = bf16_bits(hi);
          if (e + 1 < last) out_bf16[e + 1] = bf16_bits(lo);  // odd n: the last nibble is padding
        } else {
          out_f32[e] = hi;
          if (e + 1 < last) out_f32[e + 1] = lo;
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Quantize
// ---------------------------------------------------------------------------------------------

// The full blocks of a flat weight x [n] (float32 or bfloat16, n a multiple of blocksize), as
// qlora/nf4.py's quantize_nf4 computes them, bit for bit:
//
//     absmax_b = max_i |x_i|                      (float32, exact)
//     s_i      = clamp(x_i * fl(1 / max(absmax_b, 1e-38)), -1, 1)
//     q_i      = #{ j : not (s_i <= midpoint_j) }  (15 midpoints: the nearest NF4 code, the
//                                                  lower one on a tie)
//
// A NaN weight gets code 15 and leaves its block's absmax to the other values (the reference
// makes the whole block NaN).
//
// packed [n / 2] holds q_{2i} << 4 | q_{2i+1}; absmax [n / blocksize].
void quantize(const at::Tensor& x, const at::Tensor& midpoints, int64_t blocksize,
              at::Tensor& packed, at::Tensor& absmax) {
  const int64_t n = x.numel();
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(blocksize >= 2 && blocksize % 2 == 0 && n % blocksize == 0,
              "n=", n, " must be a multiple of the even blocksize ", blocksize);
  TORCH_CHECK(midpoints.numel() == 15 && midpoints.scalar_type() == at::kFloat, "15 float32 midpoints");
  TORCH_CHECK(packed.numel() == n / 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be uint8 [n / 2]");
  TORCH_CHECK(absmax.numel() == n / blocksize && absmax.scalar_type() == at::kFloat &&
                  absmax.is_contiguous(), "absmax must be float32 [n / blocksize]");
  float mid[15];
  std::memcpy(mid, midpoints.data_ptr<float>(), sizeof(mid));
  const bool bf16_in = x.scalar_type() == at::kBFloat16;
  const float* x_f32 = bf16_in ? nullptr : x.data_ptr<float>();
  const uint16_t* x_bf16 =
      bf16_in ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr;
  uint8_t* out = packed.data_ptr<uint8_t>();
  float* scales = absmax.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 65536 / blocksize);  // blocks per task
  at::parallel_for(0, n / blocksize, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> v(blocksize);
    std::vector<uint8_t> q(blocksize);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t e0 = b * blocksize;
      if (bf16_in) {
        for (int64_t i = 0; i < blocksize; ++i) {
          const uint32_t bits = static_cast<uint32_t>(x_bf16[e0 + i]) << 16;  // exact widening
          std::memcpy(&v[i], &bits, sizeof(float));
        }
      } else {
        std::memcpy(v.data(), x_f32 + e0, blocksize * sizeof(float));
      }
      float m = 0.0f;
#pragma omp simd reduction(max : m)
      for (int64_t i = 0; i < blocksize; ++i) m = std::max(m, std::fabs(v[i]));
      scales[b] = m;
      const float inv = 1.0f / std::max(m, 1e-38f);
#pragma omp simd
      for (int64_t i = 0; i < blocksize; ++i) {
        const float s = std::min(std::max(v[i] * inv, -1.0f), 1.0f);
        int32_t c = 0;
        for (int j = 0; j < 15; ++j) c += (s <= mid[j]) ? 0 : 1;
        q[i] = static_cast<uint8_t>(c);
      }
      for (int64_t i = 0; i < blocksize; i += 2) out[(e0 + i) / 2] = (q[i] << 4) | q[i + 1];
    }
  });
}

int64_t isa() { return QLORA_ISA; }

// in_features that run the SIMD row kernel are multiples of this; 0: the scalar build
int64_t group_size() {
#if QLORA_ISA != 0
  return kGroup;
#else
  return 0;
#endif
}

}  // namespace

#define QLORA_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)  // expands QLORA_NAMESPACE before pasting

QLORA_LIBRARY(QLORA_NAMESPACE, m) {
  m.def(
      "matmul(Tensor x, Tensor packed, Tensor absmax, Tensor nf4_code, Tensor? dynamic_code, "
      "Tensor? absmax_scale, Tensor? absmax_offset, int absmax_group, int out_features, "
      "int blocksize, Tensor? bias, bool bf16_out, Tensor? lora_a=None, Tensor? lora_b=None, "
      "float lora_scaling=0.0, Tensor? lora_rows=None, int lora_span=1) -> Tensor",
      &matmul);
  m.def(
      "dequantize(Tensor packed, Tensor absmax, Tensor nf4_code, Tensor? dynamic_code, "
      "Tensor? absmax_scale, Tensor? absmax_offset, int absmax_group, int blocksize, "
      "Tensor(a!) out) -> ()",
      &dequantize);
  m.def(
      "quantize(Tensor x, Tensor midpoints, int blocksize, Tensor(a!) packed, Tensor(b!) absmax) "
      "-> ()",
      &quantize);
  m.def("isa() -> int", &isa);
  m.def("group_size() -> int", &group_size);
}

// export-engine's ONNX Runtime operators (domain "ai.export_engine"), built on first use by
// export_engine.runners.ort_ops: with nvcc for the CUDA provider (and the CPU one), with a C++ compiler for the
// CPU provider alone (tests on machines without CUDA).
//
// BiasRotarySplit: the element-wise tail of an attention block's input projection in one pass over memory.
//
//   inputs   P     (B, N, W)  T       the projection's product, without its bias
//            bias  (W,)       T
//            cos   (N, D/2)   float   per-token angle tables of the rotated pairs (optional: no rotation)
//            sin   (N, D/2)   float
//   outputs  Y_0 .. Y_{k-1}   (B, N, W/k) T, k = len(rotate)
//   attrs    rotate (ints, one per output: 1 = rotate), head_dim (int D)
//
//   X = P + bias, split along the last axis into k equal parts Y_j. A rotated part rotates each pair of adjacent
//   values (2i, 2i + 1) of a head of D values by token n's angle i: (a, b) -> (a cos - b sin, b cos + a sin).
//   T is float16 or float; arithmetic is in float, and each output value is rounded once.
//
// ONNX Runtime's CUDA provider runs that chain as an Add, a Split and one RotaryEmbedding per rotated part, each
// a kernel that reads and writes the whole tensor. Here one thread block takes one token: each thread moves 16
// bytes at a time, reads them once, adds the bias, rotates, and writes them to their part.
//
// BiasActivation: a convolution's bias with what follows it, for convolutions run without their bias.
//
//   inputs   X         (N, C, spatial...)  T
//            bias      (C,)                T
//            residual  X's shape           T   (optional)
//   output   Y = act(X + bias[c] (+ residual)), act = identity or ReLU (attr relu: 0 or 1)
//   channels_last (attr, default 0): X is (N, spatial..., C) and the bias runs along the last axis
//
// ONNX Runtime's CUDA Conv adds its bias with a cuDNN kernel of its own after the convolution, and the ReLU or
// residual Add that follows is one more kernel over the same tensor: here it is one.
//
// ResizeBilinear: ONNX Resize with mode "linear" and coordinate_transformation_mode "align_corners" on the two
// last axes of an (N, C, H, W) tensor by whole factors (attr scale = [sh, sw]), as DPT's upsampling uses it.
//
//   output (N, C, H*sh, W*sw); output pixel (y, x) samples the input at (y * (H-1)/(H*sh-1), x * (W-1)/(W*sw-1))
//   (0 along an axis of one output pixel) and interpolates its four neighbours in float.
//
// One thread writes 16 bytes of an output row; ONNX Runtime's kernel writes one value a thread.
// channels_last (attr, default 0): X is (N, H, W, C), the output (N, H*sh, W*sw, C).
//
// MatMulBiasGelu: a transformer MLP's first layer with its activation, Y = GELU(X W + bias), float16 only.
//
//   inputs   X (..., K), W (K, N), bias (N,)   float16
//   output   Y (..., N)                        float16
//
//   GELU is the tanh form 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the one cuBLASLt's epilogue computes;
//   products accumulate in float (the CPU kernel rounds each output value once; on CUDA, cuBLASLt's heuristic
//   picks the algorithm, including how a sum split over K is reduced).
//
// ONNX Runtime runs the layer as a MatMul that writes the block's widest activation and a BiasGelu that reads it
// and writes it again. On CUDA this operator is one cuBLASLt matmul whose epilogue adds the bias and applies GELU.
// cuBLASLt is opened at run time (the libcublasLt of nvcc's CUDA major version, the one ONNX Runtime's CUDA
// provider has already loaded), so the library links nothing beyond the CUDA runtime.
//
// ChannelLayerNorm: LayerNorm over the channel axis of a channels-first tensor (the LayerNorm3d / LayerNorm2d of
// convolutional necks and upsamplers), optionally followed by exact GELU.
//
//   inputs   X (N, C, spatial...) T, weight (C,) T, bias (C,) T
//   output   Y = act((X - mean_c) / sqrt(var_c + epsilon) * weight[c] + bias[c]), mean and (biased) variance over
//            C at each (n, spatial) position, computed in float in two passes; act = identity or GELU (attr gelu)
//   attrs    epsilon (float), gelu (int, 0 or 1)
//
// Exported, each such norm is a Cast to float, two ReduceMeans, Sub, Pow, Add, Sqrt, Div, a Cast back, Mul and
// Add: eleven kernels over the tensor. Here it is one: a thread block takes 32 consecutive positions (coalesced
// along the spatial axis) and splits the channels over its 8 rows of threads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "ort_abi.h"

#ifdef __CUDACC__
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#endif

namespace {

const ee_ort::Api* g_api = nullptr;

constexpr int kMaxParts = 4;
constexpr int kFloat = 1;     // ONNX element types
constexpr int kFloat16 = 10;

struct Shape {
  int64_t rows = 0;    // B * N
  int64_t tokens = 0;  // N
  int64_t width = 0;   // W
};

struct Attrs {
  std::vector<int64_t> rotate;
  int64_t head_dim = 0;
};

// ---- float16 on the host (round to nearest even) ----------------------------------------------------------

float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int shift = 0;
      while (!(man & 0x400u)) {
        man <<= 1;
        ++shift;
      }
      man &= 0x3ffu;
      bits = sign | static_cast<uint32_t>(113 - shift) << 23 | man << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 112) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) return sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u);  // inf, nan
  if (abs >= 0x477ff000u) return sign | 0x7c00u;                                      // rounds past 65504
  if (abs < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (abs < 0x33000000u) return sign;
    uint32_t man = (abs & 0x7fffffu) | 0x800000u;
    int shift = 126 - static_cast<int>(abs >> 23);  // 14 .. 24
    uint32_t value = man >> shift;
    uint32_t rest = man & ((1u << shift) - 1);
    uint32_t halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (value & 1u))) ++value;
    return sign | static_cast<uint16_t>(value);
  }
  uint32_t value = ((abs >> 23) - 112) << 10 | (abs & 0x7fffffu) >> 13;
  uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (value & 1u))) ++value;
  return sign | static_cast<uint16_t>(value);
}

// ---- the CPU kernel ---------------------------------------------------------------------------------------

template <typename T>
float load(const T* p, int64_t i) {
  if constexpr (sizeof(T) == 2) {
    return half_to_float(reinterpret_cast<const uint16_t*>(p)[i]);
  } else {
    return reinterpret_cast<const float*>(p)[i];
  }
}

template <typename T>
void store(T* p, int64_t i, float v) {
  if constexpr (sizeof(T) == 2) {
    reinterpret_cast<uint16_t*>(p)[i] = float_to_half(v);
  } else {
    reinterpret_cast<float*>(p)[i] = v;
  }
}

template <typename T>
void bias_rotary_split_cpu(const T* p, const T* bias, const float* cos, const float* sin, T* const* out,
                           const Attrs& a, const Shape& s) {
  const int64_t parts = static_cast<int64_t>(a.rotate.size());
  const int64_t part_width = s.width / parts;
  const int64_t half = a.head_dim / 2;
  for (int64_t row = 0; row < s.rows; ++row) {
    const int64_t n = row % s.tokens;
    for (int64_t part = 0; part < parts; ++part) {
      const int64_t base = part * part_width;
      T* y = out[part] + row * part_width;
      for (int64_t c = 0; c < part_width; c += 2) {
        float x0 = load(p, row * s.width + base + c) + load(bias, base + c);
        float x1 = load(p, row * s.width + base + c + 1) + load(bias, base + c + 1);
        if (a.rotate[part]) {
          const int64_t i = n * half + (c % a.head_dim) / 2;
          const float cs = cos[i], sn = sin[i];
          const float r0 = x0 * cs - x1 * sn, r1 = x1 * cs + x0 * sn;
          x0 = r0;
          x1 = r1;
        }
        store(y, c, x0);
        store(y, c + 1, x1);
      }
    }
  }
}

template <typename T>
void bias_activation_cpu(const T* x, const T* bias, const T* residual, T* y, int64_t planes, int64_t channels,
                         int64_t plane, bool relu) {
  for (int64_t q = 0; q < planes; ++q) {
    const float b = load(bias, q % channels);
    for (int64_t i = q * plane; i < (q + 1) * plane; ++i) {
      float v = load(x, i);
      if (residual) v += load(residual, i);
      v += b;
      store(y, i, relu && !(v > 0.f) ? 0.f : v);  // as on CUDA: ReLU(NaN) = 0
    }
  }
}

template <typename T>
void bias_activation_last_cpu(const T* x, const T* bias, const T* residual, T* y, int64_t total, int64_t channels,
                              bool relu) {
  for (int64_t i = 0; i < total; ++i) {
    float v = load(x, i);
    if (residual) v += load(residual, i);
    v += load(bias, i % channels);
    store(y, i, relu && !(v > 0.f) ? 0.f : v);
  }
}

struct Resize {
  int64_t planes = 0, in_h = 0, in_w = 0, out_h = 0, out_w = 0;
  float step_y = 0.f, step_x = 0.f;  // input pixels per output pixel (align_corners)
  int64_t channels = 1;              // channels last: values per pixel (planes then counts images)
};

Resize resize_shape(int64_t planes, int64_t h, int64_t w, int64_t sh, int64_t sw) {
  Resize r{planes, h, w, h * sh, w * sw, 0.f, 0.f};
  r.step_y = r.out_h > 1 ? static_cast<float>(h - 1) / static_cast<float>(r.out_h - 1) : 0.f;
  r.step_x = r.out_w > 1 ? static_cast<float>(w - 1) / static_cast<float>(r.out_w - 1) : 0.f;
  return r;
}

// Where output index i samples along an axis of n input values: the lower neighbour, the upper one, its weight.
inline void sample(int64_t i, float step, int64_t n, int64_t* lo, int64_t* hi, float* w) {
  const float at = static_cast<float>(i) * step;
  int64_t low = static_cast<int64_t>(at);  // at >= 0: truncation is floor
  if (low > n - 1) low = n - 1;
  *lo = low;
  *hi = low + 1 < n ? low + 1 : n - 1;
  *w = at - static_cast<float>(low);
}

// Channels last: planes = images, each pixel r.channels values.
template <typename T>
void resize_bilinear_last_cpu(const T* x, T* y, const Resize& r) {
  const int64_t c_n = r.channels;
  for (int64_t q = 0; q < r.planes; ++q) {
    const T* in = x + q * r.in_h * r.in_w * c_n;
    T* out = y + q * r.out_h * r.out_w * c_n;
    for (int64_t oy = 0; oy < r.out_h; ++oy) {
      int64_t y0, y1;
      float wy;
      sample(oy, r.step_y, r.in_h, &y0, &y1, &wy);
      for (int64_t ox = 0; ox < r.out_w; ++ox) {
        int64_t x0, x1;
        float wx;
        sample(ox, r.step_x, r.in_w, &x0, &x1, &wx);
        for (int64_t c = 0; c < c_n; ++c) {
          const float top = load(in, (y0 * r.in_w + x0) * c_n + c) * (1.f - wx) + load(in, (y0 * r.in_w + x1) * c_n + c) * wx;
          const float bottom =
              load(in, (y1 * r.in_w + x0) * c_n + c) * (1.f - wx) + load(in, (y1 * r.in_w + x1) * c_n + c) * wx;
          store(out, (oy * r.out_w + ox) * c_n + c, top * (1.f - wy) + bottom * wy);
        }
      }
    }
  }
}

template <typename T>
void resize_bilinear_cpu(const T* x, T* y, const Resize& r) {
  for (int64_t q = 0; q < r.planes; ++q) {
    const T* in = x + q * r.in_h * r.in_w;
    T* out = y + q * r.out_h * r.out_w;
    for (int64_t oy = 0; oy < r.out_h; ++oy) {
      int64_t y0, y1;
      float wy;
      sample(oy, r.step_y, r.in_h, &y0, &y1, &wy);
      for (int64_t ox = 0; ox < r.out_w; ++ox) {
        int64_t x0, x1;
        float wx;
        sample(ox, r.step_x, r.in_w, &x0, &x1, &wx);
        const float top = load(in, y0 * r.in_w + x0) * (1.f - wx) + load(in, y0 * r.in_w + x1) * wx;
        const float bottom = load(in, y1 * r.in_w + x0) * (1.f - wx) + load(in, y1 * r.in_w + x1) * wx;
        store(out, oy * r.out_w + ox, top * (1.f - wy) + bottom * wy);
      }
    }
  }
}

inline float gelu_tanh(float x) {
  const float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.0f + std::tanh(inner));
}

// x (m, k), w (k, n), bias (n,), y (m, n), float16 bits; row by row, accumulating in float.
void matmul_bias_gelu_cpu(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t m,
                          int64_t n, int64_t k) {
  std::vector<float> wf(static_cast<size_t>(k * n)), acc(static_cast<size_t>(n));
  for (int64_t i = 0; i < k * n; ++i) wf[i] = half_to_float(w[i]);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t j = 0; j < n; ++j) acc[j] = 0.f;
    for (int64_t kk = 0; kk < k; ++kk) {
      const float xv = half_to_float(x[r * k + kk]);
      const float* wr = wf.data() + kk * n;
      for (int64_t j = 0; j < n; ++j) acc[j] += xv * wr[j];
    }
    for (int64_t j = 0; j < n; ++j) y[r * n + j] = float_to_half(gelu_tanh(acc[j] + half_to_float(bias[j])));
  }
}

inline float gelu_erf(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.7071067811865476f)); }

template <typename T>
void channel_layer_norm_cpu(const T* x, const T* w, const T* b, T* y, int64_t n, int64_t c, int64_t s, float eps,
                            bool gelu) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t p = 0; p < s; ++p) {
      const int64_t base = i * c * s + p;
      float sum = 0.f;
      for (int64_t k = 0; k < c; ++k) sum += load(x, base + k * s);
      const float mean = sum / static_cast<float>(c);
      float sq = 0.f;
      for (int64_t k = 0; k < c; ++k) {
        const float d = load(x, base + k * s) - mean;
        sq += d * d;
      }
      const float inv = 1.0f / std::sqrt(sq / static_cast<float>(c) + eps);
      for (int64_t k = 0; k < c; ++k) {
        float v = (load(x, base + k * s) - mean) * inv * load(w, k) + load(b, k);
        store(y, base + k * s, gelu ? gelu_erf(v) : v);
      }
    }
  }
}

// ---- the CUDA kernel --------------------------------------------------------------------------------------

#ifdef __CUDACC__

template <typename T>
struct Outputs {
  T* part[kMaxParts];
};

__device__ inline float to_float(__half v) { return __half2float(v); }
__device__ inline float to_float(float v) { return v; }
template <typename T>
__device__ inline T from_float(float v);
template <>
__device__ inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ inline float from_float<float>(float v) { return v; }

template <typename T, int V>
__device__ inline void load_vec(const T* src, float (&x)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    alignas(16) T v[V];
    *reinterpret_cast<int4*>(v) = __ldg(reinterpret_cast<const int4*>(src));
#pragma unroll
    for (int j = 0; j < V; ++j) x[j] = to_float(v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) x[j] = to_float(src[j]);
  }
}

template <typename T, int V>
__device__ inline void store_vec(T* dst, const float (&x)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    alignas(16) T v[V];
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = from_float<T>(x[j]);
    *reinterpret_cast<int4*>(dst) = *reinterpret_cast<const int4*>(v);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) dst[j] = from_float<T>(x[j]);
  }
}

// A block takes ROWS tokens (threadIdx.y) and its threads walk a token 16 bytes at a time (V values, V/2 rotation
// pairs of one head; the part width and D are multiples of V: checked), loading that column of every part before
// computing and storing any, so no thread divides a flat index and each has several loads in flight.
template <typename T>
__global__ void bias_rotary_split_kernel(const T* __restrict__ p, const T* __restrict__ bias,
                                         const float* __restrict__ cos, const float* __restrict__ sin,
                                         Outputs<T> out, int64_t rows, int64_t tokens, int parts, int part_width,
                                         int head_dim, unsigned rotate_mask) {
  constexpr int V = 16 / sizeof(T);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const int64_t angles = (row % tokens) * (head_dim / 2);
  const T* src = p + row * parts * part_width;
  for (int c = threadIdx.x * V; c < part_width; c += blockDim.x * V) {
    float x[kMaxParts][V];
#pragma unroll
    for (int part = 0; part < kMaxParts; ++part) {
      if (part < parts) load_vec<T, V>(src + part * part_width + c, x[part]);
    }
    float cs[V / 2], sn[V / 2];
    if (rotate_mask) {
      const int64_t angle = angles + (c % head_dim) / 2;
      if constexpr (V / 2 == 4) {
        *reinterpret_cast<float4*>(cs) = __ldg(reinterpret_cast<const float4*>(cos + angle));
        *reinterpret_cast<float4*>(sn) = __ldg(reinterpret_cast<const float4*>(sin + angle));
      } else {
        *reinterpret_cast<float2*>(cs) = __ldg(reinterpret_cast<const float2*>(cos + angle));
        *reinterpret_cast<float2*>(sn) = __ldg(reinterpret_cast<const float2*>(sin + angle));
      }
    }
#pragma unroll
    for (int part = 0; part < kMaxParts; ++part) {
      if (part >= parts) break;
      float b[V];
      load_vec<T, V>(bias + part * part_width + c, b);
#pragma unroll
      for (int j = 0; j < V; ++j) x[part][j] += b[j];
      if ((rotate_mask >> part) & 1u) {
#pragma unroll
        for (int j = 0; j < V / 2; ++j) {
          const float a0 = x[part][2 * j], a1 = x[part][2 * j + 1];
          x[part][2 * j] = a0 * cs[j] - a1 * sn[j];
          x[part][2 * j + 1] = a1 * cs[j] + a0 * sn[j];
        }
      }
      store_vec<T, V>(out.part[part] + row * part_width + c, x[part]);
    }
  }
}

int threads_for(int64_t chunks, int most) {
  const int64_t warps = (chunks + 31) / 32;
  return static_cast<int>(warps * 32 < most ? warps * 32 : most);
}

template <typename T>
cudaError_t bias_rotary_split_cuda(const void* p, const void* bias, const float* cos, const float* sin,
                                   void* const* out, const Attrs& a, const Shape& s, cudaStream_t stream) {
  Outputs<T> parts{};
  unsigned mask = 0;
  for (size_t j = 0; j < a.rotate.size(); ++j) {
    parts.part[j] = static_cast<T*>(out[j]);
    if (a.rotate[j]) mask |= 1u << j;
  }
  constexpr int V = 16 / sizeof(T);
  const int count = static_cast<int>(a.rotate.size());
  const int64_t part_width = s.width / count;
  if (s.rows == 0 || part_width == 0) return cudaSuccess;
  const int x = threads_for(part_width / V, 256);
  const int y = 256 / x > 0 ? 256 / x : 1;  // tokens per block: about 256 threads a block
  const dim3 block(x, y);
  const auto grid = static_cast<unsigned>((s.rows + y - 1) / y);
  bias_rotary_split_kernel<T><<<grid, block, 0, stream>>>(static_cast<const T*>(p), static_cast<const T*>(bias), cos,
                                                          sin, parts, s.rows, s.tokens, count,
                                                          static_cast<int>(part_width), static_cast<int>(a.head_dim),
                                                          mask);
  return cudaGetLastError();
}

// One block per (image, channel) plane: one bias value, no index arithmetic per element. V values a step where
// the plane size allows 16-byte steps, else one.
template <typename T, int V>
__global__ void bias_activation_kernel(const T* __restrict__ x, const T* __restrict__ bias,
                                       const T* __restrict__ residual, T* __restrict__ y, int64_t channels,
                                       int64_t plane, bool relu) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * plane;
  const float b = to_float(bias[blockIdx.x % channels]);
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * V; i < plane; i += static_cast<int64_t>(blockDim.x) * V) {
    float v[V];
    load_vec<T, V>(x + base + i, v);
    if (residual) {
      float r[V];
      load_vec<T, V>(residual + base + i, r);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] += r[j];
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      v[j] += b;
      if (relu) v[j] = v[j] > 0.f ? v[j] : 0.f;
    }
    store_vec<T, V>(y + base + i, v);
  }
}

template <typename T>
cudaError_t bias_activation_cuda(const void* x, const void* bias, const void* residual, void* y, int64_t planes,
                                 int64_t channels, int64_t plane, bool relu, bool aligned, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (planes == 0 || plane == 0) return cudaSuccess;
  const auto* xt = static_cast<const T*>(x);
  const auto* bt = static_cast<const T*>(bias);
  const auto* rt = static_cast<const T*>(residual);
  auto* yt = static_cast<T*>(y);
  if (aligned && plane % V == 0) {
    bias_activation_kernel<T, V><<<static_cast<unsigned>(planes), threads_for(plane / V, 256), 0, stream>>>(
        xt, bt, rt, yt, channels, plane, relu);
  } else {
    bias_activation_kernel<T, 1><<<static_cast<unsigned>(planes), threads_for(plane, 256), 0, stream>>>(
        xt, bt, rt, yt, channels, plane, relu);
  }
  return cudaGetLastError();
}

// One thread per V consecutive outputs of one output row (V = 16 bytes' worth where the row allows, else 1).
template <typename T, int V>
__global__ void resize_bilinear_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t in_h, int64_t in_w,
                                       int64_t out_h, int64_t out_w, float step_y, float step_x) {
  const int64_t row = blockIdx.x;  // plane * out_h + oy
  const int64_t plane = row / out_h;
  const int64_t oy = row - plane * out_h;
  const float at_y = static_cast<float>(oy) * step_y;
  int64_t y0 = static_cast<int64_t>(at_y);
  if (y0 > in_h - 1) y0 = in_h - 1;
  const int64_t y1 = y0 + 1 < in_h ? y0 + 1 : in_h - 1;
  const float wy = at_y - static_cast<float>(y0);
  const T* top = x + (plane * in_h + y0) * in_w;
  const T* bottom = x + (plane * in_h + y1) * in_w;
  T* out = y + row * out_w;
  for (int64_t ox0 = static_cast<int64_t>(threadIdx.x) * V; ox0 < out_w; ox0 += static_cast<int64_t>(blockDim.x) * V) {
    float v[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float at_x = static_cast<float>(ox0 + j) * step_x;
      int64_t x0 = static_cast<int64_t>(at_x);
      if (x0 > in_w - 1) x0 = in_w - 1;
      const int64_t x1 = x0 + 1 < in_w ? x0 + 1 : in_w - 1;
      const float wx = at_x - static_cast<float>(x0);
      const float t = to_float(top[x0]) * (1.f - wx) + to_float(top[x1]) * wx;
      const float b = to_float(bottom[x0]) * (1.f - wx) + to_float(bottom[x1]) * wx;
      v[j] = t * (1.f - wy) + b * wy;
    }
    store_vec<T, V>(out + ox0, v);
  }
}

template <typename T>
cudaError_t resize_bilinear_cuda(const void* x, void* y, const Resize& r, bool aligned, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t rows = r.planes * r.out_h;
  if (rows == 0 || r.out_w == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const auto* xt = static_cast<const T*>(x);
  auto* yt = static_cast<T*>(y);
  if (aligned && r.out_w % V == 0) {
    resize_bilinear_kernel<T, V><<<static_cast<unsigned>(rows), threads_for(r.out_w / V, 256), 0, stream>>>(
        xt, yt, r.in_h, r.in_w, r.out_h, r.out_w, r.step_y, r.step_x);
  } else {
    resize_bilinear_kernel<T, 1><<<static_cast<unsigned>(rows), threads_for(r.out_w, 256), 0, stream>>>(
        xt, yt, r.in_h, r.in_w, r.out_h, r.out_w, r.step_y, r.step_x);
  }
  return cudaGetLastError();
}

// Channels last: the bias index is the flat index modulo C; V values a step where C allows 16-byte steps.
template <typename T, int V>
__global__ void bias_activation_last_kernel(const T* __restrict__ x, const T* __restrict__ bias,
                                            const T* __restrict__ residual, T* __restrict__ y, int64_t total,
                                            int64_t channels, bool relu) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < total; i += stride) {
    float v[V], b[V];
    load_vec<T, V>(x + i, v);
    load_vec<T, V>(bias + i % channels, b);
    if (residual) {
      float r[V];
      load_vec<T, V>(residual + i, r);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] += r[j];
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      v[j] += b[j];
      if (relu) v[j] = v[j] > 0.f ? v[j] : 0.f;
    }
    store_vec<T, V>(y + i, v);
  }
}

template <typename T>
cudaError_t bias_activation_last_cuda(const void* x, const void* bias, const void* residual, void* y, int64_t total,
                                      int64_t channels, bool relu, bool aligned, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (total == 0) return cudaSuccess;
  const auto* xt = static_cast<const T*>(x);
  const auto* bt = static_cast<const T*>(bias);
  const auto* rt = static_cast<const T*>(residual);
  auto* yt = static_cast<T*>(y);
  const bool vector = aligned && channels % V == 0;
  const int64_t steps = vector ? total / V : total;
  const auto blocks = static_cast<unsigned>(steps / 256 + 1 < 8192 ? steps / 256 + 1 : 8192);
  if (vector) {
    bias_activation_last_kernel<T, V><<<blocks, 256, 0, stream>>>(xt, bt, rt, yt, total, channels, relu);
  } else {
    bias_activation_last_kernel<T, 1><<<blocks, 256, 0, stream>>>(xt, bt, rt, yt, total, channels, relu);
  }
  return cudaGetLastError();
}

// Channels last: a block per output row (image, y); its threads take V channels of one output pixel at a time.
template <typename T, int V>
__global__ void resize_bilinear_last_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t in_h, int64_t in_w,
                                            int64_t out_h, int64_t out_w, int64_t channels, float step_y,
                                            float step_x) {
  const int64_t row = blockIdx.x;
  const int64_t image = row / out_h;
  const int64_t oy = row - image * out_h;
  const float at_y = static_cast<float>(oy) * step_y;
  int64_t y0 = static_cast<int64_t>(at_y);
  if (y0 > in_h - 1) y0 = in_h - 1;
  const int64_t y1 = y0 + 1 < in_h ? y0 + 1 : in_h - 1;
  const float wy = at_y - static_cast<float>(y0);
  const T* top = x + (image * in_h + y0) * in_w * channels;
  const T* bottom = x + (image * in_h + y1) * in_w * channels;
  T* out = y + row * out_w * channels;
  const int64_t vectors = channels / V;
  for (int64_t idx = threadIdx.x; idx < out_w * vectors; idx += blockDim.x) {
    const int64_t ox = idx / vectors;
    const int64_t c = (idx - ox * vectors) * V;
    const float at_x = static_cast<float>(ox) * step_x;
    int64_t x0 = static_cast<int64_t>(at_x);
    if (x0 > in_w - 1) x0 = in_w - 1;
    const int64_t x1 = x0 + 1 < in_w ? x0 + 1 : in_w - 1;
    const float wx = at_x - static_cast<float>(x0);
    float a[V], b[V], cc[V], d[V], v[V];
    load_vec<T, V>(top + x0 * channels + c, a);
    load_vec<T, V>(top + x1 * channels + c, b);
    load_vec<T, V>(bottom + x0 * channels + c, cc);
    load_vec<T, V>(bottom + x1 * channels + c, d);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      v[j] = (a[j] * (1.f - wx) + b[j] * wx) * (1.f - wy) + (cc[j] * (1.f - wx) + d[j] * wx) * wy;
    }
    store_vec<T, V>(out + ox * channels + c, v);
  }
}

template <typename T>
cudaError_t resize_bilinear_last_cuda(const void* x, void* y, const Resize& r, bool aligned, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t rows = r.planes * r.out_h;
  if (rows == 0 || r.out_w == 0 || r.channels == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const auto* xt = static_cast<const T*>(x);
  auto* yt = static_cast<T*>(y);
  if (aligned && r.channels % V == 0) {
    resize_bilinear_last_kernel<T, V><<<static_cast<unsigned>(rows), 256, 0, stream>>>(
        xt, yt, r.in_h, r.in_w, r.out_h, r.out_w, r.channels, r.step_y, r.step_x);
  } else {
    resize_bilinear_last_kernel<T, 1><<<static_cast<unsigned>(rows), 256, 0, stream>>>(
        xt, yt, r.in_h, r.in_w, r.out_h, r.out_w, r.channels, r.step_y, r.step_x);
  }
  return cudaGetLastError();
}

// Block (32, 8): threadIdx.x walks 32 consecutive positions, threadIdx.y the channels 8 apart; channel sums meet
// in shared memory. Three reads of each value (mean, variance, output), the later ones mostly from L1/L2.
template <typename T>
__global__ void channel_layer_norm_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                                          T* __restrict__ y, int64_t c, int64_t s, int64_t blocks_per_image,
                                          float eps, bool gelu) {
  __shared__ float part[8][33];
  const int64_t image = blockIdx.x / blocks_per_image;
  const int64_t p = (blockIdx.x % blocks_per_image) * 32 + threadIdx.x;
  const bool live = p < s;
  const int64_t base = image * c * s + p;
  float sum = 0.f;
  if (live) {
    for (int64_t k = threadIdx.y; k < c; k += 8) sum += to_float(x[base + k * s]);
  }
  part[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  float mean = 0.f;
#pragma unroll
  for (int r = 0; r < 8; ++r) mean += part[r][threadIdx.x];
  mean /= static_cast<float>(c);
  __syncthreads();
  float sq = 0.f;
  if (live) {
    for (int64_t k = threadIdx.y; k < c; k += 8) {
      const float d = to_float(x[base + k * s]) - mean;
      sq += d * d;
    }
  }
  part[threadIdx.y][threadIdx.x] = sq;
  __syncthreads();
  float var = 0.f;
#pragma unroll
  for (int r = 0; r < 8; ++r) var += part[r][threadIdx.x];
  const float inv = rsqrtf(var / static_cast<float>(c) + eps);
  if (!live) return;
  for (int64_t k = threadIdx.y; k < c; k += 8) {
    float v = (to_float(x[base + k * s]) - mean) * inv * to_float(w[k]) + to_float(b[k]);
    if (gelu) v = 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
    y[base + k * s] = from_float<T>(v);
  }
}

template <typename T>
cudaError_t channel_layer_norm_cuda(const void* x, const void* w, const void* b, void* y, int64_t n, int64_t c,
                                    int64_t s, float eps, bool gelu, cudaStream_t stream) {
  if (n == 0 || s == 0) return cudaSuccess;
  const int64_t per_image = (s + 31) / 32;
  if (n * per_image > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 block(32, 8);
  channel_layer_norm_kernel<T><<<static_cast<unsigned>(n * per_image), block, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(b), static_cast<T*>(y), c, s,
      per_image, eps, gelu);
  return cudaGetLastError();
}

// ---- cuBLASLt, opened at run time -------------------------------------------------------------------------

// The slice of cuBLASLt's C API that MatMulBiasGelu uses; the values are those of its public header.
namespace lt {
using Handle = void*;
using Desc = void*;
using Layout = void*;
using Pref = void*;
struct Algo {
  uint64_t data[8];
};
struct Heuristic {
  Algo algo;
  size_t workspace;
  int state;
  float waves;
  int reserved[4];
};
constexpr int kCompute32F = 68;                            // cublasComputeType_t CUBLAS_COMPUTE_32F
constexpr int kR16F = 2, kR32F = 0;                        // cudaDataType_t
constexpr int kDescEpilogue = 7, kDescBiasPointer = 8;     // cublasLtMatmulDescAttributes_t
constexpr int kEpilogueGeluBias = 36;                      // cublasLtEpilogue_t: GELU (32) | BIAS (4)
constexpr int kPrefMaxWorkspace = 1;                       // cublasLtMatmulPreferenceAttributes_t
constexpr int kPrefMinAlignA = 5, kPrefMinAlignB = 6, kPrefMinAlignC = 7, kPrefMinAlignD = 8;
constexpr size_t kWorkspaceBytes = size_t{32} << 20;       // per stream
constexpr size_t kMaxPlans = 16;                           // shapes remembered per kernel

struct Library {
  std::string error;  // empty when every entry point was found
  int (*create)(Handle*) = nullptr;
  int (*desc_create)(Desc*, int, int) = nullptr;
  int (*desc_destroy)(Desc) = nullptr;
  int (*desc_set)(Desc, int, const void*, size_t) = nullptr;
  int (*layout_create)(Layout*, int, uint64_t, uint64_t, int64_t) = nullptr;
  int (*layout_destroy)(Layout) = nullptr;
  int (*pref_create)(Pref*) = nullptr;
  int (*pref_destroy)(Pref) = nullptr;
  int (*pref_set)(Pref, int, const void*, size_t) = nullptr;
  int (*heuristic)(Handle, Desc, Layout, Layout, Layout, Layout, Pref, int, Heuristic*, int*) = nullptr;
  int (*matmul)(Handle, Desc, const void*, const void*, Layout, const void*, Layout, const void*, const void*,
                Layout, void*, Layout, const Algo*, void*, size_t, cudaStream_t) = nullptr;
};

template <typename F>
void bind(void* handle, const char* name, F* fn, std::string* error) {
  *fn = reinterpret_cast<F>(dlsym(handle, name));
  if (!*fn && error->empty()) *error = std::string("libcublasLt has no ") + name;
}

Library open_library() {
  Library lib;
  const std::string soname = "libcublasLt.so." + std::to_string(CUDART_VERSION / 1000);
  void* handle = dlopen(soname.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    const char* why = dlerror();
    lib.error = "cannot open " + soname + " (" + (why ? why : "not found") + ")";
    return lib;
  }
  bind(handle, "cublasLtCreate", &lib.create, &lib.error);
  bind(handle, "cublasLtMatmulDescCreate", &lib.desc_create, &lib.error);
  bind(handle, "cublasLtMatmulDescDestroy", &lib.desc_destroy, &lib.error);
  bind(handle, "cublasLtMatmulDescSetAttribute", &lib.desc_set, &lib.error);
  bind(handle, "cublasLtMatrixLayoutCreate", &lib.layout_create, &lib.error);
  bind(handle, "cublasLtMatrixLayoutDestroy", &lib.layout_destroy, &lib.error);
  bind(handle, "cublasLtMatmulPreferenceCreate", &lib.pref_create, &lib.error);
  bind(handle, "cublasLtMatmulPreferenceDestroy", &lib.pref_destroy, &lib.error);
  bind(handle, "cublasLtMatmulPreferenceSetAttribute", &lib.pref_set, &lib.error);
  bind(handle, "cublasLtMatmulAlgoGetHeuristic", &lib.heuristic, &lib.error);
  bind(handle, "cublasLtMatmul", &lib.matmul, &lib.error);
  return lib;
}

// Process-wide state lives on the heap and is never destroyed: kernels may be released after static destructors
// have run (sessions that outlive the interpreter), and must still find it.
const Library& library() {
  static const Library* lib = new Library(open_library());
  return *lib;
}

// One workspace per (device, stream): a stream's work is ordered, so no two matmuls use one at once. Streams are
// told apart by their CUDA ids, which are never reused (a destroyed stream's handle can be). A workspace goes
// back to its device's spare list when the last kernel that used it is released, and a new stream takes a spare
// one before allocating; a kernel is only released with its session, after the session's work is done.
// A stream's id cannot be asked for while the stream is being captured into a CUDA graph (the query is not
// permitted there and invalidates the capture), so ids are asked for outside captures only and remembered per
// handle; a capture uses the id its handle had at the last uncaptured run (ONNX Runtime runs a graph once before
// it captures it), and no workspace where there was none.
using SpaceKey = std::pair<int, unsigned long long>;
struct Space {
  void* ptr = nullptr;
  int users = 0;
};
struct Shared {
  std::mutex mutex;
  std::map<int, Handle> handles;  // per device
  std::map<SpaceKey, Space> spaces;
  std::map<int, std::vector<void*>> spare;  // per device
  std::map<std::pair<int, uintptr_t>, unsigned long long> ids;  // (device, handle) -> id at its last uncaptured run
};
Shared& shared() {
  static Shared* state = new Shared;
  return *state;
}

// The stream's id, asked for outside captures only (see above); false while it is being captured with no id
// remembered for its handle. Called with Shared::mutex held.
bool stream_id(Shared* state, int device, cudaStream_t stream, bool capturing, unsigned long long* id) {
  const std::pair<int, uintptr_t> handle{device, reinterpret_cast<uintptr_t>(stream)};
  if (capturing) {
    auto known = state->ids.find(handle);
    if (known == state->ids.end()) return false;
    *id = known->second;
    return true;
  }
  *id = static_cast<unsigned long long>(handle.second);
#if CUDART_VERSION >= 12000
  if (cudaStreamGetId(stream, id) != cudaSuccess) {
    cudaGetLastError();
    *id = static_cast<unsigned long long>(handle.second);
  }
#endif
  state->ids[handle] = *id;
  return true;
}

// One shape's matmul: descriptors and the algorithm cuBLASLt's heuristic picked for it.
struct Plan {
  int64_t m = 0, n = 0, k = 0;
  int device = -1;
  uint32_t align = 0;
  size_t space = 0;
  const void* bias = nullptr;
  Desc desc = nullptr;
  Layout a = nullptr, b = nullptr, d = nullptr;
  Heuristic pick{};
};

uint32_t alignment(const void* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 2 && v % align) align /= 2;
  return align;
}

std::string status_text(const char* what, int status) {
  return std::string(what) + " failed (cuBLASLt status " + std::to_string(status) + ")";
}

}  // namespace lt

void release(lt::Plan* p) {
  const lt::Library& lib = lt::library();
  if (p->a) lib.layout_destroy(p->a);
  if (p->b) lib.layout_destroy(p->b);
  if (p->d) lib.layout_destroy(p->d);
  if (p->desc) lib.desc_destroy(p->desc);
  *p = lt::Plan{};
}

// A kernel's plans (the last shapes it has run) and the workspaces it uses, guarded by its own lock; released
// with the kernel (no CUDA call here: ONNX Runtime may release kernels from a stream callback).
struct GemmCache {
  std::mutex mutex;
  std::vector<lt::Plan> plans;
  std::vector<lt::SpaceKey> spaces;
  std::map<std::string, std::string> failed;  // shape -> why: not planned again
  ~GemmCache() {
    for (lt::Plan& p : plans) release(&p);
    if (spaces.empty()) return;
    lt::Shared& state = lt::shared();
    std::lock_guard<std::mutex> lock(state.mutex);
    for (const lt::SpaceKey& key : spaces) {
      auto it = state.spaces.find(key);
      if (it == state.spaces.end() || --it->second.users > 0) continue;
      state.spare[key.first].push_back(it->second.ptr);
      state.spaces.erase(it);
    }
  }
};

// The handle for the current device and ``cache``'s workspace on ``stream`` (a spare one, or a new allocation; none
// while the stream is being captured into a CUDA graph before it has one). Empty string on success.
std::string lt_context(GemmCache* cache, cudaStream_t stream, int* device, lt::Handle* handle, void** space,
                       size_t* bytes) {
  const lt::Library& lib = lt::library();
  if (cudaError_t err = cudaGetDevice(device)) return std::string("cudaGetDevice: ") + cudaGetErrorString(err);
  // (the one query that is legal while the stream is being captured; an error, e.g. the legacy stream while
  // another is capturing, counts as capturing)
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  const bool capturing =
      cudaStreamIsCapturing(stream, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone;
  if (capturing) cudaGetLastError();
  lt::Shared& state = lt::shared();
  std::lock_guard<std::mutex> lock(state.mutex);
  auto h = state.handles.find(*device);
  if (h == state.handles.end()) {
    lt::Handle created = nullptr;
    if (int st = lib.create(&created)) return lt::status_text("cublasLtCreate", st);
    h = state.handles.emplace(*device, created).first;
  }
  *handle = h->second;
  lt::SpaceKey key{*device, 0};
  if (!lt::stream_id(&state, *device, stream, capturing, &key.second)) {  // capturing, never seen: no workspace
    *space = nullptr;
    *bytes = 0;
    return "";
  }
  auto w = state.spaces.find(key);
  if (w == state.spaces.end()) {
    void* ptr = nullptr;
    std::vector<void*>& spare = state.spare[*device];
    if (!spare.empty()) {
      ptr = spare.back();
      spare.pop_back();
    } else if (!capturing) {
      // relaxed: an allocation on this thread must not invalidate another thread's capture
      cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
      cudaThreadExchangeStreamCaptureMode(&mode);
      if (cudaMalloc(&ptr, lt::kWorkspaceBytes) != cudaSuccess) ptr = nullptr;
      cudaThreadExchangeStreamCaptureMode(&mode);
      cudaGetLastError();  // a failed allocation leaves the workspace at none
    }
    if (ptr) w = state.spaces.emplace(key, lt::Space{ptr, 0}).first;
  }
  if (w != state.spaces.end() && std::find(cache->spaces.begin(), cache->spaces.end(), key) == cache->spaces.end()) {
    cache->spaces.push_back(key);
    ++w->second.users;
  }
  *space = w == state.spaces.end() ? nullptr : w->second.ptr;
  *bytes = *space ? lt::kWorkspaceBytes : 0;
  return "";
}

// Descriptors and the heuristic's algorithm for one shape; empty string on success.
std::string lt_plan(lt::Handle handle, lt::Plan* p) {
  const lt::Library& lib = lt::library();
  int st = lib.desc_create(&p->desc, lt::kCompute32F, lt::kR32F);
  if (st) return lt::status_text("cublasLtMatmulDescCreate", st);
  const int32_t epilogue = lt::kEpilogueGeluBias;
  if ((st = lib.desc_set(p->desc, lt::kDescEpilogue, &epilogue, sizeof epilogue))) {
    return lt::status_text("setting the GELU+bias epilogue", st);
  }
  if ((st = lib.desc_set(p->desc, lt::kDescBiasPointer, &p->bias, sizeof p->bias))) {
    return lt::status_text("setting the bias", st);
  }
  // Row-major Y (m, n) = X (m, k) W (k, n) is column-major Y^T = W^T X^T: A = W as (n, k), B = X as (k, m).
  if ((st = lib.layout_create(&p->a, lt::kR16F, p->n, p->k, p->n)) ||
      (st = lib.layout_create(&p->b, lt::kR16F, p->k, p->m, p->k)) ||
      (st = lib.layout_create(&p->d, lt::kR16F, p->n, p->m, p->n))) {
    return lt::status_text("cublasLtMatrixLayoutCreate", st);
  }
  lt::Pref pref = nullptr;
  if ((st = lib.pref_create(&pref))) return lt::status_text("cublasLtMatmulPreferenceCreate", st);
  const uint64_t space = p->space;
  st = lib.pref_set(pref, lt::kPrefMaxWorkspace, &space, sizeof space);
  for (int attr : {lt::kPrefMinAlignA, lt::kPrefMinAlignB, lt::kPrefMinAlignC, lt::kPrefMinAlignD}) {
    if (!st) st = lib.pref_set(pref, attr, &p->align, sizeof p->align);
  }
  int found = 0;
  if (!st) st = lib.heuristic(handle, p->desc, p->a, p->b, p->d, p->d, pref, 1, &p->pick, &found);
  lib.pref_destroy(pref);
  if (st) return lt::status_text("cublasLtMatmulAlgoGetHeuristic", st);
  if (found < 1) return "cuBLASLt has no algorithm for this shape with a GELU+bias epilogue";
  return "";
}

// Y = GELU(X W + bias) on ``stream``; empty string on success.
std::string matmul_bias_gelu_cuda(GemmCache* cache, const void* x, const void* w, const void* bias, void* y,
                                  int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  const lt::Library& lib = lt::library();
  if (!lib.error.empty()) return lib.error;
  if (m == 0 || n == 0) return "";
  if (k == 0) return "X's last axis (K) is empty";
  std::lock_guard<std::mutex> lock(cache->mutex);
  int device = -1;
  lt::Handle handle = nullptr;
  void* space = nullptr;
  size_t bytes = 0;
  std::string err = lt_context(cache, stream, &device, &handle, &space, &bytes);
  if (!err.empty()) return err;
  uint32_t align = lt::alignment(x);
  for (const void* ptr : {w, bias, static_cast<const void*>(y)}) align = std::min(align, lt::alignment(ptr));
  lt::Plan* plan = nullptr;
  for (lt::Plan& p : cache->plans) {
    if (p.m == m && p.n == n && p.k == k && p.device == device && p.align == align && p.space == bytes) plan = &p;
  }
  if (!plan) {
    const std::string shape = std::to_string(m) + "x" + std::to_string(n) + "x" + std::to_string(k) + "/" +
                              std::to_string(device) + "/" + std::to_string(align) + "/" + std::to_string(bytes);
    auto known = cache->failed.find(shape);
    if (known != cache->failed.end()) return known->second;
    if (cache->plans.size() >= lt::kMaxPlans) {  // the oldest shape makes room
      release(&cache->plans.front());
      cache->plans.erase(cache->plans.begin());
    }
    lt::Plan fresh;
    fresh.m = m, fresh.n = n, fresh.k = k, fresh.device = device, fresh.align = align, fresh.space = bytes;
    fresh.bias = bias;
    err = lt_plan(handle, &fresh);
    if (!err.empty()) {
      release(&fresh);
      cache->failed[shape] = err;
      return err;
    }
    cache->plans.push_back(fresh);
    plan = &cache->plans.back();
  }
  if (plan->bias != bias) {
    if (int st = lib.desc_set(plan->desc, lt::kDescBiasPointer, &bias, sizeof bias)) {
      return lt::status_text("setting the bias", st);
    }
    plan->bias = bias;
  }
  const float alpha = 1.0f, beta = 0.0f;
  if (int st = lib.matmul(handle, plan->desc, &alpha, w, plan->a, x, plan->b, &beta, y, plan->d, y, plan->d,
                          &plan->pick.algo, space, bytes, stream)) {
    return lt::status_text("cublasLtMatmul", st);
  }
  return "";  // (cuBLASLt has a CUDA runtime of its own: its launch errors come back in its status, not ours)
}

#else
struct GemmCache {};  // the CPU build keeps no cuBLASLt state
#endif  // __CUDACC__

// ---- the ONNX Runtime glue --------------------------------------------------------------------------------

enum class Which { kBiasRotarySplit, kBiasActivation, kResizeBilinear, kMatMulBiasGelu, kChannelLayerNorm };

const char* name_of(Which which) {
  switch (which) {
    case Which::kBiasRotarySplit:
      return "BiasRotarySplit";
    case Which::kBiasActivation:
      return "BiasActivation";
    case Which::kMatMulBiasGelu:
      return "MatMulBiasGelu";
    case Which::kChannelLayerNorm:
      return "ChannelLayerNorm";
    default:
      return "ResizeBilinear";
  }
}

struct Kernel {
  Which which;
  bool cuda = false;
  Attrs attrs;                     // BiasRotarySplit
  int64_t relu = 0;                // BiasActivation; ChannelLayerNorm: GELU after the norm
  float epsilon = 0.f;             // ChannelLayerNorm
  std::vector<int64_t> scale;      // ResizeBilinear: [sh, sw]
  int64_t channels_last = 0;       // BiasActivation, ResizeBilinear: (N, ..., C) layout
  std::unique_ptr<GemmCache> gemm;  // MatMulBiasGelu on CUDA: cuBLASLt plans per shape
};

struct Tensor {
  const OrtValue* value = nullptr;
  int type = 0;
  std::vector<int64_t> dims;
  void* data = nullptr;
};

OrtStatus* fail(Which which, const std::string& what) {
  return g_api->CreateStatus(ee_ort::kFail, ("export_engine " + std::string(name_of(which)) + ": " + what).c_str());
}

OrtStatus* describe(const OrtValue* value, Tensor* out) {
  out->value = value;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* st = g_api->GetTensorTypeAndShape(value, &info)) return st;
  size_t rank = 0;
  OrtStatus* st = g_api->GetTensorElementType(info, &out->type);
  if (!st) st = g_api->GetDimensionsCount(info, &rank);
  if (!st) {
    out->dims.resize(rank);
    st = g_api->GetDimensions(info, out->dims.data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (!st) st = g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &out->data);
  return st;
}

// The node's inputs (absent optional ones stay empty) and output count.
OrtStatus* gather(OrtKernelContext* context, Tensor (&t)[4], size_t* outputs) {
  size_t inputs = 0;
  if (OrtStatus* st = g_api->KernelContext_GetInputCount(context, &inputs)) return st;
  if (OrtStatus* st = g_api->KernelContext_GetOutputCount(context, outputs)) return st;
  for (size_t i = 0; i < inputs && i < 4; ++i) {
    const OrtValue* value = nullptr;
    if (OrtStatus* st = g_api->KernelContext_GetInput(context, i, &value)) return st;
    if (value) {
      if (OrtStatus* st = describe(value, &t[i])) return st;
    }
  }
  return nullptr;
}

OrtStatus* output(OrtKernelContext* context, size_t index, const std::vector<int64_t>& dims, void** data) {
  OrtValue* value = nullptr;
  if (OrtStatus* st = g_api->KernelContext_GetOutput(context, index, dims.data(), dims.size(), &value)) return st;
  return g_api->GetTensorMutableData(value, data);
}

std::string dims_text(const std::vector<int64_t>& dims) {
  std::string text = "(";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + ")";
}

#ifdef __CUDACC__
bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

OrtStatus* launched(Which op, cudaError_t err) {
  return err == cudaSuccess ? nullptr : fail(op, std::string("CUDA launch failed: ") + cudaGetErrorString(err));
}

OrtStatus* stream_of(OrtKernelContext* context, cudaStream_t* stream) {
  void* raw = nullptr;
  OrtStatus* st = g_api->KernelContext_GetGPUComputeStream(context, &raw);
  *stream = static_cast<cudaStream_t>(raw);
  return st;
}
#endif

OrtStatus* compute_bias_rotary_split(const Kernel& k, OrtKernelContext* context, Tensor (&t)[4], size_t outputs) {
  const Which op = k.which;
  const Attrs& a = k.attrs;
  if (outputs != a.rotate.size()) {
    return fail(op, "the node has " + std::to_string(outputs) + " outputs but " + std::to_string(a.rotate.size()) +
                        " rotate flags");
  }
  if (!t[0].value || !t[1].value) return fail(op, "inputs P and bias are required");
  const auto& pd = t[0].dims;
  if (pd.size() != 3) return fail(op, "P must be (B, N, W), got " + dims_text(pd));
  if (t[0].type != kFloat16 && t[0].type != kFloat) return fail(op, "P must be float16 or float");
  if (t[1].type != t[0].type || t[1].dims.size() != 1 || t[1].dims[0] != pd[2]) {
    return fail(op, "bias must be (" + std::to_string(pd[2]) + ",) of P's type, got " + dims_text(t[1].dims));
  }
  Shape s{pd[0] * pd[1], pd[1], pd[2]};
  const int64_t parts = static_cast<int64_t>(a.rotate.size());
  if (s.width % parts) return fail(op, "W = " + std::to_string(s.width) + " does not split into equal parts");
  const int64_t part_width = s.width / parts;
  if (part_width % 2) return fail(op, "each part must hold an even number of values (rotation pairs)");
  bool rotating = false;
  for (int64_t r : a.rotate) rotating = rotating || r;
  if (rotating) {
    if (!t[2].value || !t[3].value) return fail(op, "rotated outputs need the cos and sin inputs");
    for (int i = 2; i < 4; ++i) {
      const auto& d = t[i].dims;
      if (t[i].type != kFloat || d.size() != 2 || d[0] != s.tokens || d[1] != a.head_dim / 2) {
        return fail(op, "cos and sin must be float (" + std::to_string(s.tokens) + ", " +
                            std::to_string(a.head_dim / 2) + "), got " + dims_text(d));
      }
    }
    if (part_width % a.head_dim) return fail(op, "a part's width is not a whole number of heads");
  }
  const auto* cos = static_cast<const float*>(rotating ? t[2].data : nullptr);
  const auto* sin = static_cast<const float*>(rotating ? t[3].data : nullptr);
  void* out[kMaxParts] = {};
  for (int64_t j = 0; j < parts; ++j) {
    if (OrtStatus* st = output(context, static_cast<size_t>(j), {pd[0], pd[1], part_width}, &out[j])) return st;
  }
  if (!k.cuda) {
    if (t[0].type == kFloat16) {
      bias_rotary_split_cpu(static_cast<const uint16_t*>(t[0].data), static_cast<const uint16_t*>(t[1].data), cos,
                            sin, reinterpret_cast<uint16_t* const*>(out), a, s);
    } else {
      bias_rotary_split_cpu(static_cast<const float*>(t[0].data), static_cast<const float*>(t[1].data), cos, sin,
                            reinterpret_cast<float* const*>(out), a, s);
    }
    return nullptr;
  }
#ifdef __CUDACC__
  const int64_t vec = t[0].type == kFloat16 ? 8 : 4;
  if (part_width % vec || (rotating && a.head_dim % vec)) {
    return fail(op, "the part width and head size must be multiples of " + std::to_string(vec) + " on CUDA");
  }
  bool ok = aligned16(t[0].data) && aligned16(t[1].data) && (!rotating || (aligned16(cos) && aligned16(sin)));
  for (int64_t j = 0; j < parts; ++j) ok = ok && aligned16(out[j]);
  if (!ok) return fail(op, "tensors must be 16-byte aligned on CUDA");
  cudaStream_t stream = nullptr;
  if (OrtStatus* st = stream_of(context, &stream)) return st;
  cudaError_t err = t[0].type == kFloat16
                        ? bias_rotary_split_cuda<__half>(t[0].data, t[1].data, cos, sin, out, a, s, stream)
                        : bias_rotary_split_cuda<float>(t[0].data, t[1].data, cos, sin, out, a, s, stream);
  return launched(op, err);
#else
  return fail(op, "this build of the operator library has no CUDA kernels");
#endif
}

OrtStatus* compute_bias_activation(const Kernel& k, OrtKernelContext* context, Tensor (&t)[4], size_t) {
  const Which op = k.which;
  const bool last = k.channels_last != 0;
  if (!t[0].value || !t[1].value) return fail(op, "inputs X and bias are required");
  const auto& xd = t[0].dims;
  if (xd.size() < 2) return fail(op, "X must be (N, C, ...) or, channels last, (N, ..., C), got " + dims_text(xd));
  if (t[0].type != kFloat16 && t[0].type != kFloat) return fail(op, "X must be float16 or float");
  const int64_t channels = last ? xd.back() : xd[1];
  if (t[1].type != t[0].type || t[1].dims.size() != 1 || t[1].dims[0] != channels) {
    return fail(op, "bias must be (" + std::to_string(channels) + ",) of X's type, got " + dims_text(t[1].dims));
  }
  const void* residual = nullptr;
  if (t[2].value) {
    if (t[2].type != t[0].type || t[2].dims != xd) {
      return fail(op, "residual must have X's type and shape " + dims_text(xd) + ", got " + dims_text(t[2].dims));
    }
    residual = t[2].data;
  }
  int64_t total = 1;
  for (int64_t d : xd) total *= d;
  const int64_t planes = xd[0] * xd[1];
  const int64_t plane = planes ? total / planes : 0;
  void* y = nullptr;
  if (OrtStatus* st = output(context, 0, xd, &y)) return st;
  const bool relu = k.relu != 0;
  const void* x = t[0].data;
  const void* b = t[1].data;
  if (!k.cuda) {
    using H = uint16_t;
    if (t[0].type == kFloat16) {
      const auto* r = static_cast<const H*>(residual);
      if (last) {
        bias_activation_last_cpu(static_cast<const H*>(x), static_cast<const H*>(b), r, static_cast<H*>(y), total,
                                 channels, relu);
      } else {
        bias_activation_cpu(static_cast<const H*>(x), static_cast<const H*>(b), r, static_cast<H*>(y), planes,
                            channels, plane, relu);
      }
    } else {
      const auto* r = static_cast<const float*>(residual);
      if (last) {
        bias_activation_last_cpu(static_cast<const float*>(x), static_cast<const float*>(b), r,
                                 static_cast<float*>(y), total, channels, relu);
      } else {
        bias_activation_cpu(static_cast<const float*>(x), static_cast<const float*>(b), r, static_cast<float*>(y),
                            planes, channels, plane, relu);
      }
    }
    return nullptr;
  }
#ifdef __CUDACC__
  const bool aligned = aligned16(x) && aligned16(b) && aligned16(y) && (!residual || aligned16(residual));
  cudaStream_t stream = nullptr;
  if (OrtStatus* st = stream_of(context, &stream)) return st;
  const bool half = t[0].type == kFloat16;
  cudaError_t err;
  if (last) {
    err = half ? bias_activation_last_cuda<__half>(x, b, residual, y, total, channels, relu, aligned, stream)
               : bias_activation_last_cuda<float>(x, b, residual, y, total, channels, relu, aligned, stream);
  } else {
    err = half ? bias_activation_cuda<__half>(x, b, residual, y, planes, channels, plane, relu, aligned, stream)
               : bias_activation_cuda<float>(x, b, residual, y, planes, channels, plane, relu, aligned, stream);
  }
  return launched(op, err);
#else
  return fail(op, "this build of the operator library has no CUDA kernels");
#endif
}

OrtStatus* compute_resize_bilinear(const Kernel& k, OrtKernelContext* context, Tensor (&t)[4], size_t) {
  const Which op = k.which;
  const bool last = k.channels_last != 0;
  if (!t[0].value) return fail(op, "input X is required");
  const auto& xd = t[0].dims;
  if (xd.size() != 4) return fail(op, "X must be (N, C, H, W) or, channels last, (N, H, W, C), got " + dims_text(xd));
  if (t[0].type != kFloat16 && t[0].type != kFloat) return fail(op, "X must be float16 or float");
  Resize r = last ? resize_shape(xd[0], xd[1], xd[2], k.scale[0], k.scale[1])
                  : resize_shape(xd[0] * xd[1], xd[2], xd[3], k.scale[0], k.scale[1]);
  if (last) r.channels = xd[3];
  const std::vector<int64_t> out_dims = last ? std::vector<int64_t>{xd[0], r.out_h, r.out_w, xd[3]}
                                             : std::vector<int64_t>{xd[0], xd[1], r.out_h, r.out_w};
  void* y = nullptr;
  if (OrtStatus* st = output(context, 0, out_dims, &y)) return st;
  if (!k.cuda) {
    if (t[0].type == kFloat16) {
      const auto* x = static_cast<const uint16_t*>(t[0].data);
      last ? resize_bilinear_last_cpu(x, static_cast<uint16_t*>(y), r) : resize_bilinear_cpu(x, static_cast<uint16_t*>(y), r);
    } else {
      const auto* x = static_cast<const float*>(t[0].data);
      last ? resize_bilinear_last_cpu(x, static_cast<float*>(y), r) : resize_bilinear_cpu(x, static_cast<float*>(y), r);
    }
    return nullptr;
  }
#ifdef __CUDACC__
  cudaStream_t stream = nullptr;
  if (OrtStatus* st = stream_of(context, &stream)) return st;
  const bool half = t[0].type == kFloat16;
  cudaError_t err;
  if (last) {
    const bool aligned = aligned16(y) && aligned16(t[0].data);
    err = half ? resize_bilinear_last_cuda<__half>(t[0].data, y, r, aligned, stream)
               : resize_bilinear_last_cuda<float>(t[0].data, y, r, aligned, stream);
  } else {
    const bool aligned = aligned16(y);
    err = half ? resize_bilinear_cuda<__half>(t[0].data, y, r, aligned, stream)
               : resize_bilinear_cuda<float>(t[0].data, y, r, aligned, stream);
  }
  return launched(op, err);
#else
  return fail(op, "this build of the operator library has no CUDA kernels");
#endif
}

OrtStatus* compute_matmul_bias_gelu(const Kernel& k, OrtKernelContext* context, Tensor (&t)[4], size_t) {
  const Which op = k.which;
  if (!t[0].value || !t[1].value || !t[2].value) return fail(op, "inputs X, W and bias are required");
  const auto& xd = t[0].dims;
  const auto& wd = t[1].dims;
  if (t[0].type != kFloat16 || t[1].type != kFloat16 || t[2].type != kFloat16) {
    return fail(op, "X, W and bias must be float16");
  }
  if (xd.empty()) return fail(op, "X must be (..., K), got a scalar");
  if (wd.size() != 2 || wd[0] != xd.back()) {
    return fail(op, "W must be (" + std::to_string(xd.back()) + ", N), got " + dims_text(wd));
  }
  if (t[2].dims.size() != 1 || t[2].dims[0] != wd[1]) {
    return fail(op, "bias must be (" + std::to_string(wd[1]) + ",), got " + dims_text(t[2].dims));
  }
  int64_t m = 1;
  for (size_t i = 0; i + 1 < xd.size(); ++i) m *= xd[i];
  std::vector<int64_t> out_dims(xd.begin(), xd.end() - 1);
  out_dims.push_back(wd[1]);
  void* y = nullptr;
  if (OrtStatus* st = output(context, 0, out_dims, &y)) return st;
  if (!k.cuda) {
    matmul_bias_gelu_cpu(static_cast<const uint16_t*>(t[0].data), static_cast<const uint16_t*>(t[1].data),
                         static_cast<const uint16_t*>(t[2].data), static_cast<uint16_t*>(y), m, wd[1], wd[0]);
    return nullptr;
  }
#ifdef __CUDACC__
  if (!k.gemm) return fail(op, "out of memory");
  cudaStream_t stream = nullptr;
  if (OrtStatus* st = stream_of(context, &stream)) return st;
  const std::string err =
      matmul_bias_gelu_cuda(k.gemm.get(), t[0].data, t[1].data, t[2].data, y, m, wd[1], wd[0], stream);
  return err.empty() ? nullptr : fail(op, err);
#else
  return fail(op, "this build of the operator library has no CUDA kernels");
#endif
}

OrtStatus* compute_channel_layer_norm(const Kernel& k, OrtKernelContext* context, Tensor (&t)[4], size_t) {
  const Which op = k.which;
  if (!t[0].value || !t[1].value || !t[2].value) return fail(op, "inputs X, weight and bias are required");
  const auto& xd = t[0].dims;
  if (xd.size() < 2) return fail(op, "X must be (N, C, ...), got " + dims_text(xd));
  if (t[0].type != kFloat16 && t[0].type != kFloat) return fail(op, "X must be float16 or float");
  for (int i = 1; i < 3; ++i) {
    if (t[i].type != t[0].type || t[i].dims.size() != 1 || t[i].dims[0] != xd[1]) {
      return fail(op, "weight and bias must be (" + std::to_string(xd[1]) + ",) of X's type, got " +
                          dims_text(t[i].dims));
    }
  }
  int64_t s = 1;
  for (size_t i = 2; i < xd.size(); ++i) s *= xd[i];
  void* y = nullptr;
  if (OrtStatus* st = output(context, 0, xd, &y)) return st;
  const bool gelu = k.relu != 0;
  if (!k.cuda) {
    if (t[0].type == kFloat16) {
      using H = uint16_t;
      channel_layer_norm_cpu(static_cast<const H*>(t[0].data), static_cast<const H*>(t[1].data),
                             static_cast<const H*>(t[2].data), static_cast<H*>(y), xd[0], xd[1], s, k.epsilon, gelu);
    } else {
      channel_layer_norm_cpu(static_cast<const float*>(t[0].data), static_cast<const float*>(t[1].data),
                             static_cast<const float*>(t[2].data), static_cast<float*>(y), xd[0], xd[1], s,
                             k.epsilon, gelu);
    }
    return nullptr;
  }
#ifdef __CUDACC__
  cudaStream_t stream = nullptr;
  if (OrtStatus* st = stream_of(context, &stream)) return st;
  cudaError_t err = t[0].type == kFloat16
                        ? channel_layer_norm_cuda<__half>(t[0].data, t[1].data, t[2].data, y, xd[0], xd[1], s,
                                                          k.epsilon, gelu, stream)
                        : channel_layer_norm_cuda<float>(t[0].data, t[1].data, t[2].data, y, xd[0], xd[1], s,
                                                         k.epsilon, gelu, stream);
  return launched(op, err);
#else
  return fail(op, "this build of the operator library has no CUDA kernels");
#endif
}

// An optional int attribute: its value, or ``fallback`` where the node does not have it.
int64_t attr_or(const OrtKernelInfo* info, const char* name, int64_t fallback) {
  int64_t value = fallback;
  if (OrtStatus* st = g_api->KernelInfoGetAttribute_int64(info, name, &value)) {
    g_api->ReleaseStatus(st);
    return fallback;
  }
  return value;
}

OrtStatus* read_attrs(const OrtKernelInfo* info, Kernel* k) {
  OrtStatus* st = nullptr;
  k->channels_last = attr_or(info, "channels_last", 0);
  if (k->which == Which::kMatMulBiasGelu) return nullptr;  // no attributes
  if (k->which == Which::kChannelLayerNorm) {
    k->relu = attr_or(info, "gelu", 0);
    if ((st = g_api->KernelInfoGetAttribute_float(info, "epsilon", &k->epsilon))) return st;
    if (!(k->epsilon >= 0.f)) return fail(k->which, "epsilon must be >= 0");
    return nullptr;
  }
  if (k->which == Which::kBiasActivation) {
    if ((st = g_api->KernelInfoGetAttribute_int64(info, "relu", &k->relu))) return st;
    return nullptr;
  }
  if (k->which == Which::kResizeBilinear) {
    size_t count = 0;
    if ((st = g_api->KernelInfoGetAttributeArray_int64(info, "scale", nullptr, &count))) return st;
    k->scale.resize(count);
    if (count && (st = g_api->KernelInfoGetAttributeArray_int64(info, "scale", k->scale.data(), &count))) return st;
    if (k->scale.size() != 2 || k->scale[0] < 1 || k->scale[1] < 1) {
      return fail(k->which, "scale must be two whole factors >= 1 (height, width)");
    }
    return nullptr;
  }
  Attrs* a = &k->attrs;
  size_t count = 0;
  if ((st = g_api->KernelInfoGetAttributeArray_int64(info, "rotate", nullptr, &count))) return st;
  a->rotate.resize(count);
  if (count && (st = g_api->KernelInfoGetAttributeArray_int64(info, "rotate", a->rotate.data(), &count))) return st;
  if ((st = g_api->KernelInfoGetAttribute_int64(info, "head_dim", &a->head_dim))) return st;
  if (a->rotate.empty() || a->rotate.size() > static_cast<size_t>(kMaxParts)) {
    return fail(k->which, "rotate must have 1 to " + std::to_string(kMaxParts) + " entries");
  }
  if (a->head_dim <= 0 || a->head_dim % 2) return fail(k->which, "head_dim must be a positive even number");
  return nullptr;
}

// ---- OrtCustomOp tables: one per operator and provider ---------------------------------------------------

struct Op : ee_ort::CustomOp {
  Which which;
  bool cuda;
  int type;  // T: float16 or float (ONNX Runtime merges same-named ops of different types into one schema)
};

const Op& as_op(const ee_ort::CustomOp* op) { return *static_cast<const Op*>(op); }

const char* op_name(const ee_ort::CustomOp* op) { return name_of(as_op(op).which); }
const char* op_provider(const ee_ort::CustomOp* op) {
  return as_op(op).cuda ? "CUDAExecutionProvider" : "CPUExecutionProvider";
}
// BiasRotarySplit: P, bias (T), cos, sin (float, optional); outputs: variadic, T.
// BiasActivation: X, bias, residual (optional), all T; one output.
// ResizeBilinear: X (T); one output.
// MatMulBiasGelu: X, W, bias (float16); one output.
// ChannelLayerNorm: X, weight, bias (T); one output.
int op_input_type(const ee_ort::CustomOp* op, size_t index) {
  return as_op(op).which == Which::kBiasRotarySplit && index >= 2 ? kFloat : as_op(op).type;
}
size_t op_input_count(const ee_ort::CustomOp* op) {
  switch (as_op(op).which) {
    case Which::kBiasRotarySplit:
      return 4;
    case Which::kBiasActivation:
    case Which::kMatMulBiasGelu:
    case Which::kChannelLayerNorm:
      return 3;
    default:
      return 1;
  }
}
int op_output_type(const ee_ort::CustomOp* op, size_t) { return as_op(op).type; }
size_t op_output_count(const ee_ort::CustomOp*) { return 1; }
int op_input_characteristic(const ee_ort::CustomOp* op, size_t index) {
  const Which which = as_op(op).which;
  const size_t required = which == Which::kMatMulBiasGelu || which == Which::kChannelLayerNorm ? 3 : 2;
  return index < required ? ee_ort::kRequired : ee_ort::kOptional;
}
int op_output_characteristic(const ee_ort::CustomOp* op, size_t) {
  return as_op(op).which == Which::kBiasRotarySplit ? ee_ort::kVariadic : ee_ort::kRequired;
}
int op_input_memory(const ee_ort::CustomOp*, size_t) { return ee_ort::kMemDefault; }
int op_min_arity(const ee_ort::CustomOp*) { return 1; }
int op_homogeneous(const ee_ort::CustomOp*) { return 1; }
int op_start_version(const ee_ort::CustomOp*) { return 1; }
int op_end_version(const ee_ort::CustomOp*) { return 0x7fffffff; }

OrtStatus* op_create_kernel(const ee_ort::CustomOp* op, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  auto* k = new (std::nothrow) Kernel{as_op(op).which, as_op(op).cuda, Attrs{}, 0, 0.f, {}, 0, nullptr};
  if (!k) return fail(as_op(op).which, "out of memory");
  if (k->which == Which::kMatMulBiasGelu && k->cuda) k->gemm.reset(new (std::nothrow) GemmCache);
  if (OrtStatus* st = read_attrs(info, k)) {
    delete k;
    return st;
  }
  *kernel = k;
  return nullptr;
}

OrtStatus* op_compute(void* kernel, OrtKernelContext* context) {
  const Kernel& k = *static_cast<Kernel*>(kernel);
  Tensor t[4];
  size_t outputs = 0;
  if (OrtStatus* st = gather(context, t, &outputs)) return st;
  switch (k.which) {
    case Which::kBiasRotarySplit:
      return compute_bias_rotary_split(k, context, t, outputs);
    case Which::kBiasActivation:
      return compute_bias_activation(k, context, t, outputs);
    case Which::kMatMulBiasGelu:
      return compute_matmul_bias_gelu(k, context, t, outputs);
    case Which::kChannelLayerNorm:
      return compute_channel_layer_norm(k, context, t, outputs);
    default:
      return compute_resize_bilinear(k, context, t, outputs);
  }
}
void op_destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }

Op make_op(Which which, bool cuda, int type) {
  Op op{};
  op.version = ee_ort::kCustomOpVersion;
  op.GetName = op_name;
  op.GetExecutionProviderType = op_provider;
  op.GetInputType = op_input_type;
  op.GetInputTypeCount = op_input_count;
  op.GetOutputType = op_output_type;
  op.GetOutputTypeCount = op_output_count;
  op.KernelDestroy = op_destroy;
  op.GetInputCharacteristic = op_input_characteristic;
  op.GetOutputCharacteristic = op_output_characteristic;
  op.GetInputMemoryType = op_input_memory;
  op.GetVariadicInputMinArity = op_min_arity;
  op.GetVariadicInputHomogeneity = op_homogeneous;
  op.GetVariadicOutputMinArity = op_min_arity;
  op.GetVariadicOutputHomogeneity = op_homogeneous;
  op.CreateKernelV2 = op_create_kernel;
  op.KernelComputeV2 = op_compute;
  op.GetStartVersion = op_start_version;
  op.GetEndVersion = op_end_version;
  op.which = which;
  op.cuda = cuda;
  op.type = type;
  return op;
}

#ifdef __CUDACC__
constexpr bool kHasCuda = true;
#else
constexpr bool kHasCuda = false;
#endif

Op g_ops[] = {
    make_op(Which::kBiasRotarySplit, false, kFloat16), make_op(Which::kBiasRotarySplit, false, kFloat),
    make_op(Which::kBiasActivation, false, kFloat16),  make_op(Which::kBiasActivation, false, kFloat),
    make_op(Which::kBiasRotarySplit, true, kFloat16),  make_op(Which::kBiasRotarySplit, true, kFloat),
    make_op(Which::kBiasActivation, true, kFloat16),   make_op(Which::kBiasActivation, true, kFloat),
    make_op(Which::kResizeBilinear, false, kFloat16),  make_op(Which::kResizeBilinear, false, kFloat),
    make_op(Which::kResizeBilinear, true, kFloat16),   make_op(Which::kResizeBilinear, true, kFloat),
    make_op(Which::kMatMulBiasGelu, false, kFloat16),  make_op(Which::kMatMulBiasGelu, true, kFloat16),
    make_op(Which::kChannelLayerNorm, false, kFloat16), make_op(Which::kChannelLayerNorm, false, kFloat),
    make_op(Which::kChannelLayerNorm, true, kFloat16),  make_op(Which::kChannelLayerNorm, true, kFloat),
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                              const ee_ort::ApiBase* base) {
  static ee_ort::Api api;
  if (!api.bind(base)) return nullptr;  // cannot report without an API table; ONNX Runtime sees no ops
  g_api = &api;
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = g_api->CreateCustomOpDomain("ai.export_engine", &domain)) return st;
  for (const Op& op : g_ops) {
    if (op.cuda && !kHasCuda) continue;
    if (OrtStatus* st = g_api->CustomOpDomain_Add(domain, &op)) return st;
  }
  return g_api->AddCustomOpDomain(options, domain);
}

// Which kernels this build has, for the Python side: "cpu" or "cpu,cuda".
extern "C" __attribute__((visibility("default"))) const char* ExportEngineOpsProviders() {
  return kHasCuda ? "cpu,cuda" : "cpu";
}

// What this build was made against, as one JSON object, for the Python side to check before ONNX Runtime loads
// the library (export_engine.runners.ort_ops.fit): the CUDA runtime it links (0: none), the OrtApi and OrtCustomOp
// versions it needs, the GPU architectures it has code for and the hash of its sources (the build command passes
// the last two). One string literal, so the record reads the same in the file as through this function.
#ifndef EE_SOURCE_HASH
#define EE_SOURCE_HASH unknown
#endif
#ifndef EE_ARCHS
#define EE_ARCHS none
#endif
#ifdef __CUDACC__
#define EE_CUDART CUDART_VERSION
#define EE_PROVIDERS "cpu,cuda"
#else
#define EE_CUDART 0
#define EE_PROVIDERS "cpu"
#endif
#define EE_TEXT(x) #x
#define EE_STRING(x) EE_TEXT(x)

extern "C" __attribute__((visibility("default"))) const char* ExportEngineOpsBuildInfo() {
  return "{\"format\": 1, \"providers\": \"" EE_PROVIDERS "\", \"cuda_runtime\": " EE_STRING(EE_CUDART)
         ", \"ort_api\": " EE_STRING(EE_ORT_API_VERSION) ", \"custom_op_version\": " EE_STRING(EE_ORT_CUSTOM_OP_VERSION)
         ", \"archs\": \"" EE_STRING(EE_ARCHS) "\", \"source_hash\": \"" EE_STRING(EE_SOURCE_HASH) "\"}";
}

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
// a kernel that reads and writes the whole tensor. Here one thread moves 16 bytes: it reads them once, adds the
// bias, rotates, and writes them to their part.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "ort_abi.h"

#ifdef __CUDACC__
#include <cuda_fp16.h>
#include <cuda_runtime.h>
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

// One thread per 16 bytes of X: V = 8 halves or 4 floats, that is V/2 rotation pairs of one head (D % V == 0
// and the part width % V == 0 are checked before launch).
template <typename T>
__global__ void bias_rotary_split_kernel(const T* __restrict__ p, const T* __restrict__ bias,
                                         const float* __restrict__ cos, const float* __restrict__ sin,
                                         Outputs<T> out, int64_t rows, int64_t tokens, int width, int part_width,
                                         int head_dim, unsigned rotate_mask) {
  constexpr int V = 16 / sizeof(T);
  const int chunks = width / V;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= rows * chunks) return;
  const int64_t row = t / chunks;
  const int col = static_cast<int>(t - row * chunks) * V;
  const int part = col / part_width;
  const int c = col - part * part_width;

  alignas(16) T xs[V];
  alignas(16) T bs[V];
  *reinterpret_cast<int4*>(xs) = __ldg(reinterpret_cast<const int4*>(p + row * width + col));
  *reinterpret_cast<int4*>(bs) = __ldg(reinterpret_cast<const int4*>(bias + col));
  float x[V];
#pragma unroll
  for (int j = 0; j < V; ++j) x[j] = to_float(xs[j]) + to_float(bs[j]);
  if ((rotate_mask >> part) & 1u) {
    const int64_t angle = (row % tokens) * (head_dim / 2) + (c % head_dim) / 2;
#pragma unroll
    for (int j = 0; j < V / 2; ++j) {
      const float cs = __ldg(cos + angle + j), sn = __ldg(sin + angle + j);
      const float a = x[2 * j], b = x[2 * j + 1];
      x[2 * j] = a * cs - b * sn;
      x[2 * j + 1] = b * cs + a * sn;
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) xs[j] = from_float<T>(x[j]);
  *reinterpret_cast<int4*>(out.part[part] + row * part_width + c) = *reinterpret_cast<const int4*>(xs);
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
  const int64_t threads = s.rows * (s.width / V);
  if (threads == 0) return cudaSuccess;
  const int block = 256;
  const int64_t grid = (threads + block - 1) / block;
  bias_rotary_split_kernel<T><<<static_cast<unsigned>(grid), block, 0, stream>>>(
      static_cast<const T*>(p), static_cast<const T*>(bias), cos, sin, parts, s.rows, s.tokens,
      static_cast<int>(s.width), static_cast<int>(s.width / static_cast<int64_t>(a.rotate.size())),
      static_cast<int>(a.head_dim), mask);
  return cudaGetLastError();
}

#endif  // __CUDACC__

// ---- the ONNX Runtime glue --------------------------------------------------------------------------------

std::string op_error(const std::string& what) { return "export_engine BiasRotarySplit: " + what; }

struct Kernel {
  Attrs attrs;
  bool cuda = false;
};

struct Tensor {
  const OrtValue* value = nullptr;
  int type = 0;
  std::vector<int64_t> dims;
};

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
  return st;
}

OrtStatus* fail(const std::string& what) { return g_api->CreateStatus(ee_ort::kFail, op_error(what).c_str()); }

std::string dims_text(const std::vector<int64_t>& dims) {
  std::string text = "(";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + ")";
}

OrtStatus* compute(const Kernel& k, OrtKernelContext* context) {
  size_t inputs = 0, outputs = 0;
  if (OrtStatus* st = g_api->KernelContext_GetInputCount(context, &inputs)) return st;
  if (OrtStatus* st = g_api->KernelContext_GetOutputCount(context, &outputs)) return st;
  const Attrs& a = k.attrs;
  if (outputs != a.rotate.size()) {
    return fail("the node has " + std::to_string(outputs) + " outputs but " + std::to_string(a.rotate.size()) +
                " rotate flags");
  }
  Tensor t[4];
  for (size_t i = 0; i < inputs && i < 4; ++i) {
    const OrtValue* value = nullptr;
    if (OrtStatus* st = g_api->KernelContext_GetInput(context, i, &value)) return st;
    if (value) {
      if (OrtStatus* st = describe(value, &t[i])) return st;
    }
  }
  if (!t[0].value || !t[1].value) return fail("inputs P and bias are required");
  const auto& pd = t[0].dims;
  if (pd.size() != 3) return fail("P must be (B, N, W), got " + dims_text(pd));
  if (t[0].type != kFloat16 && t[0].type != kFloat) return fail("P must be float16 or float");
  if (t[1].type != t[0].type || t[1].dims.size() != 1 || t[1].dims[0] != pd[2]) {
    return fail("bias must be (" + std::to_string(pd[2]) + ",) of P's type, got " + dims_text(t[1].dims));
  }
  Shape s{pd[0] * pd[1], pd[1], pd[2]};
  const int64_t parts = static_cast<int64_t>(a.rotate.size());
  if (s.width % parts) return fail("W = " + std::to_string(s.width) + " does not split into equal parts");
  const int64_t part_width = s.width / parts;
  bool rotating = false;
  for (int64_t r : a.rotate) rotating = rotating || r;
  const float* cos = nullptr;
  const float* sin = nullptr;
  if (rotating) {
    if (!t[2].value || !t[3].value) return fail("rotated outputs need the cos and sin inputs");
    for (int i = 2; i < 4; ++i) {
      const auto& d = t[i].dims;
      if (t[i].type != kFloat || d.size() != 2 || d[0] != s.tokens || d[1] != a.head_dim / 2) {
        return fail("cos and sin must be float (" + std::to_string(s.tokens) + ", " +
                    std::to_string(a.head_dim / 2) + "), got " + dims_text(d));
      }
    }
    if (part_width % a.head_dim) return fail("a part's width is not a whole number of heads");
    void* data = nullptr;
    if (OrtStatus* st = g_api->GetTensorMutableData(const_cast<OrtValue*>(t[2].value), &data)) return st;
    cos = static_cast<const float*>(data);
    if (OrtStatus* st = g_api->GetTensorMutableData(const_cast<OrtValue*>(t[3].value), &data)) return st;
    sin = static_cast<const float*>(data);
  }
  void* p = nullptr;
  void* bias = nullptr;
  if (OrtStatus* st = g_api->GetTensorMutableData(const_cast<OrtValue*>(t[0].value), &p)) return st;
  if (OrtStatus* st = g_api->GetTensorMutableData(const_cast<OrtValue*>(t[1].value), &bias)) return st;
  void* out[kMaxParts] = {};
  const int64_t out_dims[3] = {pd[0], pd[1], part_width};
  for (int64_t j = 0; j < parts; ++j) {
    OrtValue* value = nullptr;
    if (OrtStatus* st = g_api->KernelContext_GetOutput(context, static_cast<size_t>(j), out_dims, 3, &value)) {
      return st;
    }
    if (OrtStatus* st = g_api->GetTensorMutableData(value, &out[j])) return st;
  }
  if (!k.cuda) {
    if (t[0].type == kFloat16) {
      bias_rotary_split_cpu(static_cast<const uint16_t*>(p), static_cast<const uint16_t*>(bias), cos, sin,
                            reinterpret_cast<uint16_t* const*>(out), a, s);
    } else {
      bias_rotary_split_cpu(static_cast<const float*>(p), static_cast<const float*>(bias), cos, sin,
                            reinterpret_cast<float* const*>(out), a, s);
    }
    return nullptr;
  }
#ifdef __CUDACC__
  const int64_t vec = t[0].type == kFloat16 ? 8 : 4;
  if (part_width % vec || (rotating && a.head_dim % vec)) {
    return fail("the part width and head size must be multiples of " + std::to_string(vec) + " on CUDA");
  }
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  bool ok = aligned(p) && aligned(bias);
  for (int64_t j = 0; j < parts; ++j) ok = ok && aligned(out[j]);
  if (!ok) return fail("tensors must be 16-byte aligned on CUDA");
  void* stream = nullptr;
  if (OrtStatus* st = g_api->KernelContext_GetGPUComputeStream(context, &stream)) return st;
  cudaError_t err = t[0].type == kFloat16
                        ? bias_rotary_split_cuda<__half>(p, bias, cos, sin, out, a, s, static_cast<cudaStream_t>(stream))
                        : bias_rotary_split_cuda<float>(p, bias, cos, sin, out, a, s, static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) return fail(std::string("CUDA launch failed: ") + cudaGetErrorString(err));
  return nullptr;
#else
  return fail("this build of the operator library has no CUDA kernels");
#endif
}

OrtStatus* read_attrs(const OrtKernelInfo* info, Attrs* a) {
  size_t count = 0;
  OrtStatus* st = g_api->KernelInfoGetAttributeArray_int64(info, "rotate", nullptr, &count);
  if (st) return st;
  a->rotate.resize(count);
  if (count && (st = g_api->KernelInfoGetAttributeArray_int64(info, "rotate", a->rotate.data(), &count))) return st;
  if ((st = g_api->KernelInfoGetAttribute_int64(info, "head_dim", &a->head_dim))) return st;
  if (a->rotate.empty() || a->rotate.size() > static_cast<size_t>(kMaxParts)) {
    return fail("rotate must have 1 to " + std::to_string(kMaxParts) + " entries");
  }
  if (a->head_dim <= 0 || a->head_dim % 2) return fail("head_dim must be a positive even number");
  return nullptr;
}

// ---- OrtCustomOp tables: one per provider ------------------------------------------------------------------

struct Op : ee_ort::CustomOp {
  bool cuda;
};

const char* op_name(const ee_ort::CustomOp*) { return "BiasRotarySplit"; }
const char* op_provider(const ee_ort::CustomOp* op) {
  return static_cast<const Op*>(op)->cuda ? "CUDAExecutionProvider" : "CPUExecutionProvider";
}
int op_input_type(const ee_ort::CustomOp*, size_t index) { return index < 2 ? ee_ort::kTypeUndefined : kFloat; }
size_t op_input_count(const ee_ort::CustomOp*) { return 4; }
int op_output_type(const ee_ort::CustomOp*, size_t) { return ee_ort::kTypeUndefined; }
size_t op_output_count(const ee_ort::CustomOp*) { return 1; }
int op_input_characteristic(const ee_ort::CustomOp*, size_t index) {
  return index < 2 ? ee_ort::kRequired : ee_ort::kOptional;
}
int op_output_characteristic(const ee_ort::CustomOp*, size_t) { return ee_ort::kVariadic; }
int op_input_memory(const ee_ort::CustomOp*, size_t) { return ee_ort::kMemDefault; }
int op_min_arity(const ee_ort::CustomOp*) { return 1; }
int op_homogeneous(const ee_ort::CustomOp*) { return 1; }
int op_start_version(const ee_ort::CustomOp*) { return 1; }
int op_end_version(const ee_ort::CustomOp*) { return 0x7fffffff; }

OrtStatus* op_create_kernel(const ee_ort::CustomOp* op, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  auto* k = new (std::nothrow) Kernel;
  if (!k) return fail("out of memory");
  k->cuda = static_cast<const Op*>(op)->cuda;
  if (OrtStatus* st = read_attrs(info, &k->attrs)) {
    delete k;
    return st;
  }
  *kernel = k;
  return nullptr;
}

OrtStatus* op_compute(void* kernel, OrtKernelContext* context) { return compute(*static_cast<Kernel*>(kernel), context); }
void op_destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }

Op make_op(bool cuda) {
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
  op.cuda = cuda;
  return op;
}

Op g_cpu_op = make_op(false);
#ifdef __CUDACC__
Op g_cuda_op = make_op(true);
#endif

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                              const ee_ort::ApiBase* base) {
  static ee_ort::Api api;
  if (!api.bind(base)) return nullptr;  // cannot report without an API table; ONNX Runtime sees no ops
  g_api = &api;
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = g_api->CreateCustomOpDomain("ai.export_engine", &domain)) return st;
  if (OrtStatus* st = g_api->CustomOpDomain_Add(domain, &g_cpu_op)) return st;
#ifdef __CUDACC__
  if (OrtStatus* st = g_api->CustomOpDomain_Add(domain, &g_cuda_op)) return st;
#endif
  return g_api->AddCustomOpDomain(options, domain);
}

// Which kernels this build has, for the Python side: "cpu" or "cpu,cuda".
extern "C" __attribute__((visibility("default"))) const char* ExportEngineOpsProviders() {
#ifdef __CUDACC__
  return "cpu,cuda";
#else
  return "cpu";
#endif
}

// The part of ONNX Runtime's C ABI that export-engine's operators use, declared from its documented layout.
//
// ONNX Runtime hands a custom-op library a table of function pointers (OrtApi) whose slots never move between
// releases: new functions are appended. The slot numbers below are those positions (checked against
// onnxruntime 1.32 on the CPU provider by calling each one). OrtCustomOp is the table a library hands back per
// operator: a version number, then callbacks in a fixed order; ONNX Runtime reads the callbacks a version
// declares (CreateKernelV2 / KernelComputeV2 from 16, GetStartVersion / GetEndVersion from 17).
#pragma once

#include <cstddef>
#include <cstdint>

struct OrtStatus;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtCustomOpDomain;
struct OrtSessionOptions;
struct OrtShapeInferContext;
struct OrtApi;  // opaque here: reached through ee_ort::Api

// Macros as well as constants: the library's build record (ExportEngineOpsBuildInfo in ops.cu) spells them out.
#define EE_ORT_API_VERSION 17        // the OrtApi version requested (any ONNX Runtime >= 1.17 has it)
#define EE_ORT_CUSTOM_OP_VERSION 17  // the OrtCustomOp layout version filled in

namespace ee_ort {

constexpr uint32_t kApiVersion = EE_ORT_API_VERSION;
constexpr uint32_t kCustomOpVersion = EE_ORT_CUSTOM_OP_VERSION;
constexpr int kFail = 1;                   // OrtErrorCode ORT_FAIL
constexpr int kTypeUndefined = 0;          // ONNXTensorElementDataType: any type, fixed per node
constexpr int kRequired = 0, kOptional = 1, kVariadic = 2;  // OrtCustomOpInputOutputCharacteristic
constexpr int kMemDefault = 0;                              // OrtMemType: the provider's own memory

struct ApiBase {
  const void* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

// Slot numbers in OrtApi.
enum Slot : int {
  kCreateStatus = 0,
  kCreateCustomOpDomain = 26,
  kCustomOpDomainAdd = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kGetTensorElementType = 60,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetTensorTypeAndShape = 65,
  kKernelInfoGetAttributeFloat = 85,
  kKernelInfoGetAttributeInt64 = 86,
  kKernelContextGetInputCount = 88,
  kKernelContextGetOutputCount = 89,
  kKernelContextGetInput = 90,
  kKernelContextGetOutput = 91,
  kReleaseStatus = 93,
  kReleaseTensorTypeAndShapeInfo = 99,
  kKernelInfoGetAttributeArrayInt64 = 163,
  kKernelContextGetGPUComputeStream = 193,
};

struct CustomOp;

// Typed calls through the table.
class Api {
 public:
  bool bind(const ApiBase* base) {
    table_ = base ? static_cast<void* const*>(base->GetApi(kApiVersion)) : nullptr;
    return table_ != nullptr;
  }
  OrtStatus* CreateStatus(int code, const char* message) const {
    return at<OrtStatus* (*)(int, const char*)>(kCreateStatus)(code, message);
  }
  OrtStatus* CreateCustomOpDomain(const char* name, OrtCustomOpDomain** out) const {
    return at<OrtStatus* (*)(const char*, OrtCustomOpDomain**)>(kCreateCustomOpDomain)(name, out);
  }
  OrtStatus* CustomOpDomain_Add(OrtCustomOpDomain* domain, const CustomOp* op) const {
    return at<OrtStatus* (*)(OrtCustomOpDomain*, const CustomOp*)>(kCustomOpDomainAdd)(domain, op);
  }
  OrtStatus* AddCustomOpDomain(OrtSessionOptions* options, OrtCustomOpDomain* domain) const {
    return at<OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(kAddCustomOpDomain)(options, domain);
  }
  OrtStatus* GetTensorMutableData(OrtValue* value, void** out) const {
    return at<OrtStatus* (*)(OrtValue*, void**)>(kGetTensorMutableData)(value, out);
  }
  OrtStatus* GetTensorElementType(const OrtTensorTypeAndShapeInfo* info, int* out) const {
    return at<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int*)>(kGetTensorElementType)(info, out);
  }
  OrtStatus* GetDimensionsCount(const OrtTensorTypeAndShapeInfo* info, size_t* out) const {
    return at<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*)>(kGetDimensionsCount)(info, out);
  }
  OrtStatus* GetDimensions(const OrtTensorTypeAndShapeInfo* info, int64_t* dims, size_t count) const {
    return at<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)>(kGetDimensions)(info, dims, count);
  }
  OrtStatus* GetTensorTypeAndShape(const OrtValue* value, OrtTensorTypeAndShapeInfo** out) const {
    return at<OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**)>(kGetTensorTypeAndShape)(value, out);
  }
  OrtStatus* KernelInfoGetAttribute_float(const OrtKernelInfo* info, const char* name, float* out) const {
    return at<OrtStatus* (*)(const OrtKernelInfo*, const char*, float*)>(kKernelInfoGetAttributeFloat)(info, name, out);
  }
  OrtStatus* KernelInfoGetAttribute_int64(const OrtKernelInfo* info, const char* name, int64_t* out) const {
    return at<OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*)>(kKernelInfoGetAttributeInt64)(info, name,
                                                                                                          out);
  }
  OrtStatus* KernelInfoGetAttributeArray_int64(const OrtKernelInfo* info, const char* name, int64_t* out,
                                               size_t* size) const {
    using Fn = OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*, size_t*);
    return at<Fn>(kKernelInfoGetAttributeArrayInt64)(info, name, out, size);
  }
  OrtStatus* KernelContext_GetInputCount(const OrtKernelContext* context, size_t* out) const {
    return at<OrtStatus* (*)(const OrtKernelContext*, size_t*)>(kKernelContextGetInputCount)(context, out);
  }
  OrtStatus* KernelContext_GetOutputCount(const OrtKernelContext* context, size_t* out) const {
    return at<OrtStatus* (*)(const OrtKernelContext*, size_t*)>(kKernelContextGetOutputCount)(context, out);
  }
  OrtStatus* KernelContext_GetInput(const OrtKernelContext* context, size_t index, const OrtValue** out) const {
    using Fn = OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**);
    return at<Fn>(kKernelContextGetInput)(context, index, out);
  }
  OrtStatus* KernelContext_GetOutput(OrtKernelContext* context, size_t index, const int64_t* dims, size_t count,
                                     OrtValue** out) const {
    using Fn = OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
    return at<Fn>(kKernelContextGetOutput)(context, index, dims, count, out);
  }
  void ReleaseStatus(OrtStatus* status) const { at<void (*)(OrtStatus*)>(kReleaseStatus)(status); }
  void ReleaseTensorTypeAndShapeInfo(OrtTensorTypeAndShapeInfo* info) const {
    at<void (*)(OrtTensorTypeAndShapeInfo*)>(kReleaseTensorTypeAndShapeInfo)(info);
  }
  OrtStatus* KernelContext_GetGPUComputeStream(const OrtKernelContext* context, void** out) const {
    return at<OrtStatus* (*)(const OrtKernelContext*, void**)>(kKernelContextGetGPUComputeStream)(context, out);
  }

 private:
  template <typename Fn>
  Fn at(int slot) const {
    return reinterpret_cast<Fn>(table_[slot]);
  }
  void* const* table_ = nullptr;
};

// One operator's callbacks, in ONNX Runtime's order (version 17 layout; later members stay null).
struct CustomOp {
  uint32_t version;
  void* (*CreateKernel)(const CustomOp*, const OrtApi*, const OrtKernelInfo*);
  const char* (*GetName)(const CustomOp*);
  const char* (*GetExecutionProviderType)(const CustomOp*);
  int (*GetInputType)(const CustomOp*, size_t);
  size_t (*GetInputTypeCount)(const CustomOp*);
  int (*GetOutputType)(const CustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const CustomOp*);
  void (*KernelCompute)(void*, OrtKernelContext*);
  void (*KernelDestroy)(void*);
  int (*GetInputCharacteristic)(const CustomOp*, size_t);
  int (*GetOutputCharacteristic)(const CustomOp*, size_t);
  int (*GetInputMemoryType)(const CustomOp*, size_t);
  int (*GetVariadicInputMinArity)(const CustomOp*);
  int (*GetVariadicInputHomogeneity)(const CustomOp*);
  int (*GetVariadicOutputMinArity)(const CustomOp*);
  int (*GetVariadicOutputHomogeneity)(const CustomOp*);
  OrtStatus* (*CreateKernelV2)(const CustomOp*, const OrtApi*, const OrtKernelInfo*, void**);
  OrtStatus* (*KernelComputeV2)(void*, OrtKernelContext*);
  OrtStatus* (*InferOutputShapeFn)(const CustomOp*, OrtShapeInferContext*);
  int (*GetStartVersion)(const CustomOp*);
  int (*GetEndVersion)(const CustomOp*);
  size_t (*GetMayInplace)(int**, int**);
  void (*ReleaseMayInplace)(int*, int*);
  size_t (*GetAliasMap)(int**, int**);
  void (*ReleaseAliasMap)(int*, int*);
};

static_assert(sizeof(CustomOp) == 208, "OrtCustomOp is a uint32 and 25 function pointers on 64-bit platforms");

}  // namespace ee_ort

// Top-k routing: softmax (fp32) over E logits -> top-k, or (order topk_softmax) top-k of the
// logits -> softmax over the k; then optional renormalize.
// One thread per token; E and k are small (E <= 1024, k <= 32).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include "mixport_kernels.h"

namespace {

constexpr int kMaxK = 32;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

template <typename T>
__global__ void topk_routing_kernel(const T* logits, T* weights, int64_t* ids, int num_tokens,
                                    int E, int k, int renormalize, int topk_first) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= num_tokens) return;
  const T* row = logits + static_cast<int64_t>(t) * E;
  float mx = -INFINITY;
  for (int e = 0; e < E; ++e) mx = fmaxf(mx, to_f32(row[e]));
  float sum = 0.f;
  if (!topk_first)
    for (int e = 0; e < E; ++e) sum += expf(to_f32(row[e]) - mx);
  float top_w[kMaxK];
  int top_i[kMaxK];
  for (int j = 0; j < k; ++j) {
    float best = -INFINITY;
    int best_e = -1;
    for (int e = 0; e < E; ++e) {
      bool taken = false;
      for (int i = 0; i < j; ++i) taken |= (top_i[i] == e);
      // the score ranked: the probability, or (topk_first) the logit itself
      const float s = topk_first ? to_f32(row[e]) : expf(to_f32(row[e]) - mx) / sum;
      if (!taken && (best_e < 0 || s > best)) { best = s; best_e = e; }  // strict >: lower index wins ties
    }
    top_w[j] = best;
    top_i[j] = best_e;
  }
  if (topk_first) {  // softmax over the k picked logits (top_w[0] is their max)
    float total = 0.f;
    for (int j = 0; j < k; ++j) total += (top_w[j] = expf(top_w[j] - top_w[0]));
    for (int j = 0; j < k; ++j) top_w[j] /= total;
  }
  float total = 0.f;
  for (int j = 0; j < k; ++j) total += top_w[j];
  for (int j = 0; j < k; ++j) {
    const float w = renormalize ? top_w[j] / total : top_w[j];
    weights[static_cast<int64_t>(t) * k + j] = from_f32<T>(w);
    ids[static_cast<int64_t>(t) * k + j] = top_i[j];
  }
}

template <typename T>
int launch(const void* logits, void* weights, int64_t* ids, int T_, int E, int k, int renorm,
           int topk_first, cudaStream_t stream) {
  const int threads = 128;
  const int blocks = (T_ + threads - 1) / threads;
  topk_routing_kernel<T><<<blocks, threads, 0, stream>>>(
      static_cast<const T*>(logits), static_cast<T*>(weights), ids, T_, E, k, renorm, topk_first);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int mixport_topk_routing_ordered(const void* logits, int dtype, void* weights, int64_t* ids,
                                            int T, int E, int k, int renormalize, int order,
                                            void* stream) {
  if (T < 0 || E < 1 || E > 1024 || k < 1 || k > E || k > kMaxK) return MIXPORT_EINVAL;
  if (order != MIXPORT_SOFTMAX_TOPK && order != MIXPORT_TOPK_SOFTMAX) return MIXPORT_EINVAL;
  if (T == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int first = order == MIXPORT_TOPK_SOFTMAX;
  switch (dtype) {
    case MIXPORT_FP32: return launch<float>(logits, weights, ids, T, E, k, renormalize, first, s);
    case MIXPORT_FP16: return launch<__half>(logits, weights, ids, T, E, k, renormalize, first, s);
    case MIXPORT_BF16:
      return launch<__nv_bfloat16>(logits, weights, ids, T, E, k, renormalize, first, s);
    default: return MIXPORT_EINVAL;
  }
}

extern "C" int mixport_topk_routing(const void* logits, int dtype, void* weights, int64_t* ids,
                                    int T, int E, int k, int renormalize, void* stream) {
  return mixport_topk_routing_ordered(logits, dtype, weights, ids, T, E, k, renormalize,
                                      MIXPORT_SOFTMAX_TOPK, stream);
}

// C ABI of libmixport_kernels: native routing / align kernels and a loader
// for the Triton PTX written by mixport.plugins.kernels.compile.
//
// T tokens, E experts, k active, P = T*k pairs, BM = block_m.
// Every function returns 0 on success, a positive cudaError_t / CUresult
// code on a CUDA failure, or MIXPORT_EINVAL for bad arguments; none aborts.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MIXPORT_EINVAL (-1)

#if defined(_WIN32)
#define MIXPORT_API __declspec(dllexport)
#else
#define MIXPORT_API __attribute__((visibility("default")))
#endif

enum mixport_dtype { MIXPORT_FP32 = 0, MIXPORT_FP16 = 1, MIXPORT_BF16 = 2 };

// logits [T, E] -> weights [T, k] (logits dtype), ids [T, k] int64, by
// descending weight, ties to the lower expert. Softmax in fp32.
// renormalize: 1 divides the top-k weights by their sum, 0 keeps them.
MIXPORT_API int mixport_topk_routing(const void* logits, int dtype, void* weights,
                                     int64_t* ids, int T, int E, int k, int renormalize,
                                     void* stream);

enum mixport_routing_order { MIXPORT_SOFTMAX_TOPK = 0, MIXPORT_TOPK_SOFTMAX = 1 };

// The same with the TopKRouting node's order (mixport/ops.py, plugin_version "2"):
// MIXPORT_SOFTMAX_TOPK as above; MIXPORT_TOPK_SOFTMAX takes the top k logits (ties to
// the lower expert), then a softmax over those k, then renormalize or not.
// mixport_topk_routing is this with MIXPORT_SOFTMAX_TOPK.
MIXPORT_API int mixport_topk_routing_ordered(const void* logits, int dtype, void* weights,
                                             int64_t* ids, int T, int E, int k, int renormalize,
                                             int order, void* stream);

// Buffer lengths for mixport_moe_align: P + E*(BM-1) and its cdiv by BM.
MIXPORT_API int mixport_moe_align_sizes(int P, int E, int block_m, int* max_padded,
                                        int* max_blocks);

// ids [P] int64 -> sorted_token_ids int32 [max_padded] (sentinel P),
// expert_ids int32 [max_blocks] (-1 past the end), num_post int32 [1].
// Same (stable, deterministic) result as the Triton moe_align_kernel.
MIXPORT_API int mixport_moe_align(const int64_t* ids, int P, int E, int block_m,
                                  int32_t* sorted_token_ids, int32_t* expert_ids,
                                  int32_t* num_tokens_post_padded, void* stream);

// Load a PTX (or cubin) image and look up `entry`; *module is a cudaLibrary_t,
// *function a cudaKernel_t (usable as a CUfunction).
// shared_bytes > 48 KiB raises the function's dynamic shared memory limit.
MIXPORT_API int mixport_module_load(const void* image, const char* entry, int shared_bytes,
                                    void** module, void** function);
MIXPORT_API int mixport_module_unload(void* module);

// Launch a Triton kernel: args[i] points at the i-th parameter value, the two
// trailing scratch pointers included (pass pointers to NULL values).
MIXPORT_API int mixport_launch(void* function, const unsigned grid[3], int num_warps,
                               int shared_bytes, void* stream, void** args);

#ifdef __cplusplus
}
#endif

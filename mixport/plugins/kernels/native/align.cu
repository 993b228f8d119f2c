// moe_align_block_size: group (token, slot) pairs by expert, BM-aligned.
// One block; thread e < E owns expert e and scans the pairs in order, so the
// result is stable and identical to the Triton moe_align_kernel.
#include <cuda_runtime.h>

#include "mixport_kernels.h"

namespace {

constexpr int kThreads = 1024;  // also the largest supported E

__global__ void moe_align_kernel(const int64_t* ids, int P, int E, int block_m, int max_padded,
                                 int max_blocks, int32_t* sorted, int32_t* expert_ids,
                                 int32_t* num_post) {
  __shared__ int starts[kThreads + 1];
  __shared__ int used_end[kThreads];
  const int e = threadIdx.x;
  int count = 0;
  if (e < E)
    for (int p = 0; p < P; ++p) count += (ids[p] == e);
  if (e < E) used_end[e] = count;
  __syncthreads();
  if (e == 0) {
    int pos = 0;
    for (int i = 0; i < E; ++i) {
      starts[i] = pos;
      pos += (used_end[i] + block_m - 1) / block_m * block_m;
      used_end[i] += starts[i];
    }
    starts[E] = pos;
    *num_post = pos;
  }
  __syncthreads();
  if (e < E) {
    int pos = starts[e];
    for (int p = 0; p < P; ++p)
      if (ids[p] == e) sorted[pos++] = p;
  }
  for (int slot = threadIdx.x; slot < max_padded; slot += blockDim.x) {
    bool used = false;
    for (int i = 0; i < E && !used; ++i) used = slot >= starts[i] && slot < used_end[i];
    if (!used) sorted[slot] = P;
  }
  for (int b = threadIdx.x; b < max_blocks; b += blockDim.x) {
    int owner = -1;
    for (int i = 0; i < E; ++i)
      if (b * block_m >= starts[i] && b * block_m < starts[i + 1]) owner = i;
    expert_ids[b] = owner;
  }
}

}  // namespace

extern "C" int mixport_moe_align_sizes(int P, int E, int block_m, int* max_padded,
                                       int* max_blocks) {
  if (P < 0 || E < 1 || block_m < 1 || !max_padded || !max_blocks) return MIXPORT_EINVAL;
  *max_padded = P + E * (block_m - 1);
  *max_blocks = (*max_padded + block_m - 1) / block_m;
  return 0;
}

extern "C" int mixport_moe_align(const int64_t* ids, int P, int E, int block_m,
                                 int32_t* sorted_token_ids, int32_t* expert_ids,
                                 int32_t* num_tokens_post_padded, void* stream) {
  int max_padded = 0, max_blocks = 0;
  if (E > kThreads || mixport_moe_align_sizes(P, E, block_m, &max_padded, &max_blocks))
    return MIXPORT_EINVAL;
  moe_align_kernel<<<1, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      ids, P, E, block_m, max_padded, max_blocks, sorted_token_ids, expert_ids,
      num_tokens_post_padded);
  return static_cast<int>(cudaGetLastError());
}

// CUDA prelude of bk_scan_body.h (assembled by mlx_ltc/bk/kernel.py for mx.fast.cuda_kernel, which writes the
// __global__ signature and launches ceil(threads / block) blocks: the body skips the threads past the end).
#if BK_PART == 0
#define BK_FN __device__ inline
#else
const int bk_thread = (int)(blockIdx.x * blockDim.x + threadIdx.x);
#endif

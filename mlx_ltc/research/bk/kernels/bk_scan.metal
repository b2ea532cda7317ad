// Metal prelude of bk_scan_body.h (assembled by mlx_ltc/bk/kernel.py for mx.fast.metal_kernel, which writes
// the kernel signature and declares thread_position_in_grid because the source names it). Never executed by
// this project's checks: the shared body runs there through bk_scan_cpu.cpp (and on a CUDA GPU through
// bk_scan.cu); this file is only assembled and parsed as C++.
#if BK_PART == 0
#define BK_FN inline
#else
const int bk_thread = (int)thread_position_in_grid.x;
#endif

// C++ prelude of bk_scan_body.h: every "thread" is one iteration of a plain loop, in order. kernel.py wraps
// it in an extern "C" function with MLX's parameters plus the thread count, so the shared body can be
// compiled with the system compiler and checked on any machine.
#if BK_PART == 0
#define BK_FN static inline
#else
for (int bk_thread = 0; bk_thread < bk_threads; ++bk_thread)
#endif

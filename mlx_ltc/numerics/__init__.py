"""The numerics shared by the product and the research systems: the O(L)-memory attention, the
(chunked) cross-entropy, a stable log-sum-exp, the LoRA initial draw. They import MLX and numpy only."""

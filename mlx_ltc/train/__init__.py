"""Train LoRA adapters on a (4-bit, or dequantized on CPU) mlx-lm model.

`lora` adds and saves the adapters, `batches` orders the data, `engine` is the memory engine's step,
`update` one optimizer update, `phases` the curriculum, `orchestrator` the rules applied at each
evaluation, `trainer` the loop with checkpoints and resume, `summary` its tables and plot.
"""

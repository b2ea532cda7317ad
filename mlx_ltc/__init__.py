"""mlx-ltc: long-context LoRA fine-tuning of code models on the machine you already own."""

__version__ = "0.1.0"

"""minitron_mcore: Minitron-style LLM compression (teacher correction, structured pruning,
distillation) on Megatron-Core."""

__version__ = "0.1.0"

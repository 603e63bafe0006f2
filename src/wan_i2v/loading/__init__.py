"""Reading checkpoints: the official layout, strictly, tensor by tensor (later: adapters such as LoRA)."""

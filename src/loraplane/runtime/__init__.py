"""The multi-LoRA inference server. Never imports kopf or the operator."""

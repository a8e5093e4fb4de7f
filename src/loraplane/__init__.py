"""loraplane: many LoRA adapters on one base model, served and scaled as one deployment."""

__version__ = "0.1.0"

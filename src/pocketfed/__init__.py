"""pocketfed: federated LoRA fine-tuning and on-device inference for pocket-sized language models."""

__version__ = "0.1.0"

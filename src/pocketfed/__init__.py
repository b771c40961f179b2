"""pocketfed: federated LoRA fine-tuning and on-device inference for pocket-sized language models."""

__version__ = "0.1.0"

import os as _os

# Nothing in pocketfed may reach a model hub at run time: weights come from packages and folders.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

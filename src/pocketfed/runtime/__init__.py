"""On-device inference: load an exported model, generate text, suggest next words, privacy lock.

Imports nothing from pocketfed's training code (model, data, device, server, release).
"""

from pocketfed.runtime.generate import generate
from pocketfed.runtime.model import LoadedModel, Session, load, read_manifest
from pocketfed.runtime.privacy_lock import privacy_lock
from pocketfed.runtime.suggest import suggest

__all__ = ["LoadedModel", "Session", "generate", "load", "privacy_lock", "read_manifest", "suggest"]

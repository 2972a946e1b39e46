"""nextvlad: NeXtVLAD video classification for YouTube-8M (Lin, Xiao, Fan, 2018)."""

from typing import Any

__all__ = ["VideoClassifier"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy so that `nextvlad.data` (and DataLoader workers) do not import Lightning and the model.
    if name == "VideoClassifier":
        from nextvlad.module import VideoClassifier

        return VideoClassifier
    raise AttributeError(f"module 'nextvlad' has no attribute {name!r}")

"""Model layers: aggregation (NeXtVLAD, NetVLAD), SE context gating, two-stream video models."""

from nextvlad.models.gating import SEContextGating
from nextvlad.models.mixture import MixtureOfNeXtVLAD
from nextvlad.models.netvlad import NetVLAD
from nextvlad.models.nextvlad import NeXtVLAD
from nextvlad.models.video_model import VideoModel, build_video_model, count_parameters

__all__ = ["MixtureOfNeXtVLAD", "NeXtVLAD", "NetVLAD", "SEContextGating", "VideoModel", "build_video_model",
           "count_parameters"]

"""YouTube-8M data layer: TFRecord reading, the frame-level batch pipeline, a synthetic dataset.

Public API:

* `iter_videos(pattern_or_files, max_frames=300, num_classes=3862)`: one dict per video.
* `iter_batches(...)`: float batches in the training contract, single process, CPU.
* `YT8MDataModule`: the LightningDataModule (sharded over DDP ranks and workers).
* `YT8MFrameDataset`, `YT8MDataLoader`: the IterableDataset / DataLoader it uses.
* `finalize_batch`, `ReverseWhitening`, `sample_frames`: the transforms applied on the device.
* `read_records`, `write_records`, `DataError`: TFRecord framing (CRC-checked).
* `write_synthetic_dataset`: the synthetic dataset generator.
"""

from nextvlad.data.dataset import YT8MDataLoader, YT8MFrameDataset, collate_quantized
from nextvlad.data.iterate import iter_batches, iter_videos
from nextvlad.data.parsing import (QuantizedVideo, VideoLevelRecord, encode_frame_record,
                                   encode_video_level_record, parse_frame_record,
                                   parse_video_level_record)
from nextvlad.data.records import DataError, FramingError, expand_paths, read_records, write_records
from nextvlad.data.transforms import (ReverseWhitening, dequantize, finalize_batch, quantize,
                                      sample_frames)

__all__ = [
    "iter_videos", "iter_batches", "YT8MDataModule", "YT8MSegmentDataModule", "YT8MFrameDataset", "YT8MDataLoader",
    "collate_quantized", "finalize_batch", "ReverseWhitening", "sample_frames", "dequantize",
    "quantize", "read_records", "write_records", "expand_paths", "DataError", "FramingError",
    "QuantizedVideo", "VideoLevelRecord", "parse_frame_record", "parse_video_level_record",
    "encode_frame_record", "encode_video_level_record", "write_synthetic_dataset",
]


def __getattr__(name: str):
    # The DataModule pulls in Lightning; import it only when asked for.
    # The generator is imported lazily too, so `python -m nextvlad.data.synthetic` runs cleanly.
    if name == "YT8MDataModule":
        from nextvlad.data.datamodule import YT8MDataModule

        return YT8MDataModule
    if name == "YT8MSegmentDataModule":
        from nextvlad.data.segment_datamodule import YT8MSegmentDataModule

        return YT8MSegmentDataModule
    if name == "write_synthetic_dataset":
        from nextvlad.data.synthetic import write_synthetic_dataset

        return write_synthetic_dataset
    raise AttributeError(f"module 'nextvlad.data' has no attribute {name!r}")

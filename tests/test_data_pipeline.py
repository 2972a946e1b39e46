"""Dequantize / pad / truncate / labels / reverse whitening / frame sampling against float64 oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nextvlad.data import (YT8MDataModule, YT8MFrameDataset, encode_video_level_record,
                           finalize_batch, iter_batches, iter_videos, read_records, sample_frames,
                           write_records)
from nextvlad.data.parsing import parse_frame_record
from nextvlad.data.transforms import quantize


def dequantize64(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float64) * 4 / 255 + 4 / 512 - 2


def quantized_videos(paths, num_classes):
    """Oracle view of the files: (id, uint8 rgb, uint8 audio, label list or None) per record."""
    out = []
    for path in paths:
        for data in read_records(path):
            video = parse_frame_record(data, num_classes)
            out.append((video.id, video.rgb, video.audio,
                        video.labels.tolist() if video.has_labels else None))
    return out


def test_dequantize_endpoints_and_quantizer():
    batch = {"id": ["a"], "rgb": torch.tensor([[[0] * 1024, [255] * 1024]], dtype=torch.uint8),
             "audio": torch.tensor([[[128] * 128, [7] * 128]], dtype=torch.uint8),
             "lengths": torch.tensor([2]), "labels": torch.zeros(1, 3, dtype=torch.uint8),
             "has_labels": torch.tensor([False])}
    out = finalize_batch(batch)
    assert out["rgb"][0, 0, 0].item() == -1.9921875  # q=0, exactly (SPEC 1.1)
    assert out["rgb"][0, 1, 0].item() == pytest.approx(2.0078125, abs=1e-6)  # q=255
    assert out["audio"][0, 0, 0].item() == pytest.approx(128 * 4 / 255 + 4 / 512 - 2, abs=1e-6)
    x = np.array([-3.0, -2.0, -1e-9, 0.0, 0.02, 2.0, 9.0])
    np.testing.assert_array_equal(quantize(x), [0, 0, 127, 128, 129, 255, 255])  # 127.5 -> 128


@pytest.mark.parametrize("max_frames", [30, 60, 80])
def test_batches_pad_truncate_and_label(synthetic_data, max_frames):
    num_classes = synthetic_data["num_classes"]
    for split in ("validate", "test"):
        oracle = quantized_videos(synthetic_data[split], num_classes)
        batches = list(iter_batches(synthetic_data[split], batch_size=16, max_frames=max_frames,
                                    num_classes=num_classes))
        sizes = [16] * (len(oracle) // 16) + ([len(oracle) % 16] if len(oracle) % 16 else [])
        assert [len(b["id"]) for b in batches] == sizes  # no drops in eval
        got = {key: torch.cat([b[key] for b in batches]) for key in
               ("rgb", "audio", "lengths", "labels", "has_labels")}
        assert [i for b in batches for i in b["id"]] == [o[0] for o in oracle]
        assert got["rgb"].dtype == got["audio"].dtype == got["labels"].dtype == torch.float32
        assert got["lengths"].dtype == torch.int64 and got["has_labels"].dtype == torch.bool
        assert got["rgb"].shape == (len(oracle), max_frames, 1024)
        for i, (_, rgb, audio, labels) in enumerate(oracle):
            n = min(len(rgb), max_frames)
            assert got["lengths"][i] == n
            for key, frames in (("rgb", rgb), ("audio", audio)):
                expected = np.zeros((max_frames, frames.shape[1]))
                expected[:n] = dequantize64(frames[:n])  # padded with 0.0 after dequantizing
                np.testing.assert_allclose(got[key][i].numpy(), expected, rtol=0, atol=1e-6)
            multi_hot = np.zeros(num_classes)
            if labels is not None:
                multi_hot[labels] = 1
            np.testing.assert_array_equal(got["labels"][i].numpy(), multi_hot)
            assert got["has_labels"][i] == (labels is not None)
        assert got["has_labels"].all() == (split == "validate")


def test_reverse_whitening_matches_spec(synthetic_data, eigenvalues_path):
    eigenvalues = np.load(eigenvalues_path).astype(np.float64)[:1024, 0]
    scale = np.sqrt(eigenvalues) + 1e-4  # epsilon outside the sqrt (SPEC 2)
    (plain,) = list(iter_batches(synthetic_data["test"], batch_size=64, max_frames=70,
                                 num_classes=10))
    (white,) = list(iter_batches(synthetic_data["test"], batch_size=64, max_frames=70,
                                 num_classes=10, eigenvalues_path=eigenvalues_path))
    expected = (plain["rgb"].numpy().astype(np.float64) - 4 / 512) * scale
    np.testing.assert_allclose(white["rgb"].numpy(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(white["audio"], plain["audio"], rtol=0, atol=0)  # audio untouched
    padded = ~(torch.arange(70) < plain["lengths"][:, None])
    assert padded.any()
    np.testing.assert_allclose(white["rgb"][padded].numpy(),  # small negatives, not zeros
                               np.broadcast_to(-(4 / 512) * scale, (int(padded.sum()), 1024)),
                               rtol=1e-6, atol=1e-7)
    assert (white["rgb"][padded] < 0).all()


def test_datamodule_transform_uint8_and_float_paths_agree(synthetic_data, eigenvalues_path):
    results = []
    for in_workers in (False, True):
        dm = YT8MDataModule(val_pattern=synthetic_data["validate"], batch_size=8, num_workers=0,
                            max_frames=50, num_classes=10, eigenvalues_path=eigenvalues_path,
                            dequantize_in_workers=in_workers)
        dm.setup("validate")
        raw = next(iter(dm.val_dataloader()))
        assert raw["rgb"].dtype == (torch.float32 if in_workers else torch.uint8)
        batch = dm.on_after_batch_transfer(raw, 0)
        assert set(batch) == {"id", "rgb", "audio", "lengths", "labels", "has_labels"}
        results.append(batch)
    for key in ("rgb", "audio", "lengths", "labels", "has_labels"):
        torch.testing.assert_close(results[0][key], results[1][key], rtol=0, atol=0)
    (reference,) = list(iter_batches(synthetic_data["validate"][0], batch_size=8, max_frames=50,
                                     num_classes=10, eigenvalues_path=eigenvalues_path))[:1]
    torch.testing.assert_close(results[0]["rgb"], reference["rgb"], rtol=0, atol=0)


def test_device_and_cpu_dequantize_agree_bitwise():
    from nextvlad.data.transforms import _dequantize_padded_cpu, _dequantize_padded_torch

    quantized = torch.randint(0, 256, (5, 40, 1024), dtype=torch.uint8)
    lengths = torch.tensor([40, 1, 17, 39, 25])
    expected = _dequantize_padded_torch(quantized, lengths)  # what runs on a GPU
    torch.testing.assert_close(_dequantize_padded_cpu(quantized, lengths), expected, rtol=0, atol=0)
    padded = ~(torch.arange(40) < lengths[:, None])
    assert not torch.signbit(expected[padded]).any()  # +0.0 (SPEC 1.1), not -0.0 (q * False)
    if torch.cuda.is_available():
        on_gpu = _dequantize_padded_torch(quantized.cuda(), lengths.cuda()).cpu()
        torch.testing.assert_close(on_gpu, expected, rtol=0, atol=0)
        assert torch.equal(torch.signbit(on_gpu), torch.signbit(expected))


def test_sample_frames_draws_real_frames_with_replacement(synthetic_data):
    (batch,) = list(iter_batches(synthetic_data["validate"][0], batch_size=64, max_frames=60,
                                 num_classes=10))
    generator = torch.Generator().manual_seed(0)
    sampled = sample_frames(batch, 200, generator)
    assert sampled["rgb"].shape == (len(batch["id"]), 200, 1024)
    assert sampled["audio"].shape == (len(batch["id"]), 200, 128)
    assert (sampled["lengths"] == 200).all()
    for i, n in enumerate(batch["lengths"].tolist()):
        real_rgb = batch["rgb"][i, :n]
        # every sampled frame is one of the video's real frames, rgb and audio from the same one
        match = (sampled["rgb"][i][:, None, :] == real_rgb[None]).all(-1)
        assert match.any(1).all()
        index = match.float().argmax(1)
        torch.testing.assert_close(sampled["audio"][i], batch["audio"][i, index], rtol=0, atol=0)
        assert index.unique().numel() > min(n, 200) // 2  # spread over the video, not one frame
    again = sample_frames(batch, 200, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again["rgb"], sampled["rgb"], rtol=0, atol=0)


def test_datamodule_sample_frames_option(synthetic_data):
    dm = YT8MDataModule(train_pattern=synthetic_data["train"], batch_size=8, num_workers=0,
                        max_frames=60, num_classes=10, sample_frames=25)
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["rgb"].shape == (8, 25, 1024) and (batch["lengths"] == 25).all()


def test_video_level_records(tmp_path):
    rng = np.random.default_rng(0)
    means = [(rng.standard_normal(1024).astype(np.float32), rng.standard_normal(128).astype(np.float32))
             for _ in range(3)]
    path = str(tmp_path / "video_level.tfrecord")
    write_records(path, [encode_video_level_record(f"v{i}", r, a, None if i == 2 else [i, 5])
                         for i, (r, a) in enumerate(means)])
    for level in ("auto", "video"):
        got = list(iter_videos(path, num_classes=6, level=level))
        assert [g["id"] for g in got] == ["v0", "v1", "v2"]
        for g, (r, a) in zip(got, means):
            np.testing.assert_array_equal(g["mean_rgb"], r)
            np.testing.assert_array_equal(g["mean_audio"], a)
        assert got[1]["label_ids"] == [1, 5] and got[1]["labels"].tolist() == [0, 1, 0, 0, 0, 1]
        assert not got[2]["has_labels"] and not got[2]["labels"].any()


def test_gzip_files_read_the_same(tmp_path, synthetic_data):
    path = synthetic_data["validate"][0]
    records = list(read_records(path))
    gz = str(tmp_path / "v.tfrecord.gz")
    write_records(gz, records, compression="gzip")
    plain = list(iter_batches(path, batch_size=7, max_frames=40, num_classes=10))
    zipped = list(iter_batches(gz, batch_size=7, max_frames=40, num_classes=10))
    assert len(plain) == len(zipped)
    for a, b in zip(plain, zipped):
        torch.testing.assert_close(a["rgb"], b["rgb"], rtol=0, atol=0)
    sharded = YT8MFrameDataset(gz, batch_size=3, num_classes=10)
    sharded.set_distributed(1, 2)  # a range starting inside the GZIP stream
    ids = [i for b in sharded for i in b["id"]]
    assert ids == [v["id"] for v in iter_videos(path, num_classes=10)][len(records) // 2:]

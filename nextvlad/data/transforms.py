"""Dequantization, padding, reverse whitening and random frame sampling (SPEC 1.1, 2; Table 1).

Batches leave the DataLoader *quantized* (uint8 frames, padded at the end to max_frames, plus
`lengths` and `audio_lengths`) and `finalize_batch` turns them into the float batch contract on
whatever device they are on. The arithmetic is the authors' float32 arithmetic:

* dequantize ``x = q * (4/255) + (4/512 - 2)`` (A:utils.py Dequantize: ``q*scalar + bias``);
* frames at index >= length are exactly 0.0 (padding happens after dequantizing); audio is
  padded on its own, at its own length (the mask, ``lengths``, counts rgb frames);
* reverse whitening (optional): ``rgb = (rgb - 4/512) * (sqrt(e[:1024]) + 1e-4)``, audio untouched,
  applied to the padded batch, so padded rgb rows become ``-(4/512) * scale`` (small negatives).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from nextvlad.data.parsing import RGB_SIZE
from nextvlad.kernels import frame_mask  # one definition of "real frame"

# Dequantize(max=2, min=-2): scalar = 4/255, bias = 4/512 + (-2), both taken to float32 as TF does.
DEQUANTIZE_SCALE = np.float32(4.0 / 255.0)
DEQUANTIZE_BIAS = np.float32(4.0 / 512.0 - 2.0)
WHITENING_OFFSET = np.float32(4.0 / 512.0)
WHITENING_EPSILON = np.float32(1e-4)

BATCH_KEYS = ("id", "rgb", "audio", "lengths", "labels", "has_labels")


def dequantize(quantized: np.ndarray) -> np.ndarray:
    """uint8 -> float32 ``q*4/255 + 4/512 - 2`` (SPEC 1.1 step 3), numpy."""
    return quantized.astype(np.float32) * DEQUANTIZE_SCALE + DEQUANTIZE_BIAS


def quantize(features: np.ndarray) -> np.ndarray:
    """The extractor's quantizer (SPEC 1.1): ``round((clip(x, -2, 2) + 2) * 255/4)`` as uint8."""
    return np.round((np.clip(features, -2.0, 2.0) + 2.0) * (255.0 / 4.0)).astype(np.uint8)


def whitening_scale(eigenvalues_path: str | os.PathLike) -> np.ndarray:
    """float32 (1024,) ``sqrt(e[:1024]) + 1e-4`` from the PCA eigenvalues file (SPEC 2).

    The file is `eigenvals.npy` from Google's `yt8m_pca` (shape (2048, 1) or (2048,), descending).
    A file that is not such an array of real numbers, with the first 1024 > 0 and finite as
    float32, is a ValueError naming it: a bad value would silently make every rgb input inf/NaN.
    """
    if not os.path.isfile(eigenvalues_path):
        raise FileNotFoundError(
            f"eigenvalues_path: {eigenvalues_path} does not exist (the yt8m_pca eigenvals.npy for "
            "reverse whitening, see the README's 'Getting the data'; null turns whitening off)"
        )
    loaded = _load_eigenvalues(eigenvalues_path)
    eigenvalues = loaded[:, 0] if loaded.ndim == 2 and loaded.shape[1] == 1 else loaded
    if eigenvalues.ndim != 1 or eigenvalues.shape[0] < RGB_SIZE:
        raise ValueError(f"{eigenvalues_path}: expected at least {RGB_SIZE} eigenvalues of shape "
                         f"(N, 1) or (N,), got shape {loaded.shape}")
    if not np.all(eigenvalues[:RGB_SIZE] > 0):
        raise ValueError(f"{eigenvalues_path}: the first {RGB_SIZE} eigenvalues must be > 0")
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf: refused below
        used = eigenvalues[:RGB_SIZE].astype(np.float32)
    if not np.all(np.isfinite(used)):  # passes "> 0", then makes every rgb input inf/NaN
        index = int(np.argmin(np.isfinite(used)))
        raise ValueError(f"{eigenvalues_path}: eigenvalue {index} is {float(eigenvalues[index])}, not a "
                         "finite float32 (reverse whitening would turn every rgb input into inf/NaN)")
    # float32 sqrt then + 1e-4 in float32, as the authors' graph computes it.
    return np.sqrt(used) + WHITENING_EPSILON


def _load_eigenvalues(eigenvalues_path: str | os.PathLike) -> np.ndarray:
    """The array in an existing .npy file, refused (naming the file) unless it is real numbers."""
    with open(eigenvalues_path, "rb") as file:
        is_npy = file.read(len(np.lib.format.MAGIC_PREFIX)) == np.lib.format.MAGIC_PREFIX
    if not is_npy:  # text, pickle, .npz, empty: numpy's own errors would not name the file
        raise ValueError(f"{eigenvalues_path}: not a .npy file (expected the eigenvalues array "
                         "as np.save writes it)")
    try:
        loaded = np.load(eigenvalues_path, allow_pickle=False)
    except (ValueError, EOFError) as error:  # truncated, a broken header, an object array
        raise ValueError(f"{eigenvalues_path}: not a readable .npy array of eigenvalues "
                         f"({error})") from error
    if loaded.dtype.kind not in "iuf":  # bool, complex, strings: not eigenvalues
        raise ValueError(f"{eigenvalues_path}: eigenvalues must be real numbers, got dtype {loaded.dtype}")
    return loaded


class ReverseWhitening:
    """``rgb -> (rgb - 4/512) * (sqrt(e) + 1e-4)``, audio untouched (SPEC 2, A:train.py l.262-267)."""

    def __init__(self, eigenvalues_path: str | os.PathLike):
        self.eigenvalues_path = str(eigenvalues_path)
        self.scale = torch.from_numpy(whitening_scale(eigenvalues_path))
        self._scale_on: dict[torch.device, torch.Tensor] = {}

    def scale_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._scale_on:
            self._scale_on[device] = self.scale.to(device)
        return self._scale_on[device]

    def __call__(self, rgb: torch.Tensor) -> torch.Tensor:
        """Apply to a padded float32 rgb batch (..., 1024)."""
        return (rgb - float(WHITENING_OFFSET)) * self.scale_on(rgb.device)


def dequantize_padded(quantized: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """uint8 (B, M, D) padded batch -> float32, frames at index >= length set to exactly 0.0."""
    if quantized.device.type == "cpu":
        return _dequantize_padded_cpu(quantized, lengths)
    return _dequantize_padded_torch(quantized, lengths)


def _dequantize_padded_torch(quantized: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    values = quantized.to(torch.float32).mul_(float(DEQUANTIZE_SCALE)).add_(float(DEQUANTIZE_BIAS))
    # masked_fill, not a multiplication by the mask: negative values times 0 would give -0.0.
    return values.masked_fill_(~frame_mask(lengths, quantized.shape[1])[..., None], 0.0)


def dequantize_rows_into(out: np.ndarray, quantized: np.ndarray) -> None:
    """``out[:] = float32(q) * 4/255 + (4/512 - 2)``: the same two float32 roundings as the torch
    path, bit for bit, without float temporaries."""
    np.multiply(quantized, DEQUANTIZE_SCALE, out=out, dtype=np.float32, casting="unsafe")
    out += DEQUANTIZE_BIAS


def _dequantize_padded_cpu(quantized: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    # Video by video, so each video's rows stay in cache, into a numpy allocation (huge pages):
    # several times faster on a CPU than whole-batch torch ops (see benchmarks/bench_data.py).
    source = quantized.numpy()
    out = np.empty(source.shape, np.float32)
    for i, n in enumerate(lengths.tolist()):
        dequantize_rows_into(out[i, :n], source[i, :n])
        out[i, n:] = 0.0
    return torch.from_numpy(out)


def sample_frames(batch: dict, num_samples: int, generator: torch.Generator | None = None) -> dict:
    """Random frame sampling with replacement (NetVLAD_random, Table 1; starter SampleRandomFrames).

    For each video, ``num_samples`` frame indices ``floor(u * length)``, u ~ U[0, 1), are drawn
    among its real frames; the result has M = num_samples and every length = num_samples.
    """
    lengths = batch["lengths"]
    uniform = torch.rand((lengths.shape[0], num_samples), device=lengths.device, generator=generator)
    index = (uniform * lengths[:, None].to(torch.float32)).long()
    index = torch.minimum(index, (lengths[:, None] - 1).clamp(min=0))  # guards u*n rounding up to n
    out = dict(batch)
    for key in ("rgb", "audio"):
        values = batch[key]
        out[key] = torch.gather(values, 1, index[..., None].expand(-1, -1, values.shape[-1]))
    out["lengths"] = torch.full_like(lengths, num_samples)
    return out


def finalize_batch(batch: dict, whitening: ReverseWhitening | None = None,
                   num_sampled_frames: int | None = None,
                   generator: torch.Generator | None = None) -> dict:
    """A batch as the dataset yields it -> the float batch contract, on the batch's device.

    The input's rgb/audio are either uint8 (quantized, the default) or float32 already dequantized
    and zero-padded (`dequantize_in_workers`); whitening and frame sampling are applied here in
    both cases, so call this exactly once per batch. Audio rows at index >= ``audio_lengths``
    (default: ``lengths``) become 0.0: the audio stream is padded on its own (SPEC 1.1 step 6).
    Output keys: id (list[str]), rgb float32 (B, M, 1024), audio float32 (B, M, 128), lengths
    int64 (B,), labels float32 (B, C), has_labels bool (B,).
    """
    lengths = batch["lengths"]
    rgb, audio = batch["rgb"], batch["audio"]
    if rgb.dtype == torch.uint8:
        rgb = dequantize_padded(rgb, lengths)
        audio = dequantize_padded(audio, batch.get("audio_lengths", lengths))
        lease = batch.get("buffer_lease")
        if lease is not None:  # the uint8 frames have been copied out: the worker may reuse them
            lease.release()
    if whitening is not None:
        rgb = whitening(rgb)
    out = {"id": batch["id"], "rgb": rgb, "audio": audio, "lengths": lengths,
           "labels": batch["labels"].to(torch.float32), "has_labels": batch["has_labels"]}
    if num_sampled_frames is not None:
        out = sample_frames(out, num_sampled_frames, generator)
    return out


__all__ = ["DEQUANTIZE_SCALE", "DEQUANTIZE_BIAS", "WHITENING_OFFSET", "WHITENING_EPSILON",
           "BATCH_KEYS", "dequantize", "quantize", "whitening_scale", "ReverseWhitening",
           "frame_mask", "dequantize_padded", "dequantize_rows_into", "sample_frames",
           "finalize_batch"]

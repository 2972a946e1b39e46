"""Suite-wide test setup."""

import os

# Triton fixes interpreted vs compiled mode when it is first imported (Lightning imports it), so
# this has to happen before any test module is collected. Without a CUDA GPU nothing can run
# compiled Triton kernels anyway; with TRITON_INTERPRET=1 the residual_aggregation tests run the
# kernels on CPU tensors through the interpreter. Only code that launches Triton kernels is
# affected (on CPU that is only those tests); torch.compile on CPU generates C++, not Triton.
# On a GPU machine the variable is left alone, so the compiled kernels are what gets tested.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # A pytest worker per core (make test) and torch's default of a thread per core oversubscribe
    # the machine: on 2 cores the suite spent 21 CPU-minutes with it, 16 with one thread per worker
    # and per command it runs (OMP_NUM_THREADS is inherited).
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, there when the suite runs with -n
def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (make test): a worker per core, at most 4. A test may run several processes
    (DDP ranks, DataLoader workers, console scripts), each importing torch: more workers than that
    on a machine of many cores and little memory would risk its memory."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):  # pytest-xdist's own setting, which this hook would hide
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores))


# -- shared data fixtures -------------------------------------------------------------------------
import pathlib  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def record_count_cache(tmp_path_factory) -> None:
    """The suite's own record-count cache (inherited by the commands it runs): a user's
    ~/.cache/nextvlad is neither read nor written."""
    os.environ["NEXTVLAD_CACHE_DIR"] = str(tmp_path_factory.mktemp("record-count-cache"))


@pytest.fixture(scope="session")
def eigenvalues_path(tmp_path_factory) -> str:
    """The published yt8m_pca eigenvalues (../shared/yt8m_pca/eigenvals.npy) where a clone has them
    beside it, else a file of their format ((2048, 1) float32, positive, descending): the reverse
    whitening tests compare with the file's own values, so they run in any clone."""
    path = REPO_ROOT.parent / "shared" / "yt8m_pca" / "eigenvals.npy"
    if path.exists():
        return str(path)
    import numpy as np

    synthetic = tmp_path_factory.mktemp("yt8m_pca") / "eigenvals.npy"
    np.save(synthetic, np.geomspace(14.7, 1.5e-3, 2048, dtype=np.float32).reshape(2048, 1))
    return str(synthetic)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict:
    """A small synthetic YouTube-8M dataset: 10 classes, 20-60 frames, 3 files per split.

    Returns {"dir": str, "train"/"validate"/"test": [paths], "num_classes": 10}.
    """
    from nextvlad.data.synthetic import write_synthetic_dataset

    out_dir = tmp_path_factory.mktemp("synthetic")
    paths = write_synthetic_dataset(out_dir, num_train=120, num_validate=45, num_test=30,
                                    num_classes=10, files_per_split=3, min_frames=20,
                                    max_frames=60, seed=7)
    return {"dir": str(out_dir), "num_classes": 10, **paths}

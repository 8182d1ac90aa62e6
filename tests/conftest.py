import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits at 16 px: train/test splits with 'image' and 'label' columns."""
    from emc2_hf import load_digits_dataset

    return load_digits_dataset(image_size=16, seed=0)

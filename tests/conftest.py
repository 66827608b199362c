import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fp8_reference():
    """The plain-Python decoding of V4.1's packed rows (tests/fp8_reference.py): packed [..., 264] -> bf16."""
    import fp8_reference as ref

    return ref.dequantize

"""tests/gpu runs on the device only: without CUDA every test here is skipped, with the reason."""

from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # this hook sees the whole session's items: touch only those under tests/gpu
    skip = pytest.mark.skip(reason="tests/gpu needs a CUDA device (torch.cuda.is_available() is False)")
    cuda = torch.cuda.is_available()
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not cuda:
                item.add_marker(skip)

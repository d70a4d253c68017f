"""One torch thread for these tests: the tiny models gain nothing from two, and on a shared, busy
machine two spinning OpenMP threads per process made a training step ~30x slower (measured)."""

import pytest


@pytest.fixture(autouse=True, scope="module")  # module: before the module-scoped training runs
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

import pytest
import torch

torch.set_num_threads(1)  # the tests' networks are tiny: one thread is several times faster than two


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Each test starts from the same global seed and the default dtype (tests that need float64 set it)."""
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: on a shared, oversubscribed CPU the small models of
    these tests ran ~5x faster than with torch's default thread pool (spinning threads fight the
    other processes). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

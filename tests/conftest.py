import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is as fast, and much faster when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M (model, tokenizer), loaded once per test session, fp32 on CPU."""
    from kvforge import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smol_tokenizer(smol):
    return smol[1]

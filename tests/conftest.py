import os

import pytest
import torch

# Tests are about numbers, not speed: one thread each keeps 2-core CI machines responsive
# when multi-process tests run beside them.
torch.set_num_threads(int(os.environ.get("ASYMLLM_TEST_THREADS", "2")))


@pytest.fixture
def tiny_llama():
    from asymllm.tiny import tiny_causal_lm

    return tiny_causal_lm("llama", seed=0)


@pytest.fixture
def tiny_mistral():
    from asymllm.tiny import tiny_causal_lm

    return tiny_causal_lm("mistral", seed=0)


@pytest.fixture
def token_batch():
    generator = torch.Generator().manual_seed(123)
    return torch.randint(0, 256, (2, 16), generator=generator)

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

CALIB_PROMPTS = [
    "how do I bake bread at home", "tell me a joke about cats please", "what is 2+2",
    "write a short poem about rain", "explain gravity to a child in two sentences", "hi",
    "list three fruits that are red", "why is the sky blue during the day",
]
CALIB_LABELS = [0, 1, 0, 1, 0, 1, 1, 0]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the modules that ask for it (`pytestmark`). Tiny tensors gain nothing
    from intra-op threads, and on a shared 2-core box every op of a 2-thread pool waits for a
    descheduled thread (a tiny calibration took 6 s instead of 0.5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def calib_set():
    from qrealign.calibrate.data import CalibrationSet

    return CalibrationSet(list(CALIB_PROMPTS), list(CALIB_LABELS))

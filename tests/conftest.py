import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: each worker (and every process it starts) computes on one thread, so that N workers
    # share the cores instead of oversubscribing them
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def ref_values():
    with open(DATA / "diffsep_reference_values.json") as f:
        return json.load(f)


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


@pytest.fixture(autouse=True)
def _fresh_crop_generators():
    """Every test starts without the process-wide crop generators a Brain sets up per epoch
    (``brain._DATA_RNG``), so that crops drawn in one test do not depend on the tests before it."""
    from speechbrain_diffsep import brain

    brain._DATA_RNG.update(generator=None, pid=None, key=None)
    yield
    brain._DATA_RNG.update(generator=None, pid=None, key=None)

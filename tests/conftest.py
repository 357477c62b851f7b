import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Under pytest-xdist the workers share the cores: each takes its share of torch's threads, not all of them, and so do
# the commands a test starts (OpenMP threads that outnumber the cores spin and slow everything many times over).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(share)
    os.environ["OMP_NUM_THREADS"] = str(share)


def pytest_collection_modifyitems(items):
    """The README's run (about 10 minutes in one file) goes first, so that under `--dist loadfile` the other worker
    takes the remaining files meanwhile instead of leaving it running alone at the end."""
    items.sort(key=lambda item: item.nodeid.split("::")[0] != "tests/test_readme.py")

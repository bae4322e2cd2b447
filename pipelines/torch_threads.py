"""FFCV sets torch's intra-op thread count as a side effect: to 1 when it is imported, and to its worker
count whenever a Loader is built. On a CPU run that halves the training step, so every place supmae
touches FFCV keeps torch's setting as it found it."""
import contextlib

import torch


@contextlib.contextmanager
def keep_torch_threads():
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)

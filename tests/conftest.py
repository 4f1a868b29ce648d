"""Session-scoped tiny random GPT-2 checkpoints, saved and loaded through the same path a user's directory takes;
each model fixture is parametrised over the shapes of ``attrpatch.testing.SHAPES``."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

from attrpatch import load_model, load_tokenizer
from attrpatch.testing import SHAPES, devices, save_random_gpt2


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="session", params=sorted(SHAPES))
def tiny_dir(request, tmp_path_factory):
    return save_random_gpt2(tmp_path_factory.mktemp(request.param), seed=1, **SHAPES[request.param])


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """A LoadedModel per shape (parametrised over SHAPES)."""
    return load_model(tiny_dir)


@pytest.fixture(scope="session", params=devices())
def device(request):
    """Every device present: cpu always, cuda when available (the GPU-relevant tests take it)."""
    return request.param


@pytest.fixture(scope="module")
def on_device(tiny_dir, device):
    """The tiny model (each shape) on each device."""
    return load_model(tiny_dir, device=device)


@pytest.fixture(scope="module")
def tiny64_on(tiny_dir, device):
    """The float64 tiny model on each device."""
    model = load_model(tiny_dir, device=device)
    model.bridge.to(torch.float64)
    return model


@pytest.fixture(scope="module")
def tiny64(tiny_dir):
    """The tiny model in float64, so that 1e-5 agreement measures the algorithm, not float32 rounding."""
    model = load_model(tiny_dir)
    model.bridge.to(torch.float64)
    return model


_RAY_SESSION = False  # True while ray_session's Ray is up: the one Ray a test may leave running


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every in-process sweep test. It declares one logical GPU (``num_gpus=1``): workers are
    placed with fractional GPUs exactly as on a GPU cluster, and each must notice that CUDA is absent."""
    global _RAY_SESSION
    import ray

    # workers import the test plugin module by name, so they need this directory on their path
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    if ray.is_initialized():  # started outside any test (a fixture or an import): _no_stray_ray cannot name it
        warnings.warn("a Ray instance was running before ray_session started: shut down", stacklevel=1)
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    _RAY_SESSION = True
    yield ray
    _RAY_SESSION = False
    ray.shutdown()


@pytest.fixture(autouse=True)
def _no_stray_ray(request):
    """A test that leaves a Ray running in this process (e.g. through an API that starts one on first use, such as
    ``ray.get_runtime_context()``) is named in a warning (the summary lists it) and its Ray shut down, instead of
    breaking ``ray_session`` for every later test."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and not _RAY_SESSION and ray.is_initialized():
        ray.shutdown()
        warnings.warn(f"{request.node.nodeid} left a Ray instance running in the test process (shut down)",
                      stacklevel=1)

"""Shared pytest configuration.

Hypothesis profiles for the property tests (cases in ``tests/fuzz_cases.py``):

* ``quick`` (the default, used in CI): a few dozen derandomized cases per property, a few hundred in all;
* ``long``: 1,250 random cases per property (more than 10,000 in all), selected with
  ``LLM_INT8_FUZZ_PROFILE=long`` (see docs/reliability.md for the one-line command).

``restore_torch_rng``: a test using it leaves torch's global RNG as it found it, so that it does
not change the random inputs of the tests that run after it.
"""

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported (bitsandbytes imports it too), so set it
# before any test module loads: without a GPU the Triton kernels run on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings

FUZZ_PROFILE_ENV = "LLM_INT8_FUZZ_PROFILE"
# Each case builds its tensors from a seed; generation is cheap but not instant for large K.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

settings.register_profile("quick", max_examples=30, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("long", max_examples=1250, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get(FUZZ_PROFILE_ENV, "quick"))


@pytest.fixture
def restore_torch_rng():
    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)

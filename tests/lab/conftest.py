"""Lab fixtures: a small reference policy trained once per session into a temporary cache."""

import pytest

from prefkit.lab import make_world
from prefkit.lab.policy import ReferenceSpec, reference_policy

# Small enough to pre-train in a few seconds, good enough to sample plausible responses.
SMALL_SPEC = ReferenceSpec(
    hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, steps=120, heldout_samples=256
)


@pytest.fixture(scope="session")
def small_spec():
    return SMALL_SPEC


@pytest.fixture(scope="session")
def lab_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lab_cache")


@pytest.fixture(scope="session")
def small_reference(lab_cache):
    """``(world, LabPolicy)``: the default world (seed 0) and a small reference policy for it."""
    world = make_world("default", 0)
    return world, reference_policy(world, 0, spec=SMALL_SPEC, cache_dir=lab_cache, progress=False)

"""Fixtures shared by the unit tests: sample images built once per session."""

from pathlib import Path

import pytest

from pvlab import sample


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory of this session; the .deb downloads are shared through it."""
    return tmp_path_factory.mktemp("pvlab-cache")


@pytest.fixture(scope="session")
def hd0_image(sample_cache: Path) -> Path:
    return sample.build_sample_image(sample_cache, layout="hd0")


@pytest.fixture(scope="session")
def hd00_image(sample_cache: Path) -> Path:
    return sample.build_sample_image(sample_cache, layout="hd00")

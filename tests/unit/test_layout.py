"""The test tree itself: pytest imports test files by basename, so a name used in
two tiers breaks collection of the second."""

from __future__ import annotations

from collections import Counter

import pytest

from pvlab.settings import PROJECT_ROOT

pytestmark = pytest.mark.unit


def test_every_test_file_name_is_unique_across_the_tiers():
    names = Counter(p.name for p in (PROJECT_ROOT / "tests").rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []

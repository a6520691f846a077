"""Test tiers: unit (no VM), integration (testinfra on dom0), e2e (boots guests)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    # A test's tier follows from its folder unless it names one itself, so no
    # test can miss its marker.
    tiers = ("unit", "integration", "e2e")
    for item in items:
        if any(item.get_closest_marker(tier) for tier in tiers):
            continue
        for tier in tiers:
            if f"/tests/{tier}/" in str(item.fspath):
                item.add_marker(getattr(pytest.mark, tier))

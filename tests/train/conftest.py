"""Fixtures for the trainer tests: tiny records and PreferenceConfig factories."""

import pytest

from prefkit.data.records import PairwiseRecord, UnpairedRecord

CHOSEN = ["Hello there, friend.", "Sure, happy to help you.", "Of course, here it is.", "Gladly!"]
REJECTED = ["No.", "Go away now.", "Whatever", "Not my problem at all."]


def _pairs(n=8, weights=False):
    return [
        PairwiseRecord(
            prompt=f"Q{i}: please say something nice",
            chosen=CHOSEN[i % len(CHOSEN)],
            rejected=REJECTED[(i + 1) % len(REJECTED)],
            weight=(1.0 + i % 3) if weights else None,
            id=f"p{i}",
        )
        for i in range(n)
    ]


def _unpaired(n=8):
    return [
        UnpairedRecord(
            prompt=f"Q{i}: please say something nice",
            completion=CHOSEN[i % len(CHOSEN)] if i % 2 == 0 else REJECTED[i % len(REJECTED)],
            label=i % 2 == 0,
            id=f"u{i}",
        )
        for i in range(n)
    ]


@pytest.fixture
def make_pairs():
    """``make_pairs(n, weights=False)``: pairwise records with ids p0, p1, ..."""
    return _pairs


@pytest.fixture
def make_unpaired():
    """``make_unpaired(n)``: unpaired records, even indices desirable, ids u0, u1, ..."""
    return _unpaired

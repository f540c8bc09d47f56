"""Sponsored blending: slots, caps, relevance floor, and organic order untouched."""

import pytest
from pydantic import ValidationError

from serving.blending import Card, SponsoredPolicy, blend


def organic(n: int) -> list[Card]:
    return [Card(restaurant_id=i, score=1 - i / 100, p_order=0.05 - i / 1000) for i in range(1, n + 1)]


def test_sponsors_take_exactly_their_slots():
    """Sponsored cards sit at the configured positions, best p_order first, and are marked."""
    page = blend(organic(20), [Card(101, 0.1, 0.02), Card(102, 0.1, 0.04)], SponsoredPolicy(slots=[3, 8]), 10)
    assert [i + 1 for i, c in enumerate(page) if c.sponsored] == [3, 8]
    assert page[2].restaurant_id == 102 and page[7].restaurant_id == 101
    assert len(page) == 10


def test_organic_order_is_preserved():
    """Removing the sponsored cards leaves the organic ranking as it was (a prefix of it)."""
    ranked = organic(20)
    page = blend(ranked, [Card(101, 0.1, 0.03), Card(5, 0.9, 0.04)], SponsoredPolicy(slots=[1, 4]), 12)
    shown = [c.restaurant_id for c in page if not c.sponsored]
    expected = [c.restaurant_id for c in ranked if c.restaurant_id != 5][: len(shown)]
    assert shown == expected


def test_a_sponsor_is_not_shown_twice():
    """A restaurant that is both sponsored and organic appears once, as sponsored."""
    page = blend(organic(10), [Card(7, 0.5, 0.03)], SponsoredPolicy(slots=[2]), 10)
    assert [c.restaurant_id for c in page].count(7) == 1
    assert page[1].restaurant_id == 7 and page[1].sponsored


def test_cap_and_relevance_floor():
    """At most max_per_page sponsors, and none below min_p_order."""
    sponsors = [Card(100 + i, 0.1, p) for i, p in enumerate([0.09, 0.08, 0.07, 0.001])]
    page = blend(organic(20), sponsors, SponsoredPolicy(slots=[1, 2, 3, 4], max_per_page=2, min_p_order=0.01), 10)
    assert sum(c.sponsored for c in page) == 2
    page = blend(organic(20), sponsors[3:], SponsoredPolicy(slots=[1], min_p_order=0.01), 10)
    assert not any(c.sponsored for c in page)


def test_slots_beyond_the_page_are_ignored():
    """A slot past the page size is not used."""
    page = blend(organic(20), [Card(101, 0.1, 0.05)], SponsoredPolicy(slots=[8]), 5)
    assert len(page) == 5 and not any(c.sponsored for c in page)


@pytest.mark.parametrize("slots", [[0], [2, 2], [-1]])
def test_policy_rejects_bad_slots(slots):
    """Slots must be distinct positions from 1."""
    with pytest.raises(ValidationError, match="slots must be distinct"):
        SponsoredPolicy(slots=slots)

"""Sponsored slots in the feed, by a stated policy.

Policy (all configurable in the serve config's `sponsored` block):
- sponsored cards go only to the fixed `slots` (1-based page positions), best first by p_order;
- at most `max_per_page` of them, and only those with p_order >= `min_p_order` (no irrelevant ads);
- organic cards keep their ranked order: they only move down to make room for the slots, and a
  restaurant shown as sponsored is not shown again organically;
- a slot with no eligible sponsor is filled by the next organic card.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SponsoredPolicy(BaseModel):
    """How sponsored restaurants are blended into a page."""

    model_config = ConfigDict(extra="forbid")

    slots: list[int] = Field(default=[3, 8], description="1-based page positions reserved for sponsored cards.")
    max_per_page: int = Field(default=2, ge=0, description="At most this many sponsored cards per page.")
    min_p_order: float = Field(default=0.01, ge=0, le=1, description="A sponsor needs at least this p(order).")

    @field_validator("slots")
    @classmethod
    def _slots_are_positions(cls, slots: list[int]) -> list[int]:
        if any(slot < 1 for slot in slots) or len(set(slots)) != len(slots):
            raise ValueError("slots must be distinct page positions starting at 1")
        return sorted(slots)


@dataclass(frozen=True)
class Card:
    """One restaurant on the page."""

    restaurant_id: int
    score: float
    p_order: float
    sponsored: bool = False


def blend(organic: list[Card], sponsors: list[Card], policy: SponsoredPolicy, page_size: int) -> list[Card]:
    """The page: organic cards in their order, sponsored cards in the policy's slots."""
    eligible = sorted((c for c in sponsors if c.p_order >= policy.min_p_order), key=lambda c: -c.p_order)
    slots = [s for s in policy.slots if s <= page_size][: policy.max_per_page]
    chosen = {c.restaurant_id: c for c in eligible[: len(slots)]}
    slot_cards = dict(zip(slots, chosen.values()))
    queue = iter(c for c in organic if c.restaurant_id not in chosen)
    page: list[Card] = []
    for position in range(1, page_size + 1):
        sponsor = slot_cards.get(position)
        card = Card(sponsor.restaurant_id, sponsor.score, sponsor.p_order, True) if sponsor else next(queue, None)
        if card is None:
            break
        page.append(card)
    return page


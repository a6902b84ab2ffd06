"""Cycle costs: CPU profiles as data (:mod:`.profile`), the cost model that prices the models'
event counts (:mod:`.model`), and fitting a profile's free prices to published figures
(:mod:`.fit`)."""

from fastmmio.costs.model import (
    CostModel,
    LineItem,
    Pricing,
    Resolution,
    UnpricedEventError,
    check_prices,
)
from fastmmio.costs.profile import (
    BASES,
    COMPONENTS,
    MAX_PRICE,
    Free,
    Price,
    Profile,
    list_profiles,
    load_profile,
    override_prices,
    parse_profile,
)

__all__ = [
    "BASES", "COMPONENTS", "MAX_PRICE", "CostModel", "Free", "LineItem", "Price", "Pricing", "Profile",
    "Resolution", "UnpricedEventError", "check_prices", "list_profiles", "load_profile",
    "override_prices", "parse_profile",
]

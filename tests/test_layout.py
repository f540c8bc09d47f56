"""The architecture's boundaries, checked: what runs in production does not import what only simulates."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from models.marketplace import DELIVERY_RADIUS_KM, is_open
from models.retrieval.features import hard_filter, radius_of_city


def test_the_served_app_does_not_import_the_simulator():
    """serving.app (the serve config's import_path) and everything it imports run without models.simulator:
    the marketplace's rules (radius, opening hours) live in models/marketplace.py."""
    probe = ("import sys, serving.app, serving.launch, serving.rollout; "
             "print(sorted(m for m in sys.modules if m.startswith(('models.simulator', 'models.sessions', 'city'))))")
    out = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_hard_filter_is_the_marketplaces_rule():
    """The served retrieval's filter (models.retrieval.features.hard_filter) is open-now within the radius."""
    assert radius_of_city() == DELIVERY_RADIUS_KM
    lat = np.array([52.37, 52.37, 52.60])  # here, here, ~26 km north
    lon = np.array([4.89, 4.89, 4.89])
    opens, closes = np.array([10.0, 22.0, 10.0]), np.array([22.0, 2.0, 22.0])  # the second opens overnight
    noon, one_am = 12 * 3600.0, 3600.0
    assert hard_filter(lat, lon, opens, closes, 52.37, 4.89, noon, DELIVERY_RADIUS_KM).tolist() == [True, False, False]
    assert hard_filter(lat, lon, opens, closes, 52.37, 4.89, one_am, DELIVERY_RADIUS_KM).tolist() == [False, True, False]
    assert is_open(np.array([22.0]), np.array([2.0]), np.array([23.0])).tolist() == [True]

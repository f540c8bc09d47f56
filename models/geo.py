"""Geography of the served city: distances, bearings and delivery-area cells.

Shared by the simulator, the feature pipeline, training and serving, so that a
kilometre or an area means the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import h3
import numpy as np

EARTH_RADIUS_KM = 6371.0088
# H3 resolution 7 hexagons (~5 km2) are the delivery areas that congestion is measured in.
AREA_RESOLUTION = 7


@dataclass(frozen=True)
class City:
    """The served city: a disc around a centre. Deliveries outside it are refused."""

    name: str = "Courier City"
    center_lat: float = 52.370
    center_lon: float = 4.900
    radius_km: float = 8.0

    def distance_from_center_km(self, lat: float, lon: float) -> float:
        """Great-circle distance of a point from the city centre."""
        return float(haversine_km(self.center_lat, self.center_lon, lat, lon))

    def contains(self, lat: float, lon: float) -> bool:
        """True when the point is inside the served disc."""
        return self.distance_from_center_km(lat, lon) <= self.radius_km


CITY = City()


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in km; accepts scalars or numpy arrays."""
    lat1, lon1, lat2, lon2 = (np.radians(np.asarray(x, dtype=np.float64)) for x in (lat1, lon1, lat2, lon2))
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def bearing_rad(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Initial bearing from point 1 to point 2, in radians clockwise from north."""
    lat1, lon1, lat2, lon2 = (np.radians(np.asarray(x, dtype=np.float64)) for x in (lat1, lon1, lat2, lon2))
    dlon = lon2 - lon1
    y = np.sin(dlon) * np.cos(lat2)
    x = np.cos(lat1) * np.sin(lat2) - np.sin(lat1) * np.cos(lat2) * np.cos(dlon)
    return np.arctan2(y, x)


def area_id(lat: float, lon: float) -> str:
    """The delivery area (an H3 cell id) a point falls in."""
    return h3.latlng_to_cell(float(lat), float(lon), AREA_RESOLUTION)


def area_ids(lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
    """Vectorised `area_id` for arrays of points."""
    return np.array([area_id(a, b) for a, b in zip(lats, lons)], dtype=object)


def offset_point(lat: float, lon: float, north_km: float, east_km: float) -> tuple[float, float]:
    """Move a point by a small offset in km (equirectangular, fine at city scale)."""
    dlat = north_km / 111.32
    dlon = east_km / (111.32 * np.cos(np.radians(lat)))
    return lat + dlat, lon + dlon

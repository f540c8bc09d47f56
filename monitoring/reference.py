"""The drift reference of a model: binned training distributions, and the PSI against them.

Training writes `reference.json` next to `model.onnx` (`write_reference`); the monitor reads it
(`load_reference`) and compares the last logged predictions with it (`psi`). numpy only: the
training code imports this module.

`reference.json`:

    {"bins": 10, "features": {name: entry, ...}, "predictions": {name: entry}, ...extra}

with one entry per column (`build_reference`):

    {"edges": [e_1, ..., e_k-1], "shares": [s_1, ..., s_k], "missing_share": m, "count": n}

Bin i holds the values in (e_i-1, e_i]; the first bin is open below (-inf, e_1], the last open
above (e_k-1, +inf), so a live value outside the training range still lands in a bin. The edges
are the training quantiles at 1/bins, ..., (bins-1)/bins (values that occur), repeats removed:
a discrete or constant column gets fewer, wider bins (a constant c gets (-inf, c] and (c, +inf)).
Missing values (None, NaN, +-inf) are a bin of their own: `shares` sum to 1 - `missing_share`.

An entry built with the UTC hour of day of each row (`build_entry(values, bins, hours)`) also
carries the shares of each hour that has rows, on the SAME global edges:

    "by_hour": {"0": {"shares": [...], "missing_share": m, "count": n}, ..., "23": {...}}

so `psi(entry, values, hours)` can compare a live window with the training distribution of the
hours the window covers (demand, and with it load, congestion and ETAs, follows the meal curve:
a window of the last hour differs from a training set of every hour in a healthy city). Entries
without `by_hour` (references written before it) are compared with the global shares.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE_FILE = "reference.json"
DEFAULT_BINS = 10
EPSILON = 1e-4  # floor of a bin's share in the PSI: an empty bin would make the log infinite
# an hour with fewer reference rows than this is described by the global shares: too few to trust
MIN_HOUR_COUNT = 50
HOURS = 24


def _as_float(values: Iterable[Any] | np.ndarray) -> np.ndarray:
    """float64 values, None -> NaN."""
    array = np.asarray(values)
    if array.dtype == object:
        array = np.array([np.nan if v is None else v for v in array.ravel()], dtype=np.float64)
    return array.astype(np.float64, copy=False).ravel()


def bin_shares(edges: list[float] | np.ndarray, values: Iterable[Any] | np.ndarray) -> tuple[np.ndarray, float, int]:
    """(share per bin, share missing, count) of `values` in the bins of `edges` (module doc)."""
    values = _as_float(values)
    n = len(values)
    if n == 0:
        return np.zeros(len(edges) + 1), 0.0, 0
    finite = np.isfinite(values)
    # side="left": the index of the first edge >= value, so a bin is (e_i-1, e_i]
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), values[finite], side="left")
    counts = np.bincount(index, minlength=len(edges) + 1)
    return counts / n, float((~finite).sum() / n), n


def hour_of_day(epoch_seconds: Any) -> np.ndarray:
    """The UTC hour of day (int64, 0-23) of epoch seconds; -1 (unknown) for None, NaN or inf."""
    seconds = _as_float(epoch_seconds) if np.ndim(epoch_seconds) else _as_float([epoch_seconds])
    hours = np.full(seconds.shape, -1, dtype=np.int64)
    finite = np.isfinite(seconds)
    hours[finite] = np.floor(seconds[finite] / 3600.0).astype(np.int64) % HOURS
    return hours if np.ndim(epoch_seconds) else hours[0]


def _as_hours(hours: Iterable[Any] | np.ndarray, n: int) -> np.ndarray:
    """int64 hours aligned with n values; outside 0-23 (e.g. -1) means unknown."""
    array = np.asarray(hours).ravel()
    if len(array) != n:
        raise ValueError(f"hours must give one hour per value: got {len(array)} hours for {n} values")
    if array.dtype.kind not in "iub":
        raise ValueError(f"hours must be integers 0-23 (UTC hour of day, see hour_of_day), got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _shares_entry(shares: np.ndarray, missing: float, count: int) -> dict:
    return {"shares": [float(s) for s in shares], "missing_share": missing, "count": count}


def build_entry(values: Iterable[Any] | np.ndarray, bins: int = DEFAULT_BINS,
                hours: Iterable[Any] | np.ndarray | None = None) -> dict:
    """The reference entry of one column: quantile edges and the share of values per bin.

    With `hours` (the UTC hour of day, 0-23, of each value; other numbers mean unknown and count in
    the global shares only) the entry also holds `by_hour`: the shares of each hour that has rows,
    in the same bins (module doc).
    """
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    values = _as_float(values)
    finite = values[np.isfinite(values)]
    # "lower": edges are values that occur, so a discrete column's bins fall between its values
    quantiles = np.linspace(0, 1, bins + 1)[1:-1]
    edges = np.unique(np.quantile(finite, quantiles, method="lower")) if finite.size else np.zeros(0)
    entry = {"edges": [float(e) for e in edges], **_shares_entry(*bin_shares(edges, values))}
    if hours is not None:
        hours = _as_hours(hours, len(values))
        entry["by_hour"] = {str(h): _shares_entry(*bin_shares(edges, values[hours == h]))
                            for h in range(HOURS) if np.any(hours == h)}
    return entry


def build_reference(columns: Mapping[str, Iterable[Any] | np.ndarray], bins: int = DEFAULT_BINS,
                    hours: Iterable[Any] | np.ndarray | None = None) -> dict:
    """{column name: entry} for each column of training data (entries as in the module doc).

    `hours`: the UTC hour of day of each row, shared by every column (the columns are one table).
    """
    return {name: build_entry(values, bins, hours) for name, values in columns.items()}


def expected_shares(reference_entry: Mapping[str, Any], hours: Iterable[Any] | np.ndarray | None = None,
                    min_hour_count: int = MIN_HOUR_COUNT) -> np.ndarray:
    """The reference shares a live window is compared with: its bins, then the missing-value bin.

    Without `hours`, or for an entry without `by_hour`, the global training shares. Otherwise the
    training distribution of the hours the window covers, a mixture weighted by the window's hours:

        e_i = sum over hours h of (n_h / n) * e_i(h)

    where n_h is the number of window values at hour h (n = all of them), e_i(h) the reference
    share of bin i among the training rows of hour h, and e_i(h) = e_i (the global share) for an
    hour with fewer than `min_hour_count` training rows, and for values of an unknown hour (-1).
    """
    global_shares = np.append(np.asarray(reference_entry["shares"], dtype=np.float64),
                              float(reference_entry.get("missing_share", 0.0)))
    by_hour = reference_entry.get("by_hour")
    if hours is None or not by_hour:
        return global_shares
    hours = np.asarray(hours).ravel().astype(np.int64)
    if len(hours) == 0:
        return global_shares
    counts = np.bincount(hours[(hours >= 0) & (hours < HOURS)], minlength=HOURS)
    expected = np.zeros_like(global_shares)
    for hour, n_h in enumerate(counts):
        if n_h == 0:
            continue
        ref = by_hour.get(str(hour))
        if ref is None or ref.get("count", 0) < min_hour_count:
            expected += n_h * global_shares
        else:
            expected += n_h * np.append(np.asarray(ref["shares"], dtype=np.float64), float(ref["missing_share"]))
    expected += (len(hours) - counts.sum()) * global_shares  # unknown hours
    return expected / len(hours)


def psi(reference_entry: Mapping[str, Any], values: Iterable[Any] | np.ndarray,
        hours: Iterable[Any] | np.ndarray | None = None, epsilon: float = EPSILON,
        min_hour_count: int = MIN_HOUR_COUNT) -> float:
    """Population stability index of `values` against a reference entry.

    PSI = sum over bins i (including the missing-value bin) of (a_i - e_i) * ln(a_i / e_i),
    where a_i is the share of `values` in bin i and e_i the reference (training) share of it,
    both floored at `epsilon` (1e-4) so an empty bin counts as a rare one, not as infinity.
    With `hours` (the UTC hour of day of each value) and an entry that has `by_hour`, e_i is
    the mixture of the hourly training shares weighted by the hours of `values`:
    e_i = sum_h (n_h / n) * e_i(h) (`expected_shares`), the training distribution of the hours
    the window covers; otherwise e_i is the global training share.
    0 means the same distribution; by the usual rule of thumb < 0.1 is stable, 0.1-0.25 a
    moderate shift, > 0.25 a significant one. NaN when `values` is empty.
    """
    values = _as_float(values)
    actual, actual_missing, n = bin_shares(reference_entry["edges"], values)
    if n == 0:
        return math.nan
    if hours is not None:
        hours = _as_hours(hours, n)
    expected = np.maximum(expected_shares(reference_entry, hours, min_hour_count), epsilon)
    actual = np.maximum(np.append(actual, actual_missing), epsilon)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def write_reference(directory: Path, features: Mapping[str, Any], predictions: Mapping[str, Any],
                    bins: int = DEFAULT_BINS, hours: Mapping[str, Any] | None = None, **extra: Any) -> Path:
    """Write `<directory>/reference.json` from training columns (features) and predictions.

    `hours`: optionally {"features": ..., "predictions": ...}, the UTC hour of day of each row of
    that table (either may be left out); its entries then carry `by_hour` shares (module doc).
    """
    hours = dict(hours or {})
    unknown = set(hours) - {"features", "predictions"}
    if unknown:
        raise ValueError(f"hours takes the keys 'features' and 'predictions', not {sorted(unknown)}")
    reference = {"bins": bins, "features": build_reference(features, bins, hours.get("features")),
                 "predictions": build_reference(predictions, bins, hours.get("predictions")), **extra}
    path = Path(directory) / REFERENCE_FILE
    path.write_text(json.dumps(reference, indent=1))
    return path


def load_reference(directory: Path) -> dict | None:
    """The reference of a model artifact directory; None when it has none (trained before references)."""
    path = Path(directory) / REFERENCE_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


class Artifacts:
    """The manifests and references of one model's versions: `<artifacts>/<model>/<version>/`.

    The monitor finds a version by the `model_version` the prediction log names (there is no
    "current" version: serving pins versions through the registry, and a shadow or canary serves
    two at once). What was found is cached; a version not found is looked for again after RETRY_S.
    """

    RETRY_S = 60.0  # a version not found is looked for again after this long

    def __init__(self, root: Path):
        """`root`: the model's folder in the artifact root, e.g. artifacts/eta."""
        self.root = Path(root)
        self._found: dict[str, tuple[dict | None, dict | None]] = {}
        self._missing: dict[str, float] = {}

    def versions(self) -> list[str]:
        """The versions with a manifest here, oldest first (version names start with their UTC time)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "manifest.json").is_file())

    def manifest(self, version: str) -> dict | None:
        """The manifest of a version as a dict; None when that version is not here."""
        return self._load(version)[0]

    def reference(self, version: str) -> dict | None:
        """reference.json of a version; None when it has none."""
        return self._load(version)[1]

    def _load(self, version: str) -> tuple[dict | None, dict | None]:
        if version in self._found:
            return self._found[version]
        if time.monotonic() - self._missing.get(version, -self.RETRY_S) < self.RETRY_S:
            return None, None
        directory = self.root / version
        manifest = self._manifest(directory) if "/" not in version and version not in ("", ".", "..") else None
        if manifest is None:
            self._missing[version] = time.monotonic()
            return None, None
        self._found[version] = (manifest, load_reference(directory))
        return self._found[version]

    @staticmethod
    def _manifest(directory: Path) -> dict | None:
        path = Path(directory) / "manifest.json"
        return json.loads(path.read_text()) if path.exists() else None

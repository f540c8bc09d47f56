"""Open, apply and materialize Courier's feature store from Python or the command line.

    python -m feature_repo.store apply
    python -m feature_repo.store materialize            # up to the simulation's end
    python -m feature_repo.store --online redis apply   # the same repo on Redis (COURIER_REDIS)
    python -m feature_repo.store materialize --if-applied   # nothing to do (exit 0) before the first apply

apply and materialize both write the registry file; each holds an exclusive lock beside it while it
does, so a scheduled materialize and a bootstrap on the same volume take turns instead of racing.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import importlib.util
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import yaml
from feast import FeatureStore
from feast.repo_config import RepoConfig

REPO = Path(__file__).resolve().parent
STORE_FILES = {"sqlite": "feature_store.yaml", "redis": "feature_store.redis.yaml"}


def open_store(
    online: str = "sqlite",
    data_dir: Path | None = None,
    redis: str | None = None,
    project: str | None = None,
) -> FeatureStore:
    """The feature store with the chosen online store ("sqlite" locally, "redis" on Kubernetes).

    By default it is exactly what the repository's YAML says. `data_dir` moves the registry and
    the SQLite file under `<data_dir>/feast`, `redis` (host:port) picks the Redis server, and
    `project` renames the project (tests use that to stay apart from a user's own keys).
    """
    if online not in STORE_FILES:
        raise ValueError(f"online store must be one of {sorted(STORE_FILES)}, got {online!r}")
    os.environ.setdefault("COURIER_REDIS", "127.0.0.1:6379")
    raw = yaml.safe_load(os.path.expandvars((REPO / STORE_FILES[online]).read_text()))
    raw["registry"] = str((REPO / raw["registry"]).resolve())  # YAML paths are relative to this folder
    if online == "sqlite":
        raw["online_store"]["path"] = str((REPO / raw["online_store"]["path"]).resolve())
    if data_dir is not None:
        raw["registry"] = str(Path(data_dir) / "feast" / "registry.db")
        if online == "sqlite":
            raw["online_store"]["path"] = str(Path(data_dir) / "feast" / "online.db")
    if redis is not None and online == "redis":
        raw["online_store"]["connection_string"] = redis
    if project is not None:
        raw["project"] = project
    config = RepoConfig(**raw)
    config.repo_path = REPO
    return FeatureStore(config=config)


def definitions(data_dir: Path | None = None) -> list:
    """Every Feast object of the repository, with sources under `<data_dir>/offline` when given.

    Another data dir gets a private copy of definitions.py (evaluated with COURIER_DATA_DIR
    set), so the shared module keeps pointing where everybody else expects.
    """
    if data_dir is None:
        return importlib.import_module("feature_repo.definitions").ALL
    data_dir = Path(data_dir).resolve()
    spec = importlib.util.spec_from_file_location(f"_courier_definitions_{abs(hash(str(data_dir)))}",
                                                  REPO / "definitions.py")
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.get("COURIER_DATA_DIR")
    os.environ["COURIER_DATA_DIR"] = str(data_dir)
    try:
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["COURIER_DATA_DIR"]
        else:
            os.environ["COURIER_DATA_DIR"] = previous
    return module.ALL


def apply(store: FeatureStore, data_dir: Path | None = None) -> None:
    """Register every definition (what `feast apply` does, without scanning the folder)."""
    store.apply(definitions(data_dir))


def simulation_window(data_dir: Path) -> tuple[datetime, datetime]:
    """(first, last) timestamp the simulator wrote, from its summary file."""
    summary_file = data_dir / "offline" / "simulation.json"
    if not summary_file.exists():
        raise FileNotFoundError(f"{summary_file} is missing: run `make data` first")
    summary = json.loads(summary_file.read_text())
    return datetime.fromisoformat(summary["warmup_start"]), datetime.fromisoformat(summary["end"])


def materialize(store: FeatureStore, end: datetime, start: datetime | None = None) -> None:
    """Load the latest feature values at or before `end` into the online store."""
    start = start or end - timedelta(days=60)
    store.materialize(start_date=start, end_date=end)


def registry_path(store: FeatureStore) -> Path:
    """The registry file of a store opened by `open_store` (a local path, on the shared volume in a cluster)."""
    return Path(store.config.registry.path)


@contextmanager
def registry_lock(store: FeatureStore) -> Iterator[None]:
    """Hold an exclusive lock (flock on registry.lock beside the registry) for as long as the block writes it."""
    lock_file = registry_path(store).with_name("registry.lock")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {lock_file}: another apply or materialize is writing the registry", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    from feature_repo.definitions import DATA_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--online", choices=sorted(STORE_FILES), default="sqlite")
    parser.add_argument("command", choices=["apply", "materialize"])
    parser.add_argument("--if-applied", action="store_true",
                        help="materialize: exit 0 without doing anything when nothing was applied yet")
    args = parser.parse_args(argv)
    store = open_store(args.online, data_dir=DATA_DIR)  # registry follows COURIER_DATA_DIR, like the sources
    if args.command == "materialize" and args.if_applied and not registry_path(store).exists():
        print(f"{registry_path(store)} does not exist yet: nothing to materialize before the first apply")
        return
    with registry_lock(store):
        if args.command == "apply":
            apply(store)
            print(f"applied feature repository ({args.online} online store)")
        else:
            first, end = simulation_window(DATA_DIR)
            materialize(store, end, start=first - timedelta(days=2))
            print(f"materialized up to {end.isoformat()} ({args.online} online store)")


if __name__ == "__main__":
    main()

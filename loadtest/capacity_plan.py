"""A capacity plan: measured costs per request and per entity, turned into cores, replicas and Redis.

    python -m loadtest.capacity_plan --users 10000000 --restaurants 200000 --peak-rps 20000
    python -m loadtest.capacity_plan measure          # re-measure the inputs on this machine

The plan is arithmetic on measured inputs, printed with its assumptions:

- server CPU per request of `/v1/eta` and `/v1/feed` (`measure`: Courier as shipped, open loop at a
  moderate rate, every process of the server summed, the load generator not counted);
- Redis bytes per user, restaurant and area (`measure`: the city materialized into a throwaway
  Feast project in Redis, `MEMORY USAGE` of every key, grouped by entity);
- planning factors (target CPU utilization, Redis overhead and replicas, the memory and operations
  one Redis shard takes) from `capacity_plan` in loadtest/config.yaml.

`measure` writes reports/capacity/measured.json, which the plan prefers over the committed numbers
in loadtest/config.yaml (where the last measurement is recorded with its date and machine).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.config import load_config
from loadtest.report import REPORTS, machine

MEASURED = REPORTS / "capacity" / "measured.json"
ENTITIES = ("user", "restaurant", "area")  # Feast entity names (feature_repo/definitions.py)


@dataclass(frozen=True)
class Inputs:
    """What one request costs the server and what one entity costs Redis, and how hard to run them."""

    cpu_ms: dict[str, dict[str, float]]  # server CPU ms per request, {endpoint: {process role: ms}}
    background_cores_per_node: float  # Ray's daemons, the Serve controller, the proxy actor: per node, not per request
    bytes_per_entity: dict[str, float]  # Redis bytes per user_id / restaurant_id / area_id, all its views
    redis_reads_per_eta: float   # entity rows read from Redis per request
    redis_reads_per_feed: float
    target_utilization: float    # share of each core the plan may use at peak (headroom for bursts)
    cores_per_replica: float     # a replica is one Python process (one event loop): about one core at most
    min_replicas: int            # of every deployment, whatever the load: a killed replica is not an outage
    redis_overhead: float        # fragmentation, buffers, the replication backlog: x this
    redis_replicas: int          # copies of each shard (1 primary + replicas)
    redis_shard_gib: float       # memory one shard may hold
    redis_shard_reads_per_s: float  # entity reads (pipelined HGETALLs) one shard serves at peak
    source: str                  # where the measured numbers come from

    @classmethod
    def load(cls, config: dict[str, Any] | None = None, measured: Path = MEASURED) -> Inputs:
        """The committed inputs (loadtest/config.yaml), with a newer measurement's numbers when there is one."""
        section = dict((config or load_config())["capacity_plan"])
        if measured.exists():
            section.update(json.loads(measured.read_text())["inputs"])
        return cls(**{field: section[field] for field in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Demand:
    """The marketplace to plan for."""

    users: int
    restaurants: int
    areas: int
    peak_rps: float
    feed_share: float  # of the requests at peak, the share that are feeds (the app's mix: ~0.22)

    def __post_init__(self) -> None:
        for name in ("users", "restaurants", "areas", "peak_rps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.feed_share <= 1:
            raise ValueError(f"--feed-share must be within 0..1, got {self.feed_share}")


def feed_settings() -> tuple[float, int]:
    """(feature_cache_s, candidates) of the serve config's feed: how long Ranker and EtaModel replicas reuse a
    restaurant's feature row, and how many restaurants one feed ranks."""
    from serving.config import load_serve_config

    courier = next(a for a in load_serve_config()["applications"] if a["name"] == "courier")
    feed = courier["args"]["feed"]
    return float(feed["feature_cache_s"]), int(feed["candidates"])


def plan(demand: Demand, inputs: Inputs) -> dict[str, Any]:
    """Cores, replicas per deployment, Redis memory, shards and reads for `demand`, from `inputs`."""
    rates = {"feed": demand.peak_rps * demand.feed_share}
    rates["eta"] = demand.peak_rps - rates["feed"]
    busy: dict[str, float] = defaultdict(float)  # cores busy at peak, per process role
    for endpoint, rate in rates.items():
        for role, ms in inputs.cpu_ms[endpoint].items():
            busy[role] += rate * ms / 1000.0
    cpu_cores = sum(busy.values())
    replicas = {role.removeprefix("replica "): max(math.ceil(cores / inputs.target_utilization
                                                              / inputs.cores_per_replica), inputs.min_replicas)
                for role, cores in sorted(busy.items()) if role.startswith("replica ")}
    counts = {"user": demand.users, "restaurant": demand.restaurants, "area": demand.areas}
    data_bytes = sum(counts[e] * inputs.bytes_per_entity.get(e, 0.0) for e in ENTITIES)
    shard_bytes = inputs.redis_shard_gib * 2**30
    memory_bytes = data_bytes * inputs.redis_overhead
    # Each Ranker and EtaModel replica re-reads a restaurant row it uses once per feature_cache_s: at most every
    # restaurant, at most its feeds' candidates in that time (as if all were distinct: an upper bound)
    cache_s, candidates = feed_settings()
    refresh = 0.0
    for deployment in ("Ranker", "EtaModel"):
        n = replicas.get(deployment, 1)
        rows = min(demand.restaurants, rates["feed"] / n * candidates * cache_s)
        refresh += n * rows / cache_s
    reads = rates["eta"] * inputs.redis_reads_per_eta + rates["feed"] * inputs.redis_reads_per_feed + refresh
    by_memory, by_reads = memory_bytes / shard_bytes, reads / inputs.redis_shard_reads_per_s
    shards = max(math.ceil(by_memory), math.ceil(by_reads), 1)
    return {
        "feeds_per_s": round(rates["feed"], 1), "etas_per_s": round(rates["eta"], 1),
        "server_cpu_cores_busy": round(cpu_cores, 1),
        "server_cores": math.ceil(cpu_cores / inputs.target_utilization),  # plus background_cores_per_node per node
        "cores_busy_by_role": {role: round(cores, 2) for role, cores in sorted(busy.items())},
        "replicas": replicas,
        "redis_data_gib": round(data_bytes / 2**30, 2),
        "redis_memory_gib_per_copy": round(memory_bytes / 2**30, 2),
        "redis_reads_per_s": round(reads), "redis_cache_refresh_reads_per_s": round(refresh),
        "redis_shards": shards,
        "redis_nodes": shards * inputs.redis_replicas,
        "bound_by": "memory" if by_memory >= by_reads else "reads",
    }


def report(demand: Demand, inputs: Inputs, result: dict[str, Any]) -> str:
    """The plan as text, assumptions first."""
    per_entity = ", ".join(f"{e} {inputs.bytes_per_entity.get(e, 0):.0f} B" for e in ENTITIES)
    cache_s, candidates = feed_settings()
    lines = [
        (f"Capacity plan for {demand.users:,} users, {demand.restaurants:,} restaurants, {demand.areas:,} areas, "
        f"{demand.peak_rps:,.0f} req/s at peak ({demand.feed_share:.0%} feeds)"),
        "",
        f"Assumptions (measured: {inputs.source}):",
        (f"  server CPU per request: /v1/eta {sum(inputs.cpu_ms['eta'].values()):.2f} ms, "
        f"/v1/feed {sum(inputs.cpu_ms['feed'].values()):.2f} ms (replicas, HAProxy, the prediction log's Redis; "
        "not the load generator)"),
        f"  Redis per entity (all its feature views, MEMORY USAGE): {per_entity}",
        (f"  Redis entity reads per request: /v1/eta {inputs.redis_reads_per_eta:g}, "
        f"/v1/feed {inputs.redis_reads_per_feed:g}, plus each Ranker and EtaModel replica re-reading the "
        f"restaurants it ranks each {cache_s:g} s (its feature cache; {candidates} per feed, "
        "counted as distinct)"),
        (f"  cores used at most {inputs.target_utilization:.0%} at peak; a replica uses at most "
        f"{inputs.cores_per_replica:g} core"),
        (f"  Redis memory x{inputs.redis_overhead:g} (fragmentation, buffers), {inputs.redis_replicas} copies of each "
        f"shard, a shard holds {inputs.redis_shard_gib:g} GiB and serves {inputs.redis_shard_reads_per_s:,.0f} "
        "reads/s"),
        ("  not included: the load balancer, Ray's head, the monitor, training; cores of the measuring machine "
        "(scale the CPU figures by your cores' speed)"),
        "",
        "Plan:",
        (f"  {result['etas_per_s']:,.0f} ETA checks/s and {result['feeds_per_s']:,.0f} feeds/s keep "
        f"{result['server_cpu_cores_busy']:,.1f} cores busy: {result['server_cores']:,} serving cores, plus "
        f"{inputs.background_cores_per_node:g} core per Ray node for Ray's own processes"),
        "  replicas: " + ", ".join(f"{name} {n:,}" for name, n in result["replicas"].items()),
        "  cores busy by process: " + ", ".join(f"{role} {c:,}" for role, c in result["cores_busy_by_role"].items()),
        (f"  Redis: {result['redis_data_gib']:,} GiB of features, {result['redis_memory_gib_per_copy']:,} GiB per copy, "
        f"{result['redis_reads_per_s']:,} entity reads/s (of which {result['redis_cache_refresh_reads_per_s']:,} "
        f"feature-cache refreshes): {result['redis_shards']} shard(s), "
        f"{result['redis_nodes']} Redis nodes (bound by {result['bound_by']})"),
    ]
    return "\n".join(lines)


# -- measuring the inputs -------------------------------------------------------------------------


def redis_bytes_per_entity(data_dir: Path, redis: str = "127.0.0.1:6379") -> dict[str, Any]:
    """Materialize `data_dir`'s city into a throwaway Feast project in Redis; bytes per entity key.

    Every key of the project is measured (`MEMORY USAGE ... SAMPLES 0`) and grouped by the entity its
    feature views are keyed by; the project is torn down afterwards.
    """
    import redis as redis_client

    from feature_repo.connection import redis_options
    from feature_repo.store import apply, materialize, open_store, simulation_window

    project = f"capacity_{uuid.uuid4().hex[:8]}"
    registry = Path(tempfile.mkdtemp(prefix="courier-capacity-"))  # never the city's own registry: teardown wipes it
    store = open_store("redis", data_dir=registry, redis=redis, project=project)
    apply(store, data_dir=data_dir)
    try:
        started = time.monotonic()
        materialize(store, simulation_window(data_dir)[1])
        materialize_s = time.monotonic() - started
        entity_of = {view.name: tuple(view.entities) for view in store.list_feature_views()}
        client = redis_client.Redis(**redis_options(redis))
        sizes: dict[str, list[int]] = defaultdict(list)
        suffix = project.encode()
        for key in client.scan_iter(match=b"*" + suffix, count=1000):
            views = [f[4:].decode() for f in client.hkeys(key) if f.startswith(b"_ts:")]
            entities = {entity for view in views for entity in entity_of.get(view, ())}
            name = "+".join(sorted(entities)) or "unknown"
            sizes[name].append(int(client.memory_usage(key, samples=0) or 0))
    finally:
        store.teardown()
        shutil.rmtree(registry, ignore_errors=True)
    return {"project": project, "bytes_per_entity": {name: round(sum(v) / len(v), 1) for name, v in sizes.items()},
            "keys": {name: len(v) for name, v in sizes.items()}, "materialize_s": round(materialize_s, 2)}


# Processes whose CPU is spent per second, not per request (at 15-40 req/s they would look expensive per request)
BACKGROUND = ("ray daemons", "serve controller", "ray worker/agent", "server main process", "proxy")


def _server_roles(profile: dict[str, Any]) -> dict[str, float]:
    """CPU ms per request of each server process that works per request (replicas, HAProxy, Redis)."""
    return {role: ms for role, ms in profile["ms_per_request"].items()
            if role != "load generator" and role not in BACKGROUND and ms > 0}


def _background_cores(profile: dict[str, Any]) -> float:
    """Cores the per-second processes (Ray's daemons, the Serve controller...) kept busy during the run."""
    return sum(ms for role, ms in profile["ms_per_request"].items() if role in BACKGROUND) * profile["rate"] / 1000


def measure(data_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Both kinds of input on this machine: Redis bytes per entity, then server CPU per request."""
    from loadtest.__main__ import courier
    from loadtest.bench import cpu_profile
    from loadtest.traffic import city_from_config

    redis = redis_bytes_per_entity(data_dir)
    print(f"Redis: {redis}", flush=True)
    city = city_from_config(config["traffic"])
    with courier(config, None, "capacity-plan") as (_, svc):
        eta = cpu_profile(svc, city, ["eta"], rate=40, seed=1)
        feed = cpu_profile(svc, city, ["feed"], rate=15, seed=2)
    print(f"CPU per request: /v1/eta {eta['server_ms_per_request']} ms, /v1/feed {feed['server_ms_per_request']} ms",
          flush=True)
    inputs = {"cpu_ms": {"eta": _server_roles(eta), "feed": _server_roles(feed)},
              "background_cores_per_node": round(max(_background_cores(eta), _background_cores(feed)), 2),
              "bytes_per_entity": {e: redis["bytes_per_entity"][e] for e in ENTITIES if e in redis["bytes_per_entity"]},
              "source": f"`python -m loadtest.capacity_plan measure`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
                        f" on {machine().get('cpu', 'this machine')}"}
    return {"inputs": inputs, "redis": redis, "eta": eta, "feed": feed, "machine": machine()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=["plan", "measure"], default="plan")
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--restaurants", type=int, default=20_000)
    parser.add_argument("--areas", type=int, default=None, help="delivery areas (default: one per 50 restaurants)")
    parser.add_argument("--peak-rps", type=float, default=2_000, help="requests per second at the busiest minute")
    parser.add_argument("--feed-share", type=float, default=0.22, help="share of the requests that are feeds")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="`measure`: the city to materialize")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--quiet-wait", type=float, default=None,
                        help="`measure`: seconds to wait for a quiet machine (default: loadtest/config.yaml)")
    args = parser.parse_args(argv)
    config = load_config()
    if args.quiet_wait is not None:
        config["quiet"] = {**(config.get("quiet") or {}), "max_wait_s": args.quiet_wait}
    if args.command == "measure":
        result = measure(args.data_dir, config)
        MEASURED.parent.mkdir(parents=True, exist_ok=True)
        MEASURED.write_text(json.dumps(result, indent=2))
        print(f"wrote {MEASURED}; record `inputs` in loadtest/config.yaml `capacity_plan` to commit them")
        return 0
    try:
        demand = Demand(args.users, args.restaurants, args.areas or max(args.restaurants // 50, 1), args.peak_rps,
                        args.feed_share)
    except ValueError as exc:
        parser.error(str(exc))
    inputs = Inputs.load(config)
    result = plan(demand, inputs)
    print(json.dumps({"demand": asdict(demand), "inputs": asdict(inputs), "plan": result}, indent=2) if args.json
          else report(demand, inputs, result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

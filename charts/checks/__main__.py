"""Check the chart as a cluster would: KubeRay's validation, the model slots, KServe's runtime choice, and the fit.

    python -m charts.checks                       # every documented cluster with its values
    python -m charts.checks --cluster kind -f my-values.yaml --set-json 'ray.worker.replicas=3'
    python -m charts.checks --chart /path/to/an/older/charts/courier

Renders the chart with the real helm, prints the scheduler's arithmetic for each phase, and exits 1
when KubeRay would refuse the RayService, a model slot of its serve config would be refused (or the two
ETA slots differ), a SQLite registry has more than one writer, KServe would pick another runtime than
the one named, or a phase does not fit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from charts.checks import fit, kserve, kuberay, rollout
from charts.checks.render import CHART, RenderError, render


def check_cluster(cluster: fit.Cluster, values: list[str], sets: list[str], chart: str = str(CHART)) -> list[str]:
    """Print the checks for one cluster; return the problems found."""
    files = tuple(str(Path(chart) / Path(v).name) for v in cluster.values) + tuple(values)
    try:
        objects = render(files, tuple(sets), chart=chart)
    except RenderError as exc:
        return [f"helm template failed: {exc}"]
    problems = []
    for rayservice in fit.find_kind(objects, "RayService"):
        for rule, message in kuberay.violations(rayservice):
            problems.append(f"KubeRay would refuse RayService {rayservice['metadata']['name']} ({rule.source}): {message}")
        serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
        for message in rollout.slot_violations(serve_config):
            problems.append(f"Ray Serve would refuse the model versions of {rayservice['metadata']['name']}: {message}")
        for where in rollout.aliased(serve_config):
            print(f"Models: {where}, an alias each replica resolves when it starts; pin an artifact version for a "
                  "rollout (--set serving.models.<model>.version=...)")
        low, high, advertised = fit.ray_cpu_slots(rayservice, serve_config)
        print(f"Ray CPUs: the serve config needs {low:g} at min_replicas and {high:g} at max_replicas; "
              f"the workers at minReplicas advertise {advertised:g}")
        if low > advertised:
            problems.append(f"Serve replicas need {low:g} CPUs at min_replicas, the workers advertise {advertised:g}")
    problems += list(rollout.registry_violations(objects))
    for isvc in fit.find_kind(objects, "InferenceService"):
        fmt, protocol, named = kserve.model_spec(isvc)
        chosen = kserve.select_runtime(isvc)
        print(f"KServe: {fmt} over {protocol} runs on {chosen or 'no runtime'} (named: {named or 'none'})")
        known = {r.name for r in kserve.KSERVE_RUNTIMES}
        if not named:
            problems.append(f"InferenceService {isvc['metadata']['name']}: no runtime named, KServe picks {chosen}")
        elif named in known and chosen != named:
            problems.append(f"InferenceService {isvc['metadata']['name']}: {named} does not serve {fmt} over {protocol}")
    for placement in fit.check(objects, cluster):
        print(placement.report())
        problems += [f"{cluster.name}, {placement.phase}: {pod.name} does not fit" for pod in placement.unplaced]
    return problems


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; 0 when every check passes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    clusters = fit.load_clusters()
    parser.add_argument("--cluster", choices=sorted(clusters) + ["all"], default="all")
    parser.add_argument("-f", "--values", action="append", default=[], help="extra values file (repeatable)")
    parser.add_argument("--set-json", action="append", default=[], dest="sets", help="helm --set-json item")
    parser.add_argument("--chart", default=str(CHART), help="another copy of the chart (e.g. an older release)")
    args = parser.parse_args(argv)
    names = sorted(clusters) if args.cluster == "all" else [args.cluster]
    problems = []
    for name in names:
        problems += check_cluster(clusters[name], args.values, args.sets, args.chart)
        print()
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    print("all checks passed" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

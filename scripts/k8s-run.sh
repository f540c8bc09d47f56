#!/usr/bin/env bash
# Run the in-cluster load test or chaos drill and wait for its verdict.
#
#   scripts/k8s-run.sh loadtest     # the open-loop SLO gate, or Locust master + workers (make k8s-loadtest)
#   scripts/k8s-run.sh chaos        # the chaos drill, which brings its own load (make k8s-chaos)
#
# It turns the chart's toggle on (and the other one off) with `helm upgrade --reuse-values`, after
# deleting the Jobs of a previous run so they start afresh; then it waits for the verdict Job,
# prints its logs, and exits non-zero when it failed. LOADTEST_ARGS adds --set flags
# ("--set loadtest.scenario=step", "--set loadtest.engine=locust").
# shellcheck source=scripts/k8s-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/k8s-common.sh"

need_context
what=${1:-}
case $what in
  loadtest) verdict="locust-master,loadtest-openloop"; sets=(--set loadtest.enabled=true --set chaos.enabled=false) ;;
  chaos) verdict="chaos"; sets=(--set chaos.enabled=true --set loadtest.enabled=false) ;;
  *) die "usage: $0 loadtest|chaos" ;;
esac
selector="app.kubernetes.io/instance=$RELEASE"

say "removing the Jobs of a previous run"
kubectl -n "$NAMESPACE" delete job -l "$selector,app.kubernetes.io/component in (locust-master,locust-worker,loadtest-openloop,chaos)" \
  --ignore-not-found --wait=true

say "helm upgrade $RELEASE: ${sets[*]} ${LOADTEST_ARGS:-}"
# shellcheck disable=SC2086
helm upgrade "$RELEASE" "$CHART" --namespace "$NAMESPACE" --reuse-values "${sets[@]}" ${LOADTEST_ARGS:-}

# Poll the verdict Job (one of the given components) until it completes or fails; print its logs
# either way. Returns 0 on success.
wait_job() {
  local component=$1 deadline=$((SECONDS + ${RUN_TIMEOUT:-3600})) job succeeded failed
  while ((SECONDS < deadline)); do
    job=$(kubectl -n "$NAMESPACE" get job -l "$selector,app.kubernetes.io/component in ($component)" -o name | head -1)
    if [[ -n $job ]]; then
      succeeded=$(kubectl -n "$NAMESPACE" get "$job" -o jsonpath='{.status.succeeded}')
      failed=$(kubectl -n "$NAMESPACE" get "$job" -o jsonpath='{.status.failed}')
      if [[ ${succeeded:-0} -ge 1 || ${failed:-0} -ge 1 ]]; then
        say "logs of $job"
        kubectl -n "$NAMESPACE" logs "$job" --tail=-1 || true
        [[ ${succeeded:-0} -ge 1 ]] && { say "$component: passed"; return 0; }
        say "$component: FAILED"; return 1
      fi
    fi
    sleep 10
  done
  say "$component: no verdict within ${RUN_TIMEOUT:-3600} s"; return 1
}

say "waiting for the verdict ($verdict)"
wait_job "$verdict"

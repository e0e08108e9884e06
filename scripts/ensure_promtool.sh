#!/usr/bin/env bash
# The alert rule tests (tests/ops) run promtool; install Debian's package (it ships /usr/bin/promtool) when it is
# missing and we can.
set -u
command -v promtool >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[make] installing promtool for the alert rule tests (apt-get install prometheus)" >&2
  (apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; }) && exit 0
fi
echo "[make] promtool is missing and could not be installed; the alert rule tests will fail (apt-get install prometheus)" >&2
exit 0

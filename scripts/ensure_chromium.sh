#!/usr/bin/env bash
# The playground test drives headless Chromium; install Debian's package when it is missing and we can.
set -u
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[make] installing chromium for the playground test (apt-get)" >&2
  (apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; }) && exit 0
fi
echo "[make] chromium is missing and could not be installed; the playground test will fail (apt-get install chromium)" >&2
exit 0

#!/bin/sh
# Starts SeaweedFS (`weed server ...`, the arguments of this script) with facegen's two S3 identities, written to a
# private temporary file (mode 0600 under TMPDIR, default /tmp: memory or scratch, not the data volume) and passed as
# -s3.config. Used by docker-compose.yml (profile s3), k8s/overlays/s3/seaweedfs.yaml and, as is, by the tests'
# SeaweedFS (scripts/s3ctl.py).
#
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   facegen-worker: reads, writes and deletes objects, creates the
#                                              bucket and sets its lifecycle rule (the worker, the bucket job)
#   S3_API_ACCESS_KEY_ID, S3_API_SECRET_ACCESS_KEY
#                                              facegen-api: reads objects and the bucket and lists keys (the
#                                              artifact routes, the model store's versions and aliases), writes
#                                              and deletes nothing (the API)
#
# Keys are letters, digits and + / = _ . - (openssl rand -hex 20 or -base64 30 make one): they go into JSON unquoted.
set -eu

fail() {
  echo "seaweedfs-start.sh: $*" >&2
  exit 2
}

check() {  # name, value
  [ -n "$2" ] || fail "set $1 (docs/DEPLOYMENT.md#artifacts-in-s3)"
  case "$2" in
    *[!A-Za-z0-9+/=_.-]*) fail "$1 may hold only letters, digits and + / = _ . -" ;;
  esac
}

check AWS_ACCESS_KEY_ID "${AWS_ACCESS_KEY_ID:-}"
check AWS_SECRET_ACCESS_KEY "${AWS_SECRET_ACCESS_KEY:-}"
check S3_API_ACCESS_KEY_ID "${S3_API_ACCESS_KEY_ID:-}"
check S3_API_SECRET_ACCESS_KEY "${S3_API_SECRET_ACCESS_KEY:-}"
[ "$S3_API_ACCESS_KEY_ID" != "$AWS_ACCESS_KEY_ID" ] || fail "S3_API_ACCESS_KEY_ID must differ from AWS_ACCESS_KEY_ID"

config=$(mktemp)  # 0600
cat >"$config" <<EOF
{"identities": [
  {"name": "facegen-worker",
   "credentials": [{"accessKey": "$AWS_ACCESS_KEY_ID", "secretKey": "$AWS_SECRET_ACCESS_KEY"}],
   "actions": ["Admin", "Read", "List", "Write", "Tagging"]},
  {"name": "facegen-api",
   "credentials": [{"accessKey": "$S3_API_ACCESS_KEY_ID", "secretKey": "$S3_API_SECRET_ACCESS_KEY"}],
   "actions": ["Read", "List"]}
]}
EOF
# The identities are the file's alone: the secrets leave the server's environment.
unset AWS_SECRET_ACCESS_KEY S3_API_SECRET_ACCESS_KEY
exec weed server "$@" -s3.config="$config"

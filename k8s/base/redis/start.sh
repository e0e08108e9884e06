#!/bin/sh
# Starts redis-server with facegen's ACL: users.acl beside this script, with the passwords of the environment put in
# as sha256 hashes, written to REDIS_RUN_DIR (default /run/redis: memory, not the data volume). The arguments are
# redis-server's (--appendonly yes --maxmemory 768mb ...). Used by docker-compose.yml, k8s/base/redis.yaml and the
# overlay redis-sentinel, and run as is by tests/deploy/test_redis_acl.py.
#
#   REDIS_PASSWORD               the password of the user facegen (required)
#   REDIS_PASSWORD_PREVIOUS      also accepted for facegen while a rotation is under way (optional)
#   REDIS_REPLICATION_PASSWORD   the password of the user replication (replicas, Sentinels); without it that user
#                                is off. With it this server also authenticates to its primary as that user.
#   REDIS_ADMIN_PASSWORD         the password of the user admin (every command: operators' redis-cli); without it
#                                that user is off
#
# Passwords are letters, digits and + / = _ . - (openssl rand -hex 24 or -base64 24 make one): they go into a
# configuration file unquoted.
set -eu
here=$(dirname "$0")
run_dir=${REDIS_RUN_DIR:-/run/redis}

fail() {
  echo "redis start.sh: $*" >&2
  exit 2
}

check() {  # name, value
  case "$2" in
    *[!A-Za-z0-9+/=_.-]*) fail "$1 may hold only letters, digits and + / = _ . -" ;;
  esac
}

sha256() {
  printf '%s' "$1" | sha256sum | cut -c1-64
}

rules() {  # name of a password variable, its value: the ACL rules that set it ("off" without a password)
  if [ -z "$2" ]; then
    echo "off resetpass"
  else
    check "$1" "$2"
    echo "on #$(sha256 "$2")"
  fi
}

[ -n "${REDIS_PASSWORD:-}" ] || fail "set REDIS_PASSWORD (the password of the Redis user facegen)"
facegen=$(rules REDIS_PASSWORD "$REDIS_PASSWORD")
if [ -n "${REDIS_PASSWORD_PREVIOUS:-}" ]; then
  check REDIS_PASSWORD_PREVIOUS "$REDIS_PASSWORD_PREVIOUS"
  facegen="$facegen #$(sha256 "$REDIS_PASSWORD_PREVIOUS")"
fi
replication=$(rules REDIS_REPLICATION_PASSWORD "${REDIS_REPLICATION_PASSWORD:-}")
admin=$(rules REDIS_ADMIN_PASSWORD "${REDIS_ADMIN_PASSWORD:-}")

umask 077
sed -e '/^#/d' -e "s/@FACEGEN@/$facegen/" -e "s/@REPLICATION@/$replication/" -e "s/@ADMIN@/$admin/" \
  "$here/users.acl" > "$run_dir/users.acl"
{
  echo "aclfile $run_dir/users.acl"
  if [ -n "${REDIS_REPLICATION_PASSWORD:-}" ]; then
    echo "masteruser replication"
    echo "masterauth $REDIS_REPLICATION_PASSWORD"
  fi
} > "$run_dir/redis.conf"
exec redis-server "$run_dir/redis.conf" "$@"

#!/usr/bin/env bash
# test-transfer-once.sh: one storage test transfer, for cron or a systemd timer.
#
# No process stays around between runs, so nothing renews the token in the background.
# Each run first makes sure the token is valid for MONITOR_MIN_VALID more seconds (renewing
# it only when needed), then makes one transfer with test-transfer.sh (same settings, same
# output line, same metrics file).
#
# Two ways to hold the token:
#   1. A prepared token directory ($JOBTOKEN_DIR), made once with `jobtoken prepare`:
#      a job mytoken of its own, restricted to the probe's path, audience and lifetime.
#      Each run calls `jobtoken ensure --dir "$JOBTOKEN_DIR" --min-valid S` (its line, "token
#      valid for N s (renewed)", goes into the probe's log: no -q).
#   2. No token directory: `jobtoken token --min-valid S --out "$BEARER_TOKEN_FILE"`, with
#      the mytoken, scopes and audience from jobtoken.toml's [token] section (or
#      JOBTOKEN_MYTOKEN_FILE, JOBTOKEN_SCOPE, JOBTOKEN_AUDIENCE).
#
# Settings: MONITOR_MIN_VALID (seconds, default 600: longer than a transfer may take), the
# MONITOR_* settings of test-transfer.sh (MONITOR_COUNT and MONITOR_INTERVAL are forced to
# one transfer), JOBTOKEN_BIN (default: jobtoken), JOBTOKEN_METRICS_DIR (with way 2: where
# `jobtoken token` keeps its own metrics; way 1 uses the token directory's metrics_dir).
# Exit status: test-transfer.sh's (0 ok, 1 transfer failed, 2 bad settings), or jobtoken's
# when no token could be had: 75/76 server trouble (the next run retries), 77 the mytoken
# was rejected for good (revoked, expired, usage budget spent: make a new one), 78 config.
#
# Must NOT: print or log a token, or start anything that outlives the run.

set -u
umask 077

bin=${JOBTOKEN_BIN:-jobtoken}
min_valid=${MONITOR_MIN_VALID:-600}
here=$(cd "$(dirname "$0")" && pwd) || exit 2

if [ -n "${JOBTOKEN_DIR:-}" ]; then
    "$bin" ensure --dir "$JOBTOKEN_DIR" --min-valid "$min_valid" || exit $?
    BEARER_TOKEN_FILE="$JOBTOKEN_DIR/bt"
elif [ -n "${BEARER_TOKEN_FILE:-}" ]; then
    "$bin" token --min-valid "$min_valid" --out "$BEARER_TOKEN_FILE" \
        ${JOBTOKEN_METRICS_DIR:+--metrics-dir "$JOBTOKEN_METRICS_DIR"} || exit $?
else
    echo "test-transfer-once.sh: set JOBTOKEN_DIR (a prepared token directory) or" \
        "BEARER_TOKEN_FILE (where 'jobtoken token' keeps the token)" >&2
    exit 2
fi
export BEARER_TOKEN_FILE
unset BEARER_TOKEN # would win over the file in WLCG discovery, and is never renewed
MONITOR_COUNT=1 MONITOR_INTERVAL=0 exec "$here/test-transfer.sh"

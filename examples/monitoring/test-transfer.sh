#!/usr/bin/env bash
# test-transfer.sh: write a small, new test file to grid storage every N seconds, for days.
#
# The storage-monitoring use case: an unattended job that proves, transfer after transfer,
# that a storage endpoint accepts WLCG tokens. Run it under jobtoken, which keeps
# $BEARER_TOKEN_FILE fresh for as long as the script lives:
#
#     jobtoken run --dir "$JOBTOKEN_DIR" -- ./test-transfer.sh
#
# At each transfer the script takes a private copy of the token that is current at that
# moment, reads that copy's expiry (`jobtoken inspect`, never printing the token) and hands
# exactly that copy to the client, so the logged expiry is the expiry of the token the
# storage saw. The token never appears on a command line, except with davix-put, which
# offers no other way (see docs/clients.md).
#
# Settings (environment):
#   MONITOR_DEST      destination directory URL, ending in "/" (required), e.g.
#                     root://se.example.org:1094//dteam/monitoring/probe-1/  or
#                     https://se.example.org:1094/dteam/monitoring/probe-1/
#   MONITOR_CLIENT    xrdcp | curl | gfal-copy | davix-put
#                     (default: xrdcp for root:// URLs, curl otherwise)
#   MONITOR_INTERVAL  seconds from the start of one transfer to the next (default 300)
#   MONITOR_COUNT     how many transfers; 0 means until stopped (default 0)
#   MONITOR_SIZE      bytes per test file (default 4096)
#   MONITOR_TIMEOUT   seconds one transfer may take (default 300)
#   MONITOR_NAME      name used in file names and metric labels (default: short host name)
#   MONITOR_METRICS   Prometheus textfile to rewrite after each transfer (optional); its
#                     counters and last success carry on from the file's previous values
#   JOBTOKEN_BIN      the jobtoken executable (default: jobtoken)
# Trust for the storage's TLS certificate: X509_CERT_DIR (xrdcp, gfal-copy, davix-put),
# CURL_CA_BUNDLE or the system store (curl).
#
# Output: one line per transfer on stdout, for example
#   2024-05-01T12:00:00Z transfer n=3 result=ok rc=0 http=200 duration_s=0.21 bytes=4096
#     client=curl token_jti=7f0c... token_exp=1714564812 token_left_s=812.4 file=probe-...dat
# (one line; wrapped here), and a summary line when it ends:
#   2024-05-01T13:00:00Z summary transfers=12 ok=12 failed=0 interrupted=0 token_expired=0
#     stopped=0
# Exit status: 0 when no transfer failed, 1 when one did, 2 for bad settings.
# TERM or INT (what `jobtoken run` forwards when the batch system stops the job) end the
# script with the summary. A transfer the signal cut short counts as "interrupted", not as
# failed: the signal reaches the client too, and that says nothing about the storage.
#
# Must NOT: print, log or keep a token (the private copy is deleted after each transfer),
# overwrite or delete anything on the storage (a token with storage.create cannot anyway).

set -u
umask 077

die() {
    echo "test-transfer.sh: $*" >&2
    exit 2
}

dest=${MONITOR_DEST:-}
[ -n "$dest" ] || die "set MONITOR_DEST to the destination directory URL (ending in /)"
case $dest in
    */) ;;
    *) dest="$dest/" ;;
esac
case $dest in
    root://* | roots://*) default_client=xrdcp ;;
    https://* | davs://*) default_client=curl ;;
    *) die "MONITOR_DEST must be a root://, roots://, https:// or davs:// URL" ;;
esac
client=${MONITOR_CLIENT:-$default_client}
case $client in
    xrdcp | curl | gfal-copy | davix-put) ;;
    *) die "MONITOR_CLIENT must be xrdcp, curl, gfal-copy or davix-put" ;;
esac
command -v "$client" >/dev/null 2>&1 || die "$client is not installed (PATH=$PATH)"
interval=${MONITOR_INTERVAL:-300}
count=${MONITOR_COUNT:-0}
size=${MONITOR_SIZE:-4096}
timeout_s=${MONITOR_TIMEOUT:-300}
name=${MONITOR_NAME:-$(hostname -s 2>/dev/null || echo probe)}
metrics=${MONITOR_METRICS:-}
bin=${JOBTOKEN_BIN:-jobtoken}
[ -n "${BEARER_TOKEN_FILE:-}" ] || die "BEARER_TOKEN_FILE is not set: run me under 'jobtoken run'"
case $count$size$timeout_s in
    *[!0-9]*) die "MONITOR_COUNT, MONITOR_SIZE and MONITOR_TIMEOUT must be whole numbers" ;;
esac
interval_ns=$(awk -v s="$interval" 'BEGIN { if (s !~ /^[0-9]+(\.[0-9]+)?$/) exit 1;
                                            printf "%.0f", s * 1e9 }') ||
    die "MONITOR_INTERVAL must be a number of seconds"

work=$(mktemp -d "${TMPDIR:-/tmp}/test-transfer.XXXXXX") || die "cannot make a private directory"
trap 'rm -rf "$work"' EXIT
stop=0
trap 'stop=1' TERM INT

n=0
ok=0
failed=0
interrupted=0
expired=0

# The metrics' counters and last success carry on from this probe's previous file: under
# cron each run is a new process with one transfer, and counting from 0 again would hide
# every failure after the first and drop the last success to 0. Only a regular file of
# ours is read back (never through a link); its values are parsed as numbers, nothing else.
total_ok=0
total_failed=0
last_ok_at=0
if [ -n "$metrics" ] && [ -f "$metrics" ] && [ ! -L "$metrics" ] && [ -O "$metrics" ]; then
    read -r total_ok total_failed last_ok_at < <(awk -v name="$name" '
        function sample(metric, labels) { return index($0, metric "{" labels "} ") == 1 }
        sample("storage_test_transfers_total", "name=\"" name "\",result=\"ok\"") { o = $NF }
        sample("storage_test_transfers_total", "name=\"" name "\",result=\"failed\"") { f = $NF }
        sample("storage_test_last_success_timestamp_seconds", "name=\"" name "\"") { t = $NF }
        END { printf "%d %d %d\n", o + 0, f + 0, t + 0 }' "$metrics") ||
        total_ok=0 total_failed=0 last_ok_at=0
fi

stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }

# Value of one top-level key in `jobtoken inspect --json` output (sorted, indented JSON).
json_value() {
    sed -n "s/^  \"$1\": \"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}\$/\1/p" <<<"$2"
}

write_metrics() {
    [ -n "$metrics" ] || return 0
    local tmp label
    label="name=\"$name\""
    tmp=$(mktemp "$metrics.XXXXXX") || return 0
    {
        echo "# HELP storage_test_transfers_total Test transfers made, by result."
        echo "# TYPE storage_test_transfers_total counter"
        echo "storage_test_transfers_total{$label,result=\"ok\"} $total_ok"
        echo "storage_test_transfers_total{$label,result=\"failed\"} $total_failed"
        echo "# HELP storage_test_last_success_timestamp_seconds End of the last good transfer."
        echo "# TYPE storage_test_last_success_timestamp_seconds gauge"
        echo "storage_test_last_success_timestamp_seconds{$label} $last_ok_at"
        echo "# HELP storage_test_duration_seconds Duration of the last transfer."
        echo "# TYPE storage_test_duration_seconds gauge"
        echo "storage_test_duration_seconds{$label} $1"
        echo "# HELP storage_test_token_left_seconds Lifetime the last transfer's token had left."
        echo "# TYPE storage_test_token_left_seconds gauge"
        echo "storage_test_token_left_seconds{$label} $2"
    } >"$tmp"
    chmod 0644 "$tmp" # counters only, no secret: the node exporter must read it
    mv -f "$tmp" "$metrics"
}

# Copy the client's diagnostics, never anything that looks like a JWT, to stderr.
report_error() {
    tail -n 3 "$work/err" | tr -d '\r' | sed 's/eyJ[A-Za-z0-9._-]*/<token>/g' |
        sed 's/^/test-transfer.sh: /' >&2
}

transfer() { # $1: source file, $2: destination URL, $3: token file; sets http
    local src=$1 url=$2 tok=$3
    http=-
    case $client in
        xrdcp)
            BEARER_TOKEN_FILE="$tok" timeout "$timeout_s" \
                xrdcp --nopbar --silent "$src" "$url" </dev/null >/dev/null 2>"$work/err"
            ;;
        curl)
            # the header comes from a file descriptor: no token in curl's argv
            http=$(timeout "$timeout_s" curl -sS -o /dev/null -w '%{http_code}' -T "$src" \
                -H @<(printf 'Authorization: Bearer %s\n' "$(<"$tok")") \
                "$url" </dev/null 2>"$work/err") || return $?
            case $http in
                2??) return 0 ;;
                *) echo "HTTP $http" >>"$work/err"; return 22 ;;
            esac
            ;;
        gfal-copy)
            # gfal2 reads the token's value from BEARER_TOKEN, set for this one call
            BEARER_TOKEN="$(<"$tok")" timeout "$timeout_s" \
                gfal-copy "file://$src" "$url" </dev/null >/dev/null 2>"$work/err"
            ;;
        davix-put)
            # davix reads no token variable and no header file: argv is the only way
            timeout "$timeout_s" davix-put ${X509_CERT_DIR:+--capath "$X509_CERT_DIR"} \
                -H "Authorization: Bearer $(<"$tok")" \
                "$src" "$url" </dev/null >/dev/null 2>"$work/err"
            ;;
    esac
}

start_ns=$(date +%s%N)
next_ns=$start_ns
while [ "$stop" = 0 ]; do
    n=$((n + 1))
    file="probe-$name-$(date -u +%Y%m%dT%H%M%SZ)-$$-$n.dat"
    src="$work/$file"
    {
        echo "jobtoken storage test transfer $n from $name at $(stamp)"
        head -c "$size" /dev/urandom | od -An -tx1 -v | tr -d ' \n'
    } | head -c "$size" >"$src"

    # the token current now, in a private copy that this transfer alone uses
    tok="$work/bt"
    jti=- exp=- left=- state=unknown
    if cp -- "$BEARER_TOKEN_FILE" "$tok" 2>/dev/null; then
        # inspect exits 0-3 with the token's health (2: expired), above 3 without facts
        facts=$("$bin" inspect --json "$tok" 2>/dev/null)
        [ $? -le 3 ] || facts=
        jti=$(json_value jti "$facts")
        exp=$(json_value exp "$facts")
        if [ -n "$exp" ]; then
            left=$(awk -v e="$exp" -v now="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - now }')
            state=$(awk -v l="$left" 'BEGIN { print (l > 0 ? "valid" : "expired") }')
            exp=${exp%.*}
        fi
        [ -n "$jti" ] || jti=-
        [ -n "$exp" ] || exp=-
        begin_ns=$(date +%s%N)
        transfer "$src" "$dest$file" "$tok"
        rc=$?
        end_ns=$(date +%s%N)
    else
        echo "no token at BEARER_TOKEN_FILE=$BEARER_TOKEN_FILE" >"$work/err"
        rc=74 begin_ns=$(date +%s%N) end_ns=$begin_ns
    fi
    rm -f -- "$tok" "$src"
    duration=$(awk -v a="$begin_ns" -v b="$end_ns" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
    if [ "$rc" = 0 ]; then
        result=ok
        ok=$((ok + 1))
        total_ok=$((total_ok + 1))
        last_ok_at=$((end_ns / 1000000000))
    elif [ "$stop" = 1 ]; then
        # the stop signal reached the client too (the whole process group gets it)
        result=interrupted
        interrupted=$((interrupted + 1))
    else
        result=failed
        failed=$((failed + 1))
        total_failed=$((total_failed + 1))
        report_error
    fi
    [ "$state" != expired ] || expired=$((expired + 1))
    echo "$(stamp) transfer n=$n result=$result rc=$rc http=$http duration_s=$duration" \
        "bytes=$size client=$client token_state=$state token_jti=$jti token_exp=$exp" \
        "token_left_s=$left file=$file"
    if [ "$left" = - ]; then write_metrics "$duration" NaN; else write_metrics "$duration" "$left"; fi

    if [ "$count" != 0 ] && [ "$n" -ge "$count" ]; then
        break
    fi
    # the next transfer starts one interval after this one started; never catch up in a burst
    next_ns=$((next_ns + interval_ns))
    now_ns=$(date +%s%N)
    if [ "$next_ns" -lt "$now_ns" ]; then
        next_ns=$now_ns
    fi
    if [ "$stop" = 0 ] && [ "$next_ns" -gt "$now_ns" ]; then
        sleep "$(awk -v d="$((next_ns - now_ns))" 'BEGIN { printf "%.3f", d / 1e9 }')" &
        sleeper=$!
        wait "$sleeper" # returns at once on TERM/INT, so the trap runs without delay
        kill "$sleeper" 2>/dev/null
    fi
done

echo "$(stamp) summary transfers=$n ok=$ok failed=$failed interrupted=$interrupted" \
    "token_expired=$expired stopped=$stop"
[ "$failed" = 0 ]

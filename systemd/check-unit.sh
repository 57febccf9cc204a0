#!/usr/bin/env bash
# Gate for systemd/qbo-daemon.service (CI calls this; no systemd needs to be running):
#   1. `systemd-analyze verify --recursive-errors=yes`: unknown keys, bad values and
#      broken dependencies fail (plain `verify` exits 0 on an unknown key);
#   2. `systemd-analyze security --offline=true`: the exposure score must be <= 2.0.
#
# verify also insists that every Exec*= binary exists, and the daemon is installed
# only on the target host. So both checks run on a copy in a temporary directory
# whose Exec*= commands point at an existing binary (`true`), arguments untouched.
#
# Usage: systemd/check-unit.sh [UNIT_FILE]     (SYSTEMD_ANALYZE=/path overrides the tool)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
unit="${1:-$here/qbo-daemon.service}"
analyze="${SYSTEMD_ANALYZE:-systemd-analyze}"
# --threshold= compares against the exposure level times ten (its default, 100,
# is the 10.0 maximum), so 20 means "fail above 2.0".
threshold=20
export SYSTEMD_COLORS=0 SYSTEMD_PAGER=cat

command -v "$analyze" >/dev/null || { echo "check-unit: $analyze not found" >&2; exit 2; }
[[ -f "$unit" ]] || { echo "check-unit: no unit file $unit" >&2; exit 2; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
name="$(basename "$unit")"
copy="$tmp/$name"
stand_in="$(command -v true)"
# Exec*= values may start with the prefixes @ - : + ! (see systemd.service(5)).
sed -E "s#^(Exec[A-Za-z]+=[-@:+!]*)[^[:space:]]+#\1${stand_in}#" "$unit" >"$copy"
if ! grep -qE "^ExecStart=[-@:+!]*${stand_in}( |$)" "$copy"; then
    echo "check-unit: could not rewrite ExecStart= in the copy of $unit" >&2
    exit 2
fi

status=0

echo "== systemd-analyze verify --recursive-errors=yes $name"
if "$analyze" verify --recursive-errors=yes "$copy"; then
    echo "verify: ok"
else
    echo "verify: FAILED" >&2
    status=1
fi

echo "== systemd-analyze security --offline=true --threshold=$threshold $name"
set +e
report="$("$analyze" security --no-pager --offline=true --threshold="$threshold" "$copy" 2>&1)"
security_rc=$?
set -e
# Show what is still exposed, then the score.
grep -E '^✗' <<<"$report" || true
score="$(sed -nE 's/.*Overall exposure level for [^:]+: ([0-9]+\.[0-9]+).*/\1/p' <<<"$report")"
if [[ -z "$score" ]]; then
    echo "$report" >&2
    echo "security: could not read the exposure score" >&2
    exit 1
fi
echo "exposure score: $score (maximum allowed: $((threshold / 10)).$((threshold % 10)))"
if [[ $security_rc -ne 0 ]]; then
    echo "security: FAILED (exposure $score is above the threshold)" >&2
    status=1
fi

# The unit's header records the score; say so when it drifts (not fatal: systemd
# versions weigh settings differently).
if ! grep -qE "^#.*exposure ${score//./\\.}( |$)" "$unit"; then
    echo "note: the score recorded at the top of $name is not $score; update the comment" >&2
fi

exit "$status"

#!/bin/sh
# Run a command in a private network namespace where loopback is the only interface.
#
# Ray Serve binds its replicas' inter-deployment gRPC ports on all interfaces in every mode, and
# http.mode haproxy binds their HTTP ports there too; the tests, benches and the demo start such
# apps, so `make test`/`make demo` run them here: nothing they start can be reached from, or
# send to, any other address. Where user namespaces are unavailable (`unshare -rn` fails) the
# command runs as is, with a warning.
if command -v ip >/dev/null 2>&1 && unshare -rn true 2>/dev/null; then
    exec unshare -rn sh -c 'ip link set lo up && exec "$@"' sh "$@"
fi
echo "loopback_only.sh: no private network namespace here (unshare -rn or ip missing);" \
    "running on the host network" >&2
exec "$@"

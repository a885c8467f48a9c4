#!/usr/bin/env bash
# System pieces the launcher tests start for real: Slurm (slurmctld, slurmd)
# with munge, iproute2 for network namespaces, and Ray (with its job server)
# in the project's .venv. Needs root and apt. Idempotent: skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

need_apt=()
command -v slurmctld >/dev/null || need_apt+=(slurm-wlm)
command -v munged >/dev/null || [ -x /usr/sbin/munged ] || need_apt+=(munge)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v nsenter >/dev/null || need_apt+=(util-linux)
# srun --mpi=pmix dlopens pmix2/lib/libpmix.so, which only libpmix-dev ships.
[ -e /usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so ] || need_apt+=(libpmix-dev)
apt_pid=""
if [ ${#need_apt[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    # apt (system packages) and pip (Ray, into the .venv) share nothing: apt runs
    # in the background while pip installs Ray, and is waited for below.
    ( $SUDO apt-get update -qq
      $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null ) &
    apt_pid=$!
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# Plain `ray` has no job server: `ray job submit` needs ray[default].
.venv/bin/python -c "import ray.dashboard.modules.job" 2>/dev/null \
    || .venv/bin/python -m pip install --quiet --disable-pip-version-check "ray[default]"

# set -e: a failed apt fails the script here.
[ -z "$apt_pid" ] || wait "$apt_pid"
# Debian's slurm packages start nothing; make sure no packaged daemon is left
# running (the tests start their own with their own config).
for svc in slurmctld slurmd munge; do
    $SUDO systemctl stop "$svc" >/dev/null 2>&1 || true
done
echo "system deps ready: $(slurmctld -V 2>/dev/null), ray $(.venv/bin/python -c 'import ray; print(ray.__version__)')"

#!/usr/bin/env bash
# Shared set-up for scripts/test.sh, scripts/demo.sh and .ci/run (sourced, not run): on a fresh
# Debian 12 machine as root, installs the Debian packages the real-SSH test hosts need (only if
# missing), then this package with its test and docs extras. Done once per shell: a script
# sourcing it after another already did (.ci/run, then scripts/test.sh) skips the work.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [[ ${LAZYCLUSTER_SETUP_DONE:-} == 1 ]]; then
    return 0 2>/dev/null || exit 0
fi

# openssh-server: sshd; iproute2: ip netns/veth/bridge; nftables: firewalled hosts; procps: pgrep/ps
packages=(openssh-server openssh-client iproute2 nftables procps util-linux)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "missing Debian packages: ${missing[*]} (run as root or apt-get install them)" >&2
        exit 1
    fi
    echo "installing Debian packages: ${missing[*]}"
    # keep the packages' init scripts from starting a system-wide sshd on port 22
    policy_rc=/usr/sbin/policy-rc.d
    added_policy=0
    if [[ ! -e $policy_rc ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy_rc" && chmod +x "$policy_rc" && added_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if ((added_policy)); then rm -f "$policy_rc"; fi
fi

PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip install -q --root-user-action=ignore -e '.[test,docs]'
export LAZYCLUSTER_SETUP_DONE=1

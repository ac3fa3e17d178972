#!/usr/bin/env bash
# Install the `prometheus` and `promtool` binaries from the Debian package, when either is missing.
#
# The tests start their own Prometheus server on 127.0.0.1 with a temporary data directory, so a
# system service that the package may start is stopped and disabled. Safe to run more than once.
# Needs root (or sudo) only when something has to be installed or stopped.
set -euo pipefail

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  else
    sudo "$@"
  fi
}

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "install-prometheus: installing the Debian prometheus package"
  as_root apt-get update -qq
  # --no-install-recommends keeps prometheus-node-exporter and its service out.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# The package installs a service for its own configuration. It must not run beside the tests.
for service in prometheus prometheus-node-exporter; do
  if [ ! -e "/lib/systemd/system/$service.service" ] && [ ! -e "/etc/init.d/$service" ]; then
    continue
  fi
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    as_root systemctl disable --now "$service" >/dev/null 2>&1 || true
  elif [ -x "/etc/init.d/$service" ]; then
    if as_root "/etc/init.d/$service" status >/dev/null 2>&1; then
      as_root "/etc/init.d/$service" stop
    fi
    if command -v update-rc.d >/dev/null; then
      as_root update-rc.d "$service" disable >/dev/null 2>&1 || true
    fi
  fi
done

prometheus --version 2>&1 | head -n 1
promtool --version 2>&1 | head -n 1

#!/bin/sh
# Before removal (deb: remove; rpm: 0), not before an upgrade: stop and disable the service.
set -e
case "$1" in
remove | 0)
	if command -v systemctl >/dev/null 2>&1; then
		if [ -d /run/systemd/system ]; then
			systemctl stop iothubby-agent.service || true
		fi
		systemctl disable iothubby-agent.service || true
	fi
	;;
esac
exit 0

#!/bin/sh
# After install or upgrade (deb: configure; rpm: 1 install, 2 upgrade): the iothubby user, its
# state directory, the config's group, and the service enabled but not started (it needs a
# credential in /etc/iothubby first). An upgrade restarts a running service.
set -e
if command -v systemd-sysusers >/dev/null 2>&1; then
	systemd-sysusers /usr/lib/sysusers.d/iothubby.conf
elif ! getent passwd iothubby >/dev/null; then
	useradd --system --user-group --home-dir /var/lib/iothubby --no-create-home \
		--shell /usr/sbin/nologin --comment "iothubby device agent" iothubby
fi
if command -v systemd-tmpfiles >/dev/null 2>&1; then
	systemd-tmpfiles --create /usr/lib/tmpfiles.d/iothubby.conf
else
	install -d -m 0750 -o iothubby -g iothubby /var/lib/iothubby
fi
chgrp iothubby /etc/iothubby /etc/iothubby/agent.yaml
chmod 0750 /etc/iothubby
chmod 0640 /etc/iothubby/agent.yaml
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload || true
fi
if command -v systemctl >/dev/null 2>&1; then
	systemctl enable iothubby-agent.service || true
	upgrade=no
	case "$1" in
	configure) [ -n "$2" ] && upgrade=yes ;;
	2) upgrade=yes ;;
	esac
	if [ "$upgrade" = yes ] && [ -d /run/systemd/system ]; then
		systemctl try-restart iothubby-agent.service || true
	fi
fi
exit 0

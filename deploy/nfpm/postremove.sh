#!/bin/sh
# After removal. deb purge also removes /etc/iothubby: the configuration and the credentials the
# user put there. The state directory /var/lib/iothubby and the iothubby user stay (the device's
# identity and twin state; a reinstall picks them up): remove them by hand if wanted.
set -e
case "$1" in
purge)
	rm -rf /etc/iothubby
	;;
esac
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload || true
fi
exit 0

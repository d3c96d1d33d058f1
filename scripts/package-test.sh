#!/usr/bin/env bash
# make package-test: builds the packages (scripts/package.sh), installs the amd64 .deb with
# dpkg on this machine, checks its files, user, modes and unit (systemd-analyze verify, and an
# exposure of at most 2.0 from systemd-analyze security), runs the installed agent, purges the
# package and checks that only the state the device owns is left (/var/lib/iothubby and the
# iothubby user). The arm64 and armhf agents run --version under qemu-user-static.
# Needs root (CI runs as root); elsewhere it says so and skips.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
	echo "package-test: skipped: dpkg -i needs root (CI runs it as root)"
	exit 0
fi
fail() {
	echo "package-test: FAIL: $*" >&2
	exit 1
}
if dpkg -s iothubby >/dev/null 2>&1; then
	fail "an iothubby package is already installed here; not touching it"
fi
export VERSION=${VERSION:-0.0.0+test}
# PACKAGE_TEST_REUSE=1: test the packages already in dist/ (built with the same VERSION).
[ "${PACKAGE_TEST_REUSE:-}" = 1 ] || scripts/package.sh
for f in iothubby_${VERSION}_amd64.deb iothubby_${VERSION}_arm64.deb iothubby_${VERSION}_armhf.deb \
	iothubby-${VERSION}-1.x86_64.rpm iothubby-${VERSION}-1.aarch64.rpm iothubby-${VERSION}-1.armv7hl.rpm; do
	[ -s "dist/$f" ] || fail "dist/$f not built"
done
if command -v rpm >/dev/null 2>&1; then
	rpm -qpl "dist/iothubby-${VERSION}-1.x86_64.rpm" | grep -qx /usr/bin/iothubby-agent || fail "rpm lacks /usr/bin/iothubby-agent"
	rpm -qpc "dist/iothubby-${VERSION}-1.x86_64.rpm" | grep -qx /etc/iothubby/agent.yaml || fail "rpm: agent.yaml is not a config file"
fi

user_existed=no
getent passwd iothubby >/dev/null && user_existed=yes
installed=no
cleanup() {
	if [ "$installed" = yes ]; then dpkg --purge iothubby >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

dpkg -i "dist/iothubby_${VERSION}_amd64.deb"
installed=yes

mode() { stat -c '%a %U %G' "$1"; }
expect_mode() {
	[ -e "$1" ] || fail "$1 missing"
	[ "$(mode "$1")" = "$2" ] || fail "$1: mode $(mode "$1"), want $2"
}
for b in iothubby-agent hubby hubsim; do expect_mode /usr/bin/$b "755 root root"; done
expect_mode /usr/lib/systemd/system/iothubby-agent.service "644 root root"
expect_mode /usr/lib/sysusers.d/iothubby.conf "644 root root"
expect_mode /usr/lib/tmpfiles.d/iothubby.conf "644 root root"
expect_mode /etc/iothubby "750 root iothubby"
expect_mode /etc/iothubby/agent.yaml "640 root iothubby"
expect_mode /var/lib/iothubby "750 iothubby iothubby"
getent passwd iothubby | grep -q ':/var/lib/iothubby:' || fail "iothubby user: $(getent passwd iothubby)"
dpkg-query -W -f='${Conffiles}\n' iothubby | grep -q '/etc/iothubby/agent.yaml' || fail "agent.yaml is not a conffile"
# Enabled, not started (it needs a credential first).
[ -L /etc/systemd/system/multi-user.target.wants/iothubby-agent.service ] || fail "service not enabled"
if pidof iothubby-agent >/dev/null; then fail "service started on install"; fi

out=$(iothubby-agent --version)
case "$out" in "agent $VERSION "*) ;; *) fail "iothubby-agent --version: $out" ;; esac
hubby --version | grep -q "$VERSION" || fail "hubby --version"
hubsim --version | grep -q "$VERSION" || fail "hubsim --version"
if iothubby-agent check --help >/dev/null 2>&1; then
	# The shipped file has no identity yet: check must say so, and exit 1.
	set +e
	out=$(setpriv --reuid=iothubby --regid=iothubby --init-groups iothubby-agent check --config /etc/iothubby/agent.yaml 2>&1)
	rc=$?
	set -e
	[ "$rc" = 1 ] || fail "agent check on the shipped config: exit $rc, want 1: $out"
	echo "$out" | grep -q 'set a connection string' || fail "agent check does not name the missing identity: $out"
fi

systemd-analyze verify /usr/lib/systemd/system/iothubby-agent.service || fail "systemd-analyze verify"
exposure=$(systemd-analyze security --offline=true /usr/lib/systemd/system/iothubby-agent.service 2>/dev/null |
	sed -n 's/.*Overall exposure level for iothubby-agent.service: \([0-9.]*\).*/\1/p')
[ -n "$exposure" ] || fail "systemd-analyze security gave no exposure"
awk -v e="$exposure" 'BEGIN { exit !(e <= 2.0) }' || fail "exposure $exposure > 2.0"
echo "package-test: unit exposure $exposure"

# Purge: everything goes but the device's state and its user.
touch /etc/iothubby/device.connection-string
dpkg --purge iothubby
installed=no
for p in /usr/bin/iothubby-agent /usr/bin/hubby /usr/bin/hubsim /usr/lib/systemd/system/iothubby-agent.service \
	/usr/lib/sysusers.d/iothubby.conf /usr/lib/tmpfiles.d/iothubby.conf /etc/iothubby \
	/etc/systemd/system/multi-user.target.wants/iothubby-agent.service; do
	[ ! -e "$p" ] && [ ! -L "$p" ] || fail "$p left after purge"
done
[ -d /var/lib/iothubby ] || fail "purge removed the device's state /var/lib/iothubby"
getent passwd iothubby >/dev/null || fail "purge removed the iothubby user"
if [ "$user_existed" = no ] && [ "${PACKAGE_TEST_KEEP_USER:-}" != 1 ]; then
	# Leave the machine as found.
	userdel iothubby 2>/dev/null || true
	getent group iothubby >/dev/null && groupdel iothubby 2>/dev/null || true
	rm -rf /var/lib/iothubby
fi

# ARM binaries under qemu-user-static.
for a in arm64:qemu-aarch64-static arm7:qemu-arm-static; do
	arch=${a%%:*} q=${a#*:}
	command -v "$q" >/dev/null || fail "$q missing (apt-get install qemu-user-static)"
	out=$("$q" "dist/build/$arch/agent" --version)
	case "$out" in "agent $VERSION (go"*) ;; *) fail "$arch agent --version under $q: $out" ;; esac
	echo "package-test: $arch: $out"
done
echo "package-test: ok"

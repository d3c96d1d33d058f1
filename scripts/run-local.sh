#!/usr/bin/env bash
# `make run`: start hubsim with its state under $STATE (default .hubby/, git-ignored), make sure a
# demo device exists, and run the agent against it in the foreground, logs on the terminal.
# Firmware updates are on in simulate mode: a signing key is made once into $STATE/firmware.key
# (hubby firmware keygen), a demo image into $STATE/demo-firmware.bin, and the agent runs with
# $STATE/agent.yaml, which is $AGENT_CONFIG with its firmware section replaced (the public key,
# and hubsim's ca.pem trusted for images from hubsim's store) and without twin.properties
# entries for firmware.* (the desired firmware property starts updates).
# Ctrl-C (or SIGTERM) stops the agent (it drains its queue), then hubsim; both exit cleanly.
#
# Environment: STATE (state folder), DEVICE_ID (default demo-device), AGENT_CONFIG (default
# configs/agent.yaml), MQTT_ADDR / HTTPS_ADDR (default 127.0.0.1:0, a free port each).
set -euo pipefail
cd "$(dirname "$0")/.."

bin=bin
state=${STATE:-.hubby}
device=${DEVICE_ID:-demo-device}
config=${AGENT_CONFIG:-configs/agent.yaml}
hubdir="$state/hubsim"
mkdir -p "$hubdir"
chmod 700 "$state"

rm -f "$hubdir/endpoints.json"
# setsid: a Ctrl-C on the terminal reaches the agent only; hubsim stays up while the agent drains.
setsid "$bin/hubsim" serve --state "$hubdir" --mqtt-addr "${MQTT_ADDR:-127.0.0.1:0}" --https-addr "${HTTPS_ADDR:-127.0.0.1:0}" \
	--log-format console 2> >(sed -u 's/^/[hubsim] /' >&2) &
hubsim_pid=$!

stop_hubsim() {
	if kill -0 "$hubsim_pid" 2>/dev/null; then
		kill -TERM "$hubsim_pid" 2>/dev/null || true
		wait "$hubsim_pid" 2>/dev/null || true
	fi
}
trap stop_hubsim EXIT

# Wait (bounded) for hubsim to publish its endpoints.
for _ in $(seq 1 300); do
	[ -s "$hubdir/endpoints.json" ] && break
	kill -0 "$hubsim_pid" 2>/dev/null || { echo "hubsim exited during start-up" >&2; exit 1; }
	sleep 0.1
done
[ -s "$hubdir/endpoints.json" ] || { echo "hubsim did not start within 30 s" >&2; exit 1; }

"$bin/hubby" --hubsim-state "$hubdir" device create "$device" --if-missing >/dev/null
cs_file="$state/$device.connection-string"
(umask 077 && "$bin/hubby" --hubsim-state "$hubdir" device connection-string "$device" >"$cs_file")
ca_file=$(sed -n 's/.*"caFile": *"\([^"]*\)".*/\1/p' "$hubdir/endpoints.json")

# Firmware: a signing key (kept across runs), a demo image, and the agent configuration with
# firmware in simulate mode trusting that key and hubsim's CA.
fw_key="$state/firmware.key"
[ -s "$fw_key" ] || "$bin/hubby" firmware keygen --key "$fw_key" >/dev/null
[ -s "$state/demo-firmware.bin" ] || head -c 1048576 /dev/urandom >"$state/demo-firmware.bin"
agent_config="$state/agent.yaml"
fw_pub=$(cd "$state" && pwd)/firmware.pub
awk -v ca="$ca_file" -v pub="$fw_pub" '
	function block() { print "firmware:\n  mode: simulate\n  applyDuration: 3s\n  caFile: \"" ca "\"\n  publicKeyFile: \"" pub "\""; done = 1 }
	/^firmware:/ { block(); skip = 1; next }
	skip && /^[ \t]/ { next }
	# twin.properties entries for firmware.* would take the desired property the updater reads
	/^    firmware[.:]/ { pskip = 1; next }
	pskip && /^      / { next }
	{ skip = 0; pskip = 0; print }
	END { if (!done) block() }
' "$config" >"$agent_config"
# The version to suggest: one minor version above what the demo device runs.
running=$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$state/agent/firmware-$device/state.json" 2>/dev/null | head -n 1 || true)
running=${running:-$(sed -n 's/^  firmwareVersion: *"\{0,1\}\([^" ]*\).*/\1/p' "$config" | head -n 1)}
next=$(echo "${running:-1.0.0}" | awk -F. '{ $2 = $2 + 1; for (i = 3; i <= NF; i++) $i = 0; print }' OFS=.)

echo "hubsim is up (state $hubdir); running the agent as $device. Ctrl-C stops both." >&2
echo "Try, in another terminal:  bin/hubby --hubsim-state $hubdir device list" >&2
echo "                           bin/hubby --hubsim-state $hubdir twin update $device --desired telemetryInterval=5" >&2
echo "Firmware update ($device runs ${running:-1.0.0}; signed with $fw_key, served by hubsim's image store):" >&2
echo "  bin/hubby --hubsim-state $hubdir firmware publish $state/demo-firmware.bin --version $next --key $fw_key --rate 262144 | bin/hubby --hubsim-state $hubdir firmware update $device -" >&2

# The agent runs in the foreground of this script's process group, so Ctrl-C reaches it directly;
# SIGTERM sent to this script is passed on.
"$bin/agent" run --config "$agent_config" --connection-string-file "$cs_file" --ca-file "$ca_file" \
	--state-dir "$state/agent" --telemetry-interval "${TELEMETRY_INTERVAL:-5s}" &
agent_pid=$!
signalled=0
trap 'signalled=1; kill -TERM "$agent_pid" 2>/dev/null || true' INT TERM
status=0
wait "$agent_pid" || status=$?
# A trapped signal interrupts wait (status > 128) before the agent has finished draining; wait
# again for the agent's own exit status.
if [ "$signalled" = 1 ]; then
	status=0
	wait "$agent_pid" || status=$?
fi
trap - INT TERM
stop_hubsim
trap - EXIT
echo "agent exited with status $status; hubsim stopped." >&2
exit "$status"

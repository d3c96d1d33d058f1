package agent

// The log messages a Device writes that tests and operators' log filters wait for. The text is
// quoted in README.md and docs: change it only together with them. The session's status lines
// are pkg/hub's (hub.MsgConnected, ...), the twin's pkg/twinsync's, provisioning's pkg/dps's.
const (
	// MsgC2D: a cloud-to-device message was received (fields "message_id", "body", ...).
	MsgC2D = "cloud-to-device message"
	// MsgStopped: Run returned; fields count the telemetry delivered and failed.
	MsgStopped = "stopped"
	// MsgConfigReloaded: a new configuration was applied without a restart.
	MsgConfigReloaded = "configuration reloaded"
	// MsgUsingCachedProvisioning: the DPS result cached from an earlier run is used.
	MsgUsingCachedProvisioning = "using cached provisioning result"
	// MsgProvisioningFailed: DPS registration failed; the device retries after a backoff.
	MsgProvisioningFailed = "provisioning failed"
	// MsgReprovisioning: the assigned hub refused the identity, so the device registers again.
	MsgReprovisioning = "hub refused the provisioned identity; provisioning again"
	// MsgReprovisionRequested: the reprovision direct method was called.
	MsgReprovisionRequested = "reprovision requested by direct method"
	// MsgRebootCommandRan: the reboot command ran; the agent waits for the system to go down.
	MsgRebootCommandRan = "reboot command ran; waiting for the system to go down"
	// MsgRebootDidNotHappen: the reboot command returned but the system kept running.
	MsgRebootDidNotHappen = "reboot requested but the system did not reboot"
	// MsgSimRebootDisconnecting: a simulated reboot closes the session.
	MsgSimRebootDisconnecting = "simulated reboot: disconnecting"
	// MsgSimRebootBooted: a simulated reboot's offline time is over (field "boot_count").
	MsgSimRebootBooted = "simulated reboot: booted"
)

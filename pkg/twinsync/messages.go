package twinsync

// The log messages a Sync writes that tests (and operators' log filters) wait for. The text is
// quoted in README.md and docs: change it only together with them.
const (
	// MsgTwinSynced: the twin GET after a connect was applied and the reported state sent.
	MsgTwinSynced = "twin synced"
	// MsgDesiredVersionApplied: every handler has seen a desired version (field "version").
	MsgDesiredVersionApplied = "desired version applied"
	// MsgDesiredPropertyApplied: one desired property's handler answered (fields "path", "ac").
	MsgDesiredPropertyApplied = "desired property applied"
	// MsgDesiredPropertyRecorded: a desired property without a handler was recorded (field "path").
	MsgDesiredPropertyRecorded = "desired property recorded (no handler)"
	// MsgReportedConfirmed: the hub accepted a reported PATCH (field "reported_version").
	MsgReportedConfirmed = "reported properties confirmed"
	// MsgGetRetrying: a twin GET failed and is retried after a backoff.
	MsgGetRetrying = "twin GET failed, retrying"
	// MsgReportedRetrying: a reported PATCH failed (e.g. 429) and is retried after a backoff.
	MsgReportedRetrying = "twin reported PATCH failed, retrying"
)

package hubapi

// Twin is the service view of a device twin (GET/PATCH/PUT /twins/{id}), Azure's JSON shape
// (protocol-service.md §2): the registry's identity fields as read-only copies, tags, and the
// desired and reported sections with their $version and $metadata.
type Twin struct {
	DeviceID                  string         `json:"deviceId"`
	ETag                      string         `json:"etag"`
	DeviceETag                string         `json:"deviceEtag"`
	Version                   int64          `json:"version"`
	Status                    string         `json:"status"`
	StatusReason              *string        `json:"statusReason"`
	StatusUpdateTime          string         `json:"statusUpdateTime"`
	ConnectionState           string         `json:"connectionState"`
	LastActivityTime          string         `json:"lastActivityTime"`
	CloudToDeviceMessageCount int            `json:"cloudToDeviceMessageCount"`
	AuthenticationType        string         `json:"authenticationType"`
	X509Thumbprint            map[string]any `json:"x509Thumbprint"`
	Capabilities              map[string]any `json:"capabilities"`
	Tags                      map[string]any `json:"tags"`
	Properties                TwinProperties `json:"properties"`
}

// TwinProperties are a twin's desired and reported sections, each with "$version" and
// "$metadata".
type TwinProperties struct {
	Desired  map[string]any `json:"desired"`
	Reported map[string]any `json:"reported"`
}

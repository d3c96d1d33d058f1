// Package tpm is the device side of DPS TPM attestation (protocol-device.md §3.1 and §4): it
// opens a TPM 2.0, reads or creates the endorsement key (EK, 0x81010001) and the storage root
// key (SRK, 0x81000001) the way the Azure IoT SDKs do, imports the HMAC identity key that DPS
// delivers in an activation blob to 0x81000100, and signs SAS strings with TPM2_HMAC. The key
// never exists outside the TPM.
//
// Three backends sit behind go-tpm's one-method transport seam ([transport.TPM]), chosen by
// [Config.Backend]:
//
//   - "device": a TPM character device, /dev/tpmrm0 by default (the kernel's resource
//     manager; /dev/tpm0 also works when nothing else uses the TPM).
//   - "swtpm": a software TPM (swtpm socket --tpm2) reached over its data channel, either
//     tcp://host:port (--server type=tcp,port=…) or unix:///path (--server type=unixio,path=…).
//     swtpm must be started with --flags not-need-init,startup-clear; a TPM that still
//     answers TPM_RC_INITIALIZE gets one TPM2_Startup(CLEAR). swtpm serves one client at a
//     time, so one Device per swtpm instance.
//   - "simulator": Microsoft's reference TPM compiled into the binary (go-tpm-tools, needs
//     cgo). Its C state is global, so one per process. Its NV memory does not survive the
//     process, so its state directory keeps the seed its hierarchies derive from (same EK and
//     SRK after a restart) and the imported identity key, wrapped by the SRK.
//
// The owner and endorsement hierarchies are expected to have empty authorization values, as
// the Azure IoT SDKs expect.
//
// A [Device] is safe for concurrent use: every TPM command sequence runs under one lock, and
// every operation takes a context. swtpm commands have a deadline (the context's, capped by
// [Config.CommandTimeout]); a command already inside a TPM device or the in-process simulator
// cannot be interrupted, so for those the context is checked between commands.
package tpm

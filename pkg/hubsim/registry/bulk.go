package registry

import (
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/iothubby/iothubby/pkg/wire"
)

// BulkMode is the import mode of one row of a bulk registry operation.
type BulkMode string

// Bulk modes, as IoT Hub's REST enum spells them.
const (
	BulkCreate            BulkMode = "create"
	BulkUpdate            BulkMode = "update"
	BulkUpdateIfMatchETag BulkMode = "updateIfMatchETag"
	BulkDelete            BulkMode = "delete"
	BulkDeleteIfMatchETag BulkMode = "deleteIfMatchETag"
)

// ParseBulkMode reads an import mode case-insensitively (Microsoft's Node SDK sends "Update",
// "DeleteIfMatchETag").
func ParseBulkMode(s string) (BulkMode, bool) {
	for _, m := range []BulkMode{BulkCreate, BulkUpdate, BulkUpdateIfMatchETag, BulkDelete, BulkDeleteIfMatchETag} {
		if strings.EqualFold(s, string(m)) {
			return m, true
		}
	}
	return "", false
}

// BulkOp is one row: the device (for deletes only its ID matters), the mode and the etag the
// *IfMatchETag modes compare.
type BulkOp struct {
	Device Device
	Mode   BulkMode
	ETag   string
}

// BulkError is one row's failure.
type BulkError struct {
	DeviceID  string
	Operation BulkMode
	Err       wire.ServiceError
}

type bulkChange struct {
	op  *BulkOp
	cur *Device // nil for a create
	new *Device // nil for a delete
}

// Bulk applies rows of a bulk registry operation in one transaction: each row succeeds or fails
// on its own (create of an existing device: DeviceAlreadyExists; update or delete of a missing
// one: DeviceNotFound; an etag that does not match: PreconditionFailed). A device ID may appear
// once; callers check that. It returns the failures, in row order.
func (r *Registry) Bulk(ops []BulkOp) ([]BulkError, error) {
	var errs []BulkError
	fail := func(op *BulkOp, err error) {
		se, ok := err.(wire.ServiceError)
		if !ok {
			se = wire.ErrServerError.WithText("%v", err)
		}
		errs = append(errs, BulkError{DeviceID: op.Device.DeviceID, Operation: op.Mode, Err: se})
	}
	r.wmu.Lock()
	now := r.opts.Now()
	var changes []bulkChange
	for i := range ops {
		op := &ops[i]
		d := op.Device
		if op.Mode == BulkDelete || op.Mode == BulkDeleteIfMatchETag {
			if err := wire.ValidateDeviceID(d.DeviceID); err != nil {
				fail(op, wire.ErrArgumentInvalid.WithText("%v", err))
				continue
			}
		} else if err := normalize(&d); err != nil {
			fail(op, err)
			continue
		}
		r.mu.RLock()
		e, exists := r.devices[d.DeviceID]
		r.mu.RUnlock()
		var cur *Device
		if exists {
			c := e.device()
			cur = &c
		}
		switch op.Mode {
		case BulkCreate:
			if exists {
				fail(op, wire.ErrDeviceAlreadyExists.WithText("A device with ID '%s' is already registered.", d.DeviceID))
				continue
			}
			if d.Authentication.Type == AuthSAS {
				fillKeys(&d.Authentication.SymmetricKey)
			}
			d.GenerationID = r.nextGeneration()
			d.ConnectionState, d.ConnectionStateUpdatedTime, d.LastActivityTime = Disconnected, time.Time{}, time.Time{}
			d.StatusUpdatedTime, d.CloudToDeviceMessageCount = time.Time{}, 0
			if d.Status == StatusDisabled {
				d.StatusUpdatedTime = now
			}
			changes = append(changes, bulkChange{op: op, new: &d})
		case BulkUpdate, BulkUpdateIfMatchETag, BulkDelete, BulkDeleteIfMatchETag:
			if !exists {
				fail(op, wire.ErrDeviceNotFound.WithText("Device %s not registered", d.DeviceID))
				continue
			}
			if op.Mode == BulkUpdateIfMatchETag || op.Mode == BulkDeleteIfMatchETag {
				if op.ETag == "" {
					fail(op, wire.ErrArgumentInvalid.WithText("importMode %s needs the device's eTag", op.Mode))
					continue
				}
				if !ETagMatches(op.ETag, cur.ETag) {
					fail(op, wire.ErrPreconditionFailed.WithText("Precondition failed: Device %s etag does not match", d.DeviceID))
					continue
				}
			}
			if op.Mode == BulkDelete || op.Mode == BulkDeleteIfMatchETag {
				changes = append(changes, bulkChange{op: op, cur: cur})
				continue
			}
			if d.Authentication.Type == AuthSAS {
				if d.Authentication.SymmetricKey == (SymmetricKey{}) && cur.Authentication.Type == AuthSAS {
					d.Authentication.SymmetricKey = cur.Authentication.SymmetricKey
				}
				fillKeys(&d.Authentication.SymmetricKey)
			}
			d.GenerationID = cur.GenerationID
			d.ConnectionState, d.ConnectionStateUpdatedTime = cur.ConnectionState, cur.ConnectionStateUpdatedTime
			d.LastActivityTime, d.CloudToDeviceMessageCount = cur.LastActivityTime, cur.CloudToDeviceMessageCount
			d.StatusUpdatedTime = cur.StatusUpdatedTime
			if d.Status != cur.Status {
				d.StatusUpdatedTime = now
			}
			changes = append(changes, bulkChange{op: op, cur: cur, new: &d})
		default:
			fail(op, wire.ErrArgumentInvalid.WithText("unknown importMode %q", op.Mode))
		}
	}
	if len(changes) == 0 {
		r.wmu.Unlock()
		return errs, nil
	}
	if err := r.db.Update(func(tx *bolt.Tx) error {
		for _, c := range changes {
			if c.new == nil {
				if err := tx.Bucket(bucketDevices).Delete([]byte(c.cur.DeviceID)); err != nil {
					return err
				}
				continue
			}
			var err error
			if c.new.ETag, err = newETag(tx); err != nil {
				return err
			}
			if err := putDevice(tx, *c.new); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		r.wmu.Unlock()
		return nil, internal(err)
	}
	r.mu.Lock()
	for _, c := range changes {
		switch {
		case c.new == nil:
			if e := r.devices[c.cur.DeviceID]; e != nil {
				e.deleted.Store(true)
			}
			delete(r.devices, c.cur.DeviceID)
		case c.cur == nil:
			r.devices[c.new.DeviceID] = newEntry(*c.new)
		default:
			r.devices[c.new.DeviceID].setSnapshot(*c.new)
		}
	}
	r.mu.Unlock()
	r.wmu.Unlock()
	for _, c := range changes {
		r.notify(Change{DeviceID: c.op.Device.DeviceID, Old: c.cur, New: c.new})
	}
	return errs, nil
}

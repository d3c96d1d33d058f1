package registry

import (
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/iothubby/iothubby/pkg/hubapi"
)

// Blobs are opaque per-device records that other hubsim components (the twin store) keep in the
// registry's database, so that everything hubsim persists lives in one file. The bucket names
// are the caller's; they must not be "devices", "policies", "cas" or "meta".

// LoadBlobs returns every record in bucket (an empty map when the bucket does not exist yet).
func (r *Registry) LoadBlobs(bucket string) (map[string][]byte, error) {
	out := map[string][]byte{}
	err := r.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte(bucket))
		if b == nil {
			return nil
		}
		return b.ForEach(func(k, v []byte) error {
			out[string(k)] = append([]byte(nil), v...)
			return nil
		})
	})
	if err != nil {
		return nil, internal(err)
	}
	return out, nil
}

// StoreBlobs writes put and removes del in bucket, in one transaction.
func (r *Registry) StoreBlobs(bucket string, put map[string][]byte, del []string) error {
	err := r.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists([]byte(bucket))
		if err != nil {
			return err
		}
		for k, v := range put {
			if err := b.Put([]byte(k), v); err != nil {
				return err
			}
		}
		for _, k := range del {
			if err := b.Delete([]byte(k)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return internal(err)
	}
	return nil
}

// FormatTime renders a time as the REST API does ("0001-01-01T00:00:00Z" when never set).
func FormatTime(t time.Time) string { return hubapi.FormatTime(t) }

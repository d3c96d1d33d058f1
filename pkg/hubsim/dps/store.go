package dps

import (
	"encoding/json"
	"fmt"

	bolt "go.etcd.io/bbolt"

	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/wire"
)

// Persistence: the bbolt buckets, loading them at Open, and the one write path (store,
// remove) that every change goes through, never under s.mu.

var (
	bucketMeta        = []byte("meta")
	bucketEnrollments = []byte("enrollments")
	bucketGroups      = []byte("enrollmentGroups")
	bucketRegs        = []byte("registrations")
)

func (s *Server) load() error {
	return s.db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketMeta, bucketEnrollments, bucketGroups, bucketRegs} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return fmt.Errorf("dps: %w", err)
			}
		}
		meta := tx.Bucket(bucketMeta)
		key := meta.Get([]byte("policyKey"))
		if key == nil {
			key = []byte(registry.GenerateKey())
			if err := meta.Put([]byte("policyKey"), key); err != nil {
				return fmt.Errorf("dps: %w", err)
			}
		}
		k, err := sas.ParseKey(string(key))
		if err != nil {
			return fmt.Errorf("dps: stored policy key: %w", err)
		}
		s.policyKey, s.policyB64 = k, string(key)
		load := func(bucket []byte, into func(k string, v []byte) error) error {
			return tx.Bucket(bucket).ForEach(func(k, v []byte) error { return into(string(k), v) })
		}
		if err := load(bucketEnrollments, func(k string, v []byte) error {
			var e hubapi.Enrollment
			if err := json.Unmarshal(v, &e); err != nil {
				return fmt.Errorf("dps: enrollment %s: %w", k, err)
			}
			s.enrollments[k] = &e
			return nil
		}); err != nil {
			return err
		}
		if err := load(bucketGroups, func(k string, v []byte) error {
			var e hubapi.Enrollment
			if err := json.Unmarshal(v, &e); err != nil {
				return fmt.Errorf("dps: enrollment group %s: %w", k, err)
			}
			s.groups[k] = &e
			return nil
		}); err != nil {
			return err
		}
		return load(bucketRegs, func(k string, v []byte) error {
			var r Registration
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("dps: registration %s: %w", k, err)
			}
			s.regs[k] = &r
			if r.State.Status == wire.DPSStatusAssigned && r.Hub != "" {
				s.placed[r.State.DeviceID] = placement{hub: r.Hub, generationID: r.GenerationID, regKey: k}
			}
			return nil
		})
	})
}

// store writes one record. Call it without s.mu.
func (s *Server) store(bucket []byte, k string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return errf(500, 500000, "encoding: %v", err)
	}
	if s.beforeWrite != nil {
		if err := s.beforeWrite(); err != nil {
			return errf(500, 500000, "store: %v", err)
		}
	}
	// Batch coalesces concurrent writers into one transaction (one fsync) under load.
	if err := s.db.Batch(func(tx *bolt.Tx) error { return tx.Bucket(bucket).Put([]byte(k), b) }); err != nil {
		return errf(500, 500000, "store: %v", err)
	}
	return nil
}

// remove deletes one record. Call it without s.mu.
func (s *Server) remove(bucket []byte, k string) error {
	if s.beforeWrite != nil {
		if err := s.beforeWrite(); err != nil {
			return errf(500, 500000, "store: %v", err)
		}
	}
	if err := s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucket).Delete([]byte(k)) }); err != nil {
		return errf(500, 500000, "store: %v", err)
	}
	return nil
}

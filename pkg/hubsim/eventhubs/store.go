// Package eventhubs is hubsim's Event Hubs-compatible endpoint's event store: device-to-cloud
// messages kept per partition (the partition chosen from the device ID as IoT Hub does), with
// sequence numbers, offsets and enqueued times, consumer groups ($Default plus created ones),
// and retention bounded in events, bytes and time. It knows nothing of AMQP: the AMQP face
// (pkg/hubsim/amqp) and tests read it through Start, Read and Info.
//
// Events live in memory and are written to a bbolt file by a flusher every FlushInterval and at
// Close, so no publish waits for the disk; a hubsim killed without a clean stop loses at most
// the events of the last interval. A restart continues the sequence numbers and offsets.
package eventhubs

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/clock"
)

// Defaults of Config.
const (
	DefaultPartitions    = 4
	DefaultMaxEvents     = 100000
	DefaultMaxBytes      = 256 << 20
	DefaultRetention     = 24 * time.Hour // IoT Hub's built-in endpoint default: 1 day
	DefaultFlushInterval = 200 * time.Millisecond
	// MaxPartitions is IoT Hub's largest partition count.
	MaxPartitions = 32
	// DefaultConsumerGroup always exists.
	DefaultConsumerGroup = "$Default"
)

// Config configures a Store.
type Config struct {
	// Path is the bbolt file events are kept in; empty keeps them in memory only.
	Path string
	// Partitions is the partition count (2 to 32 on IoT Hub; here 1 to 32). Default 4. It is
	// fixed when the file is created, as a hub's is: opening a file with another count fails.
	Partitions int
	// MaxEvents, MaxBytes and Retention bound what each partition keeps: the oldest events go
	// first once there are more than MaxEvents, their bodies and properties add up to more than
	// MaxBytes, or they are older than Retention.
	MaxEvents int
	MaxBytes  int64
	Retention time.Duration
	// FlushInterval is how often new events are written to Path.
	FlushInterval time.Duration
	// Clock stamps enqueued times and ages events out. Default: the real clock.
	Clock clock.Clock
	// Logger; nil discards.
	Logger *zap.Logger
}

// Property is an application property; Null marks a key sent without a value.
type Property struct {
	Key   string `json:"k"`
	Value string `json:"v,omitempty"`
	Null  bool   `json:"n,omitempty"`
}

// Event is one event in a partition.
type Event struct {
	Partition      int       `json:"p"`
	SequenceNumber int64     `json:"seq"`
	Offset         int64     `json:"off"`
	EnqueuedTime   time.Time `json:"t"`
	Body           []byte    `json:"b,omitempty"`
	// Properties are the application properties, in the order sent.
	Properties []Property `json:"props,omitempty"`
	// System holds the AMQP properties-section values by Azure's names: message-id,
	// correlation-id, user-id, to, content-type, content-encoding, absolute-expiry-time,
	// creation-time.
	System map[string]string `json:"sys,omitempty"`
	// Annotations are the message annotations other than x-opt-*, as strings:
	// iothub-connection-device-id, iothub-connection-module-id, iothub-connection-auth-method,
	// iothub-connection-auth-generation-id, iothub-message-source, dt-dataschema, dt-subject...
	// (iothub-enqueuedtime comes from EnqueuedTime).
	Annotations map[string]string `json:"ann,omitempty"`
}

// size is what an event counts against MaxBytes and how far it moves the offset.
func (e *Event) size() int64 {
	n := int64(len(e.Body)) + 1
	for _, p := range e.Properties {
		n += int64(len(p.Key) + len(p.Value))
	}
	for k, v := range e.System {
		n += int64(len(k) + len(v))
	}
	for k, v := range e.Annotations {
		n += int64(len(k) + len(v))
	}
	return n
}

// PartitionInfo is what the $management node reports for a partition.
type PartitionInfo struct {
	// BeginSequenceNumber is the first retained event's (the next one's when empty).
	BeginSequenceNumber int64
	// LastSequenceNumber, LastOffset and LastEnqueuedTime describe the newest event ever
	// enqueued (-1, -1 and zero before the first).
	LastSequenceNumber int64
	LastOffset         int64
	LastEnqueuedTime   time.Time
	// Empty: nothing retained.
	Empty bool
}

// ErrPartition is returned for a partition index out of range.
var ErrPartition = errors.New("eventhubs: no such partition")

// partition is one partition's log. events[head:] are retained, in sequence order.
type partition struct {
	events  []Event
	head    int
	bytes   int64
	nextSeq int64
	nextOff int64
	last    time.Time // enqueued time of the newest event ever
	// wake is closed (and replaced) on every append.
	wake chan struct{}
	// pending are appended events not yet written; begin is the lowest retained sequence number
	// the file must keep.
	pending []Event
	dirty   bool
}

func (p *partition) retained() []Event { return p.events[p.head:] }

// Store is the event store. Its methods are safe for concurrent use.
type Store struct {
	cfg Config
	log *zap.Logger
	db  *bolt.DB

	mu      sync.Mutex
	parts   []*partition
	groups  map[string]string // lower-case name → name as created
	closed  bool
	created time.Time

	flushMu sync.Mutex
	stop    chan struct{}
	done    chan struct{}
	once    sync.Once
}

var (
	metaBucket   = []byte("meta")
	groupsBucket = []byte("consumergroups")
	keyCount     = []byte("partitions")
	keyCreated   = []byte("created")
)

func partBucket(p int) []byte { return []byte(fmt.Sprintf("partition-%d", p)) }

// Open opens (or creates) the store.
func Open(cfg Config) (*Store, error) {
	if cfg.Partitions == 0 {
		cfg.Partitions = DefaultPartitions
	}
	if cfg.Partitions < 1 || cfg.Partitions > MaxPartitions {
		return nil, fmt.Errorf("eventhubs: %d partitions: want 1 to %d", cfg.Partitions, MaxPartitions)
	}
	if cfg.MaxEvents <= 0 {
		cfg.MaxEvents = DefaultMaxEvents
	}
	if cfg.MaxBytes <= 0 {
		cfg.MaxBytes = DefaultMaxBytes
	}
	if cfg.Retention <= 0 {
		cfg.Retention = DefaultRetention
	}
	if cfg.FlushInterval <= 0 {
		cfg.FlushInterval = DefaultFlushInterval
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.Real()
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	s := &Store{cfg: cfg, log: cfg.Logger, groups: map[string]string{strings.ToLower(DefaultConsumerGroup): DefaultConsumerGroup},
		stop: make(chan struct{}), done: make(chan struct{})}
	s.created = cfg.Clock.Now().UTC().Truncate(time.Millisecond)
	s.parts = make([]*partition, cfg.Partitions)
	for i := range s.parts {
		s.parts[i] = &partition{wake: make(chan struct{})}
	}
	if cfg.Path != "" {
		db, err := bolt.Open(cfg.Path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
		if errors.Is(err, bolterrors.ErrTimeout) {
			return nil, fmt.Errorf("eventhubs: %s is locked (is another hubsim using this state directory?)", cfg.Path)
		}
		if err != nil {
			return nil, fmt.Errorf("eventhubs: %w", err)
		}
		s.db = db
		if err := s.load(); err != nil {
			_ = db.Close()
			return nil, err
		}
	}
	go s.flusher()
	return s, nil
}

// load reads the file into memory, applying retention.
func (s *Store) load() error {
	now := s.cfg.Clock.Now()
	return s.db.Update(func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucketIfNotExists(metaBucket)
		if err != nil {
			return err
		}
		if v := meta.Get(keyCount); v != nil {
			if n := int(binary.BigEndian.Uint32(v)); n != s.cfg.Partitions {
				return fmt.Errorf("eventhubs: %s was created with %d partitions, not %d (a hub's partition count is fixed at creation; use another state directory)",
					s.cfg.Path, n, s.cfg.Partitions)
			}
		} else if err := meta.Put(keyCount, binary.BigEndian.AppendUint32(nil, uint32(s.cfg.Partitions))); err != nil {
			return err
		}
		if v := meta.Get(keyCreated); len(v) == 8 {
			s.created = time.UnixMilli(int64(binary.BigEndian.Uint64(v))).UTC()
		} else if err := meta.Put(keyCreated, binary.BigEndian.AppendUint64(nil, uint64(s.created.UnixMilli()))); err != nil {
			return err
		}
		groups, err := tx.CreateBucketIfNotExists(groupsBucket)
		if err != nil {
			return err
		}
		if err := groups.ForEach(func(k, v []byte) error {
			s.groups[string(k)] = string(v)
			return nil
		}); err != nil {
			return err
		}
		for i, p := range s.parts {
			if v := meta.Get(nextKey(i)); len(v) == 24 {
				p.nextSeq = int64(binary.BigEndian.Uint64(v))
				p.nextOff = int64(binary.BigEndian.Uint64(v[8:]))
				if ms := int64(binary.BigEndian.Uint64(v[16:])); ms != 0 {
					p.last = time.UnixMilli(ms).UTC()
				}
			}
			b, err := tx.CreateBucketIfNotExists(partBucket(i))
			if err != nil {
				return err
			}
			var bad int
			if err := b.ForEach(func(k, v []byte) error {
				var e Event
				if err := json.Unmarshal(v, &e); err != nil || len(k) != 8 || e.SequenceNumber != int64(binary.BigEndian.Uint64(k)) {
					bad++
					return nil
				}
				e.Partition = i
				p.events = append(p.events, e)
				p.bytes += e.size()
				return nil
			}); err != nil {
				return err
			}
			if bad > 0 {
				s.log.Warn("unreadable events skipped", zap.Int("partition", i), zap.Int("count", bad))
			}
			if n := len(p.events); n > 0 && p.events[n-1].SequenceNumber >= p.nextSeq {
				last := p.events[n-1]
				p.nextSeq, p.nextOff, p.last = last.SequenceNumber+1, last.Offset+last.size(), last.EnqueuedTime
			}
			s.trim(p, now)
			p.dirty = true // write the trimmed state and the counters back
		}
		return nil
	})
}

func nextKey(p int) []byte { return []byte(fmt.Sprintf("next-%d", p)) }

// CreatedAt is when the store was first created (kept across restarts).
func (s *Store) CreatedAt() time.Time { return s.created }

// Partitions is the partition count.
func (s *Store) Partitions() int { return s.cfg.Partitions }

// PartitionIDs are the partition ids, "0" to "n-1".
func (s *Store) PartitionIDs() []string {
	ids := make([]string, s.cfg.Partitions)
	for i := range ids {
		ids[i] = PartitionID(i)
	}
	return ids
}

// Append stores e (Body, Properties, System and Annotations set by the caller) in the
// partition of deviceID, stamping partition, sequence number, offset and enqueued time, and
// wakes the partition's readers. It never waits for the disk. It returns the stored event.
func (s *Store) Append(deviceID string, e Event) Event {
	pi := PartitionFor(deviceID, s.cfg.Partitions)
	now := s.cfg.Clock.Now().UTC().Truncate(time.Millisecond) // AMQP timestamps are milliseconds
	s.mu.Lock()
	p := s.parts[pi]
	e.Partition = pi
	e.SequenceNumber = p.nextSeq
	e.Offset = p.nextOff
	if now.Before(p.last) {
		now = p.last // enqueued times never go backwards within a partition
	}
	e.EnqueuedTime = now
	sz := e.size()
	p.nextSeq++
	p.nextOff += sz
	p.last = now
	p.events = append(p.events, e)
	p.bytes += sz
	s.trim(p, now)
	if s.db != nil && !s.closed {
		p.pending = append(p.pending, e)
		p.dirty = true
	}
	close(p.wake)
	p.wake = make(chan struct{})
	s.mu.Unlock()
	return e
}

// trim drops what retention no longer allows and compacts the slice. Call with s.mu held.
func (s *Store) trim(p *partition, now time.Time) {
	cut := now.Add(-s.cfg.Retention)
	for p.head < len(p.events) {
		e := &p.events[p.head]
		n := len(p.events) - p.head
		if n <= s.cfg.MaxEvents && p.bytes <= s.cfg.MaxBytes && !e.EnqueuedTime.Before(cut) {
			break
		}
		p.bytes -= e.size()
		p.events[p.head] = Event{} // let the body go
		p.head++
		p.dirty = true
	}
	if p.head > 0 && p.head >= len(p.events)/2 {
		p.events = append(p.events[:0:0], p.events[p.head:]...)
		p.head = 0
	}
	if len(p.pending) > 0 && p.head < len(p.events) {
		// Pending events already gone need not be written.
		begin := p.events[p.head].SequenceNumber
		if i := sort.Search(len(p.pending), func(i int) bool { return p.pending[i].SequenceNumber >= begin }); i > 0 {
			p.pending = append(p.pending[:0:0], p.pending[i:]...)
		}
	} else if p.head == len(p.events) {
		p.pending = nil
	}
}

func (s *Store) part(i int) (*partition, error) {
	if i < 0 || i >= len(s.parts) {
		return nil, fmt.Errorf("%w: %d (the hub has %d)", ErrPartition, i, len(s.parts))
	}
	return s.parts[i], nil
}

// Info describes partition i.
func (s *Store) Info(i int) (PartitionInfo, error) {
	p, err := s.part(i)
	if err != nil {
		return PartitionInfo{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.trim(p, s.cfg.Clock.Now())
	info := PartitionInfo{BeginSequenceNumber: p.nextSeq, LastSequenceNumber: p.nextSeq - 1, LastOffset: -1,
		LastEnqueuedTime: p.last, Empty: true}
	if r := p.retained(); len(r) > 0 {
		info.BeginSequenceNumber = r[0].SequenceNumber
		info.Empty = false
	}
	if p.nextSeq > 0 {
		if r := p.retained(); len(r) > 0 {
			info.LastOffset = r[len(r)-1].Offset
		} else {
			info.LastOffset = p.nextOff - 1 // the newest is gone; any offset below the next one
		}
	}
	return info, nil
}

// Start is the sequence number a receiver attached now at pos begins with in partition i: the
// first retained event the position admits, or the next one to be enqueued.
func (s *Store) Start(i int, pos Position) (int64, error) {
	p, err := s.part(i)
	if err != nil {
		return 0, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.trim(p, s.cfg.Clock.Now())
	r := p.retained()
	begin := p.nextSeq
	if len(r) > 0 {
		begin = r[0].SequenceNumber
	}
	var seq int64
	switch pos.Kind {
	case Latest:
		return p.nextSeq, nil
	case Sequence:
		seq = pos.Value + 1
		if pos.Inclusive {
			seq = pos.Value
		}
	case Offset:
		k := sort.Search(len(r), func(k int) bool {
			if pos.Inclusive {
				return r[k].Offset >= pos.Value
			}
			return r[k].Offset > pos.Value
		})
		seq = p.nextSeq
		if k < len(r) {
			seq = r[k].SequenceNumber
		}
	case Enqueued:
		ms := pos.Time.UnixMilli()
		k := sort.Search(len(r), func(k int) bool {
			t := r[k].EnqueuedTime.UnixMilli()
			if pos.Inclusive {
				return t >= ms
			}
			return t > ms
		})
		seq = p.nextSeq
		if k < len(r) {
			seq = r[k].SequenceNumber
		}
	}
	return max(seq, begin), nil
}

// Read returns up to max retained events of partition i from sequence number from on (events
// already gone are skipped), the sequence number to read from next, and a channel closed when
// the partition gets a new event (for a reader that has caught up).
func (s *Store) Read(i int, from int64, limit int) ([]Event, int64, <-chan struct{}, error) {
	p, err := s.part(i)
	if err != nil {
		return nil, from, nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	r := p.retained()
	wake := p.wake
	if len(r) == 0 || from >= p.nextSeq || limit <= 0 {
		return nil, max(from, 0), wake, nil
	}
	k := 0
	if from > r[0].SequenceNumber {
		k = int(from - r[0].SequenceNumber)
	}
	end := min(k+limit, len(r))
	out := slices.Clone(r[k:end])
	return out, out[len(out)-1].SequenceNumber + 1, wake, nil
}

// consumerGroupName is what Event Hubs allows: 1 to 50 letters, digits, '.', '_', '-', starting
// with a letter or digit.
var consumerGroupName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,49}$`)

// ErrConsumerGroup is returned for an invalid, existing or missing consumer group.
var ErrConsumerGroup = errors.New("eventhubs: consumer group")

// HasConsumerGroup reports whether name (any case) exists.
func (s *Store) HasConsumerGroup(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.groups[strings.ToLower(name)]
	return ok
}

// ConsumerGroups lists the consumer groups, sorted.
func (s *Store) ConsumerGroups() []string {
	s.mu.Lock()
	out := make([]string, 0, len(s.groups))
	for _, n := range s.groups {
		out = append(out, n)
	}
	s.mu.Unlock()
	slices.SortFunc(out, func(a, b string) int { return strings.Compare(strings.ToLower(a), strings.ToLower(b)) })
	return out
}

// CreateConsumerGroup adds a consumer group (persisted at once).
func (s *Store) CreateConsumerGroup(name string) error {
	if !consumerGroupName.MatchString(name) {
		return fmt.Errorf("%w %q: names are 1 to 50 letters, digits, '.', '_' or '-', starting with a letter or digit", ErrConsumerGroup, name)
	}
	key := strings.ToLower(name)
	s.mu.Lock()
	if _, ok := s.groups[key]; ok {
		s.mu.Unlock()
		return fmt.Errorf("%w %q already exists", ErrConsumerGroup, name)
	}
	s.groups[key] = name
	s.mu.Unlock()
	return s.putGroup(key, name)
}

// DeleteConsumerGroup removes a consumer group; $Default cannot be removed.
func (s *Store) DeleteConsumerGroup(name string) error {
	key := strings.ToLower(name)
	if key == strings.ToLower(DefaultConsumerGroup) {
		return fmt.Errorf("%w %s cannot be deleted", ErrConsumerGroup, DefaultConsumerGroup)
	}
	s.mu.Lock()
	if _, ok := s.groups[key]; !ok {
		s.mu.Unlock()
		return fmt.Errorf("%w %q does not exist", ErrConsumerGroup, name)
	}
	delete(s.groups, key)
	s.mu.Unlock()
	return s.putGroup(key, "")
}

func (s *Store) putGroup(key, name string) error {
	if s.db == nil {
		return nil
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(groupsBucket)
		if name == "" {
			return b.Delete([]byte(key))
		}
		return b.Put([]byte(key), []byte(name))
	})
}

func (s *Store) flusher() {
	defer close(s.done)
	if s.db == nil {
		<-s.stop
		return
	}
	t := s.cfg.Clock.NewTimer(s.cfg.FlushInterval)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C():
			if err := s.Flush(); err != nil {
				s.log.Error("writing events failed", zap.Error(err))
			}
			t.Reset(s.cfg.FlushInterval)
		}
	}
}

// flushWork is one partition's share of a flush.
type flushWork struct {
	pending []Event
	begin   int64
	nextSeq int64
	nextOff int64
	last    time.Time
}

// Flush writes new events and retention's removals to the file now.
func (s *Store) Flush() error {
	if s.db == nil {
		return nil
	}
	s.flushMu.Lock()
	defer s.flushMu.Unlock()
	now := s.cfg.Clock.Now()
	work := make(map[int]flushWork)
	s.mu.Lock()
	for i, p := range s.parts {
		s.trim(p, now)
		if !p.dirty {
			continue
		}
		w := flushWork{pending: p.pending, begin: p.nextSeq, nextSeq: p.nextSeq, nextOff: p.nextOff, last: p.last}
		if r := p.retained(); len(r) > 0 {
			w.begin = r[0].SequenceNumber
		}
		work[i] = w
		p.pending, p.dirty = nil, false
	}
	s.mu.Unlock()
	if len(work) == 0 {
		return nil
	}
	err := s.db.Update(func(tx *bolt.Tx) error {
		meta := tx.Bucket(metaBucket)
		for i, w := range work {
			b := tx.Bucket(partBucket(i))
			for _, e := range w.pending {
				v, err := json.Marshal(e)
				if err != nil {
					return err
				}
				if err := b.Put(binary.BigEndian.AppendUint64(nil, uint64(e.SequenceNumber)), v); err != nil {
					return err
				}
			}
			c := b.Cursor()
			for k, _ := c.First(); k != nil && int64(binary.BigEndian.Uint64(k)) < w.begin; k, _ = c.Next() {
				if err := c.Delete(); err != nil {
					return err
				}
			}
			var ms int64
			if !w.last.IsZero() {
				ms = w.last.UnixMilli()
			}
			v := binary.BigEndian.AppendUint64(nil, uint64(w.nextSeq))
			v = binary.BigEndian.AppendUint64(v, uint64(w.nextOff))
			v = binary.BigEndian.AppendUint64(v, uint64(ms))
			if err := meta.Put(nextKey(i), v); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		// Keep the work for the next try: mark the partitions dirty with their events back.
		s.mu.Lock()
		for i, w := range work {
			p := s.parts[i]
			p.pending = append(w.pending, p.pending...)
			p.dirty = true
		}
		s.mu.Unlock()
	}
	return err
}

// Close stops the flusher, writes what is pending and closes the file. Readers waiting on a
// partition are not woken: their owners stop them.
func (s *Store) Close() error {
	var err error
	s.once.Do(func() {
		close(s.stop)
		<-s.done
		err = s.Flush()
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		if s.db != nil {
			err = errors.Join(err, s.db.Close())
		}
	})
	return err
}

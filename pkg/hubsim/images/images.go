// Package images is hubsim's firmware image store, an addition under /hubsim/images that Azure
// does not have: images uploaded with the service's SAS auth, persisted in the state directory
// and bounded in total size, and downloaded over hubsim's HTTPS listener by anyone holding the
// image's URL, which carries an unguessable token (an HMAC of the name under a secret kept in
// the state directory), because the agent's firmware downloader does a plain HTTPS GET. Downloads
// honour Range (so interrupted ones resume) and take two test knobs in the query, cutAt (end
// the response at that byte offset of the image) and rate (bytes per second), so resume can be
// demonstrated. Every download request is logged with its Range header.
package images

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/internal/atomicfile"
	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/wire"
)

// Defaults for Config.
const (
	DefaultMaxTotal   = 1 << 30   // 1 GiB across all images
	DefaultMaxUpload  = 256 << 20 // 256 MiB per image
	DefaultMaxUploads = 4         // uploads in progress at once
	maxNameLen        = 128
)

// Errors (service error shapes, as the REST API answers them).
var (
	ErrNotFound     = wire.ServiceError{Status: 404, Code: "ImageNotFound", Number: 404000}
	ErrTooLarge     = wire.ErrMessageTooLarge
	ErrStoreFull    = wire.ServiceError{Status: 507, Code: "ImageStoreFull", Number: 507000}
	ErrBadName      = wire.ErrArgumentInvalid
	ErrForbidden    = wire.ServiceError{Status: 403, Code: "ImageTokenInvalid", Number: 403000}
	ErrBusy         = wire.ErrThrottled
	errUploadFailed = wire.ErrArgumentInvalid
)

// Config configures a Store.
type Config struct {
	// Dir holds the images, their index and the URL token secret (created 0700).
	Dir string
	// MaxTotal bounds the bytes of all images together (default DefaultMaxTotal); MaxUpload one
	// image (default DefaultMaxUpload); MaxUploads the uploads in progress (default 4).
	MaxTotal   int64
	MaxUpload  int64
	MaxUploads int
	// Clock paces throttled downloads and stamps uploads (default clock.Real()).
	Clock  clock.Clock
	Logger *zap.Logger
}

// Image is one stored image, as listed and as an upload answers.
type Image struct {
	Name     string    `json:"name"`
	Size     int64     `json:"size"`
	SHA256   string    `json:"sha256"`
	Uploaded time.Time `json:"uploaded"`
	// URL is where the image downloads from, token included (filled in per request: the host
	// is the one the request reached).
	URL string `json:"url,omitempty"`
	// Blob is the file under Dir/blobs holding the bytes (a replaced image gets a new one); it
	// is kept in the index, not shown by the API.
	Blob string `json:"blob,omitempty"`
}

// Store is the image store. It is safe for concurrent use.
type Store struct {
	cfg     Config
	log     *zap.Logger
	secret  []byte
	uploads chan struct{} // semaphore

	// persistMu serialises index writes (held across the write, never by downloads).
	persistMu sync.Mutex

	mu     sync.Mutex
	images map[string]Image
	total  int64
}

const (
	indexFile  = "index.json"
	secretFile = "url-secret"
	blobDir    = "blobs"
)

// Open loads (or creates) the store in cfg.Dir.
func Open(cfg Config) (*Store, error) {
	if cfg.Dir == "" {
		return nil, errors.New("images: Dir is required")
	}
	if cfg.MaxTotal <= 0 {
		cfg.MaxTotal = DefaultMaxTotal
	}
	if cfg.MaxUpload <= 0 {
		cfg.MaxUpload = DefaultMaxUpload
	}
	if cfg.MaxUploads <= 0 {
		cfg.MaxUploads = DefaultMaxUploads
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.Real()
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if err := os.MkdirAll(filepath.Join(cfg.Dir, blobDir), 0o700); err != nil {
		return nil, fmt.Errorf("images: %w", err)
	}
	s := &Store{cfg: cfg, log: cfg.Logger, images: map[string]Image{}, uploads: make(chan struct{}, cfg.MaxUploads)}
	secret, err := os.ReadFile(filepath.Join(cfg.Dir, secretFile))
	switch {
	case errors.Is(err, os.ErrNotExist):
		secret = make([]byte, 32)
		if _, err := rand.Read(secret); err != nil {
			return nil, fmt.Errorf("images: %w", err)
		}
		if err := atomicfile.WriteFile(filepath.Join(cfg.Dir, secretFile), secret, 0o600); err != nil {
			return nil, fmt.Errorf("images: %w", err)
		}
	case err != nil:
		return nil, fmt.Errorf("images: %w", err)
	case len(secret) < 32:
		return nil, fmt.Errorf("images: %s is shorter than 32 bytes", filepath.Join(cfg.Dir, secretFile))
	}
	s.secret = secret
	b, err := os.ReadFile(filepath.Join(cfg.Dir, indexFile))
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("images: %w", err)
	default:
		var list []Image
		if err := json.Unmarshal(b, &list); err != nil {
			return nil, fmt.Errorf("images: %s is corrupt: %w", filepath.Join(cfg.Dir, indexFile), err)
		}
		for _, im := range list {
			fi, err := os.Stat(s.blobPath(im.Blob))
			if err != nil || fi.Size() != im.Size || validName(im.Name) != nil {
				s.log.Warn("image dropped from the index: its file is missing or the wrong size", zap.String("image", im.Name))
				continue
			}
			im.URL = ""
			s.images[im.Name] = im
			s.total += im.Size
		}
	}
	s.removeStrayBlobs()
	return s, nil
}

func (s *Store) blobPath(blob string) string {
	return filepath.Join(s.cfg.Dir, blobDir, filepath.Base(blob))
}

// removeStrayBlobs deletes blob files no image refers to (an upload cut short by a crash).
func (s *Store) removeStrayBlobs() {
	entries, err := os.ReadDir(filepath.Join(s.cfg.Dir, blobDir))
	if err != nil {
		return
	}
	used := map[string]bool{}
	for _, im := range s.images {
		used[im.Blob] = true
	}
	for _, e := range entries {
		if !used[e.Name()] {
			_ = os.Remove(filepath.Join(s.cfg.Dir, blobDir, e.Name()))
		}
	}
}

// validName accepts 1 to 128 characters of letters, digits, '.', '_' and '-', not starting
// with '.'.
func validName(name string) error {
	if name == "" || len(name) > maxNameLen || name[0] == '.' {
		return ErrBadName.WithText("image name must be 1 to %d characters, not starting with '.'", maxNameLen)
	}
	for _, c := range []byte(name) {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == '-':
		default:
			return ErrBadName.WithText("image name may hold only letters, digits, '.', '_' and '-'")
		}
	}
	return nil
}

// Token is the download token of an image name: base64url of HMAC-SHA256 under the store's
// secret. It does not expire; deleting the image revokes it, and a new image under the same
// name keeps it (the manifest's SHA-256 is what protects the device).
func (s *Store) Token(name string) string {
	m := hmac.New(sha256.New, s.secret)
	m.Write([]byte("iothubby-image-v1\n" + name))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

func (s *Store) tokenOK(name, tok string) bool {
	return hmac.Equal([]byte(tok), []byte(s.Token(name)))
}

// Put stores the image read from r under name, replacing one of that name. It reads at most
// MaxUpload bytes (more is ErrTooLarge, and nothing is kept) and fails with ErrStoreFull when
// the images would exceed MaxTotal together; ErrBusy when MaxUploads are in progress. The
// second result says whether an image was replaced.
func (s *Store) Put(name string, r io.Reader) (Image, bool, error) {
	if err := validName(name); err != nil {
		return Image{}, false, err
	}
	select {
	case s.uploads <- struct{}{}:
		defer func() { <-s.uploads }()
	default:
		return Image{}, false, ErrBusy.WithText("%d image uploads are in progress; try again", s.cfg.MaxUploads)
	}
	f, err := os.CreateTemp(filepath.Join(s.cfg.Dir, blobDir), "blob-")
	if err != nil {
		return Image{}, false, fmt.Errorf("images: %w", err)
	}
	blob := filepath.Base(f.Name())
	keep := false
	defer func() {
		if !keep {
			f.Close()
			_ = os.Remove(f.Name())
		}
	}()
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(f, h), io.LimitReader(r, s.cfg.MaxUpload+1))
	if err != nil {
		return Image{}, false, errUploadFailed.WithText("reading the image: %v", err)
	}
	if n > s.cfg.MaxUpload {
		return Image{}, false, ErrTooLarge.WithText("image larger than %d bytes", s.cfg.MaxUpload)
	}
	if n == 0 {
		return Image{}, false, ErrBadName.WithText("image is empty")
	}
	if err := f.Sync(); err != nil {
		return Image{}, false, fmt.Errorf("images: %w", err)
	}
	if err := f.Close(); err != nil {
		return Image{}, false, fmt.Errorf("images: %w", err)
	}
	im := Image{Name: name, Size: n, SHA256: hex.EncodeToString(h.Sum(nil)), Uploaded: s.cfg.Clock.Now().UTC(), Blob: blob}

	s.persistMu.Lock()
	defer s.persistMu.Unlock()
	s.mu.Lock()
	old, replaced := s.images[name]
	if s.total-old.Size+n > s.cfg.MaxTotal {
		total := s.total
		s.mu.Unlock()
		return Image{}, false, ErrStoreFull.WithText("the store holds %d of %d bytes; %d more do not fit (delete images or raise --image-max-total)", total, s.cfg.MaxTotal, n)
	}
	s.images[name] = im
	s.total += n - old.Size
	index := s.indexLocked()
	s.mu.Unlock()
	if err := s.writeIndex(index); err != nil {
		s.mu.Lock()
		if cur, ok := s.images[name]; ok && cur.Blob == blob {
			s.total -= n - old.Size
			if replaced {
				s.images[name] = old
			} else {
				delete(s.images, name)
			}
		}
		s.mu.Unlock()
		return Image{}, false, err
	}
	keep = true
	if replaced {
		_ = os.Remove(s.blobPath(old.Blob))
	}
	s.log.Info("image stored", zap.String("image", name), zap.Int64("size", n), zap.String("sha256", im.SHA256), zap.Bool("replaced", replaced))
	return im, replaced, nil
}

func (s *Store) indexLocked() []Image {
	list := make([]Image, 0, len(s.images))
	for _, im := range s.images {
		im.URL = ""
		list = append(list, im)
	}
	slices.SortFunc(list, func(a, b Image) int {
		switch {
		case a.Name < b.Name:
			return -1
		case a.Name > b.Name:
			return 1
		}
		return 0
	})
	return list
}

func (s *Store) writeIndex(list []Image) error {
	b, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(s.cfg.Dir, indexFile), b, 0o600); err != nil {
		return fmt.Errorf("images: write index: %w", err)
	}
	return nil
}

// List returns the images by name, with the total size.
func (s *Store) List() ([]Image, int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.indexLocked(), s.total
}

// Get returns one image.
func (s *Store) Get(name string) (Image, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	im, ok := s.images[name]
	return im, ok
}

// Delete removes an image (ErrNotFound if there is none).
func (s *Store) Delete(name string) error {
	s.persistMu.Lock()
	defer s.persistMu.Unlock()
	s.mu.Lock()
	im, ok := s.images[name]
	if !ok {
		s.mu.Unlock()
		return ErrNotFound.WithText("no image named %q", name)
	}
	delete(s.images, name)
	s.total -= im.Size
	index := s.indexLocked()
	s.mu.Unlock()
	if err := s.writeIndex(index); err != nil {
		s.mu.Lock()
		if _, again := s.images[name]; !again {
			s.images[name] = im
			s.total += im.Size
		}
		s.mu.Unlock()
		return err
	}
	_ = os.Remove(s.blobPath(im.Blob)) // a download in progress keeps its open file
	s.log.Info("image deleted", zap.String("image", name))
	return nil
}

// open opens an image's bytes for a download.
func (s *Store) open(name string) (*os.File, Image, error) {
	for range 2 { // a replace between the lookup and the open: look again
		im, ok := s.Get(name)
		if !ok {
			return nil, im, ErrNotFound.WithText("no image named %q", name)
		}
		f, err := os.Open(s.blobPath(im.Blob))
		if err == nil {
			return f, im, nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return nil, im, fmt.Errorf("images: %w", err)
		}
	}
	return nil, Image{}, ErrNotFound.WithText("image %q was replaced during the request; try again", name)
}

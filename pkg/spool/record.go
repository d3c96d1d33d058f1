package spool

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// A record on disk is a 16-byte header followed by the payload:
//
//	[0:4]   payload length, little endian
//	[4:8]   CRC-32C of bytes [8:16+length] (the sequence number and the payload)
//	[8:16]  sequence number, little endian
//	[16:]   payload
const headerSize = 16

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Errors of decodeRecord. A truncated record is what a crash in the middle of a write leaves.
var (
	errTruncated = errors.New("truncated record")
	errChecksum  = errors.New("checksum mismatch")
	errTooLarge  = errors.New("record length beyond the limit")
)

// appendRecord appends the encoding of (seq, payload) to dst.
func appendRecord(dst []byte, seq uint64, payload []byte) []byte {
	var h [headerSize]byte
	binary.LittleEndian.PutUint32(h[0:4], uint32(len(payload)))
	binary.LittleEndian.PutUint64(h[8:16], seq)
	c := crc32.Update(0, castagnoli, h[8:16])
	c = crc32.Update(c, castagnoli, payload)
	binary.LittleEndian.PutUint32(h[4:8], c)
	dst = append(dst, h[:]...)
	return append(dst, payload...)
}

// decodeRecord decodes the record at the start of b. It returns the record's sequence number,
// its payload (a sub-slice of b) and its encoded length, or an error matching errTruncated,
// errChecksum or errTooLarge. A payload longer than maxPayload is an error whatever follows, so
// a corrupted length never makes the reader allocate or skip far.
func decodeRecord(b []byte, maxPayload int) (seq uint64, payload []byte, n int, err error) {
	if len(b) < headerSize {
		return 0, nil, 0, fmt.Errorf("%w: %d header bytes of %d", errTruncated, len(b), headerSize)
	}
	size := binary.LittleEndian.Uint32(b[0:4])
	if uint64(size) > uint64(maxPayload) {
		return 0, nil, 0, fmt.Errorf("%w: %d bytes, limit %d", errTooLarge, size, maxPayload)
	}
	end := headerSize + int(size)
	if len(b) < end {
		return 0, nil, 0, fmt.Errorf("%w: %d of %d bytes", errTruncated, len(b), end)
	}
	want := binary.LittleEndian.Uint32(b[4:8])
	if got := crc32.Checksum(b[8:end], castagnoli); got != want {
		return 0, nil, 0, fmt.Errorf("%w: crc %08x, header says %08x", errChecksum, got, want)
	}
	return binary.LittleEndian.Uint64(b[8:16]), b[headerSize:end], end, nil
}

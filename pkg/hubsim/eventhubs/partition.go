package eventhubs

import "strconv"

// logicalPartitions is how many logical partitions the hub maps keys onto before spreading them
// over the real ones (short.MaxValue in Microsoft's resolver).
const logicalPartitions = 32767

// PartitionFor is the partition a device's events go to among count partitions, as IoT Hub's own
// resolver picks it (Microsoft.Azure.Devices.Common EventHubPartitionKeyResolver, the same
// function as the C SDK test tool's ResolvePartitionIndex; protocol-amqp.md §4.7): the device ID
// upper-cased as ASCII, Jenkins lookup3 hashlittle2 with seeds 0/0, the two halves XORed and
// truncated to 16 bits, the absolute remainder modulo 32767 as a logical partition, and the
// logical partitions split into count contiguous ranges (the first ones one wider).
func PartitionFor(deviceID string, count int) int {
	if count <= 1 {
		return 0
	}
	key := make([]byte, 0, len(deviceID))
	for _, r := range deviceID {
		switch {
		case r >= 'a' && r <= 'z':
			key = append(key, byte(r-'a'+'A'))
		case r < 0x80:
			key = append(key, byte(r))
		default:
			key = append(key, '?') // Encoding.ASCII's replacement
		}
	}
	h1, h2 := hashlittle2(key, 0, 0)
	h := int16(h1 ^ h2)
	logical := int(h % logicalPartitions) // Go's % truncates toward zero, as C#'s
	if logical < 0 {
		logical = -logical
	}
	short := logicalPartitions / count
	remaining := logicalPartitions - count*short
	large := short + 1
	inLarge := large * remaining
	if logical < inLarge {
		return logical / large
	}
	return remaining + (logical-inLarge)/short
}

// PartitionID is the string form of a partition index ("0", "1", ...).
func PartitionID(p int) string { return strconv.Itoa(p) }

func rot(x uint32, k uint) uint32 { return x<<k | x>>(32-k) }

// hashlittle2 is Bob Jenkins' lookup3 hashlittle2 (public domain): it returns the primary (c)
// and secondary (b) hashes of key.
func hashlittle2(key []byte, pc, pb uint32) (uint32, uint32) {
	a := 0xdeadbeef + uint32(len(key)) + pc
	b, c := a, a+pb
	le := func(p []byte) uint32 { return uint32(p[0]) | uint32(p[1])<<8 | uint32(p[2])<<16 | uint32(p[3])<<24 }
	k := key
	for len(k) > 12 {
		a += le(k[0:])
		b += le(k[4:])
		c += le(k[8:])
		a -= c
		a ^= rot(c, 4)
		c += b
		b -= a
		b ^= rot(a, 6)
		a += c
		c -= b
		c ^= rot(b, 8)
		b += a
		a -= c
		a ^= rot(c, 16)
		c += b
		b -= a
		b ^= rot(a, 19)
		a += c
		c -= b
		c ^= rot(b, 4)
		b += a
		k = k[12:]
	}
	if len(k) == 0 {
		return c, b
	}
	var tail [12]byte
	copy(tail[:], k)
	// Bytes past the key's end are zero, so adding whole words is the same as lookup3's switch.
	switch {
	case len(k) > 8:
		c += le(tail[8:])
		fallthrough
	case len(k) > 4:
		b += le(tail[4:])
		fallthrough
	default:
		a += le(tail[0:])
	}
	c ^= b
	c -= rot(b, 14)
	a ^= c
	a -= rot(c, 11)
	b ^= a
	b -= rot(a, 25)
	c ^= b
	c -= rot(b, 16)
	a ^= c
	a -= rot(c, 4)
	b ^= a
	b -= rot(a, 14)
	c ^= b
	c -= rot(b, 24)
	return c, b
}

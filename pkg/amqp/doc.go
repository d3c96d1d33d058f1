// Package amqp is a codec for AMQP 1.0 (OASIS, ISO/IEC 19464): the type system, the frame
// headers, the connection, session and link performatives, SASL and the bare and annotated
// message format. It does no I/O: the hubsim AMQP server (pkg/hubsim/amqp) reads frames from
// its sockets and hands their bytes here.
//
// Values decode to plain Go types:
//
//	null → nil              boolean → bool          ubyte/ushort/uint/ulong → uint8/16/32/64
//	byte/short/int/long → int8/16/32/64             float/double → float32/float64
//	char → Char             timestamp → time.Time   uuid → UUID          binary → []byte
//	string → string         symbol → Symbol         list → []any         map → Map
//	array → Array           described → Described   decimal32/64/128 → Decimal
//
// and encode from the same types (plus int and uint, written as long and ulong). Decoding is
// strict: it rejects unknown constructors, sizes that overrun their buffer, element counts that
// cannot fit in the bytes left, nesting deeper than Limits.MaxDepth, strings that are not
// UTF-8 and symbols that are not ASCII, and returns an error that says where (a *DecodeError).
package amqp

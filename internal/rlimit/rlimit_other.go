//go:build !unix

package rlimit

import "errors"

var errUnsupported = errors.New("open-file limits are not supported on this platform")

func get() (soft, hard uint64, err error) { return 0, 0, errUnsupported }

func set(soft, hard uint64) error { return errUnsupported }

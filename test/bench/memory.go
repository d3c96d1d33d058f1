package main

import (
	"context"
	"errors"
)

func benchMemory(ctx context.Context, binDir string, n int, report func(string, float64, bool, string)) error {
	return errors.New("not yet")
}

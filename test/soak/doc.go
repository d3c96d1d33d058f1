// Package soak is iothubby's fault soak: hubsim and several agents (real binaries, real sockets)
// run for a bounded time (SOAK, default 10m) through a seeded schedule of faults (hubsim's fault
// admin API, hubsim and agent SIGKILLs with restarts) while a driver changes desired properties
// and calls direct methods; at the end it checks invariants (telemetry accounted for, reported
// state converged, one answer per method call, desired versions applied in order, no resource
// growth) and prints a table. The runner is soak_test.go (build tag soak, `make soak`); this
// package's untagged code is the bookkeeping and the checks, unit-tested with the other packages.
package soak

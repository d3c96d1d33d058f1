// Package hygiene holds repository-wide checks that run with the unit tests: every package has
// a doc comment, no library package keeps mutable state at package level through init, and the
// dependency rules (hubsim never links the agent's MQTT client; pkg/twin stays pure) hold.
package hygiene

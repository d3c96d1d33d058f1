// Package hygiene holds repository-wide checks that run with the unit tests: every package has
// a doc comment, and no library package keeps mutable state at package level through init.
package hygiene

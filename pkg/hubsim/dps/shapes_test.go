package dps

import (
	"flag"
	"testing"

	"github.com/iothubby/iothubby/internal/golden"
)

var updateGolden = flag.Bool("update", false, "rewrite testdata/golden/*.json from the current output")

func goldenJSON(t *testing.T, name string, v any) { t.Helper(); golden.JSON(t, name, v, *updateGolden) }

// TestBulkResultWireShape pins the JSON of the answer to a bulk enrollment operation.
func TestBulkResultWireShape(t *testing.T) {
	goldenJSON(t, "bulk-result", BulkResult{Errors: []BulkError{{RegistrationID: "reg-1", ErrorCode: 409203, ErrorStatus: "conflict"}, {EnrollmentGroupID: "grp-1", ErrorCode: 400004, ErrorStatus: "bad"}}})
}

package query

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

// twinsJSON are the rows the table runs over: twins as hubsim serves them.
const twinsJSON = `[
 {"deviceId":"a1","status":"enabled","connectionState":"Connected","capabilities":{"iotEdge":false},
  "tags":{"site":"north","floor":1,"owner":"Ann"},
  "properties":{"desired":{"fw":"1.0","$version":2},"reported":{"fw":"1.0","temp":21.5,"$version":3}}},
 {"deviceId":"a2","status":"disabled","connectionState":"Disconnected","capabilities":{"iotEdge":true},
  "tags":{"site":"north","floor":2,"owner":null},
  "properties":{"desired":{"fw":"2.0"},"reported":{"fw":"1.0","temp":30}}},
 {"deviceId":"b1","status":"enabled","connectionState":"Disconnected","capabilities":{"iotEdge":false},
  "tags":{"site":"south","floor":2,"list":[1,2]},
  "properties":{"desired":{},"reported":{"fw":"2.0"}}},
 {"deviceId":"c1","status":"enabled","connectionState":"Connected","capabilities":{"iotEdge":false},
  "tags":{},
  "properties":{"desired":{},"reported":{}}}
]`

func rows(t *testing.T) []map[string]any {
	t.Helper()
	var out []map[string]any
	dec := json.NewDecoder(strings.NewReader(twinsJSON))
	dec.UseNumber()
	if err := dec.Decode(&out); err != nil {
		t.Fatal(err)
	}
	return out
}

func ids(res []any) string {
	var s []string
	for _, r := range res {
		s = append(s, r.(map[string]any)["deviceId"].(string))
	}
	return strings.Join(s, ",")
}

func TestQueryTable(t *testing.T) {
	for _, c := range []struct {
		q    string
		want string // device IDs for SELECT *, else the JSON of the result
	}{
		{"SELECT * FROM devices", "a1,a2,b1,c1"},
		{"select * from devices where tags.site = 'north'", "a1,a2"},
		{`SELECT * FROM devices WHERE tags.site = "north" AND tags.floor = 2`, "a2"},
		{"SELECT * FROM devices WHERE tags.site = 'north' OR tags.site = 'south'", "a1,a2,b1"},
		{"SELECT * FROM devices WHERE NOT tags.site = 'north'", "b1"},
		{"SELECT * FROM devices WHERE tags.site != 'north'", "b1"},
		{"SELECT * FROM devices WHERE tags.site <> 'south'", "a1,a2"},
		{"SELECT * FROM devices WHERE tags.floor >= 2", "a2,b1"},
		{"SELECT * FROM devices WHERE tags.floor < 2", "a1"},
		{"SELECT * FROM devices WHERE tags.floor + 1 = 3 AND tags.floor * 2 % 3 = 1", "a2,b1"},
		{"SELECT * FROM devices WHERE properties.reported.temp > 25", "a2"},
		{"SELECT * FROM devices WHERE properties.reported.temp = 21.5", "a1"},
		{"SELECT * FROM devices WHERE properties.desired.fw != properties.reported.fw", "a2"}, // b1 has no desired fw,
		{"SELECT * FROM devices WHERE deviceId IN ['a1', 'c1', 'zz']", "a1,c1"},
		{"SELECT * FROM devices WHERE deviceId NIN ['a1', 'c1']", "a2,b1"},
		{"SELECT * FROM devices WHERE tags.site NOT IN ['north']", "b1"},
		{"SELECT * FROM devices WHERE IS_DEFINED(tags.site)", "a1,a2,b1"},
		{"SELECT * FROM devices WHERE NOT IS_DEFINED(tags.site)", "c1"},
		{"SELECT * FROM devices WHERE IS_NULL(tags.owner)", "a2"},
		{"SELECT * FROM devices WHERE tags.owner = null", "a2"},
		{"SELECT * FROM devices WHERE IS_STRING(tags.owner)", "a1"},
		{"SELECT * FROM devices WHERE IS_NUMBER(tags.floor) AND IS_ARRAY(tags.list)", "b1"},
		{"SELECT * FROM devices WHERE IS_OBJECT(tags) AND IS_BOOL(capabilities.iotEdge) AND IS_PRIMITIVE(deviceId)", "a1,a2,b1,c1"},
		{"SELECT * FROM devices WHERE STARTSWITH(deviceId, 'a')", "a1,a2"},
		{"SELECT * FROM devices WHERE STARTS_WITH(deviceId, 'b') OR ENDSWITH(deviceId, '2')", "a2,b1"},
		{"SELECT * FROM devices WHERE CONTAINS(tags.site, 'ort')", "a1,a2"},
		{"SELECT * FROM devices WHERE LOWER(tags.owner) = 'ann' AND UPPER(tags.site) = 'NORTH'", "a1"},
		{"SELECT * FROM devices WHERE LENGTH(tags.site) = 5 AND SUBSTRING(tags.site, 0, 2) = 'so'", "b1"},
		{"SELECT * FROM devices WHERE CONCAT(tags.site, '-', deviceId) = 'north-a2'", "a2"},
		{"SELECT * FROM devices WHERE INDEX_OF(deviceId, '1') = 1", "a1,b1,c1"},
		{"SELECT * FROM devices WHERE status = 'enabled' AND connectionState = 'Connected'", "a1,c1"},
		{"SELECT * FROM devices WHERE capabilities.iotEdge = true", "a2"},
		{"SELECT * FROM devices WHERE devices.tags.site = 'south'", "b1"},
		{"SELECT * FROM devices WHERE DeviceId = 'b1'", "b1"},
		{"SELECT * FROM devices WHERE tags['site'] = 'south'", "b1"},
		{"SELECT * FROM devices WHERE (tags.site = 'north' OR deviceId = 'c1') AND status = 'enabled'", "a1,c1"},
		{"SELECT * FROM devices WHERE tags.floor = '2'", ""},    // no comparison across types
		{"SELECT * FROM devices WHERE tags.nothing != 'x'", ""}, // undefined is not true
		{"SELECT * FROM devices WHERE tags.floor = -1 + 3", "a2,b1"},
		{"SELECT TOP 2 * FROM devices", "a1,a2"},
		{"SELECT deviceId, tags.site FROM devices WHERE tags.floor = 2", `[{"deviceId":"a2","site":"north"},{"deviceId":"b1","site":"south"}]`},
		{"SELECT deviceId AS id, properties.reported.temp AS t FROM devices WHERE IS_DEFINED(properties.reported.temp)", `[{"id":"a1","t":21.5},{"id":"a2","t":30}]`},
		{"SELECT COUNT() AS n FROM devices", `[{"n":4}]`},
		{"SELECT COUNT() FROM devices WHERE tags.site = 'north'", `[{"$1":2}]`},
		{"SELECT tags.site, COUNT() AS n FROM devices GROUP BY tags.site", `[{"n":2,"site":"north"},{"n":1,"site":"south"},{"n":1}]`},
		{"SELECT properties.reported.fw AS fw, COUNT() AS n FROM devices WHERE IS_DEFINED(properties.reported.fw) GROUP BY properties.reported.fw", `[{"fw":"1.0","n":2},{"fw":"2.0","n":1}]`},
		{"SELECT SUM(tags.floor) AS s, AVG(tags.floor) AS a, MIN(tags.floor) AS lo, MAX(deviceId) AS hi, COUNT(tags.site) AS c FROM devices", `[{"a":1.6666666666666667,"c":3,"hi":"c1","lo":1,"s":5}]`},
	} {
		q, err := Parse(c.q)
		if err != nil {
			t.Errorf("%s: %v", c.q, err)
			continue
		}
		res := q.Run(rows(t))
		var got string
		if q.Star {
			got = ids(res)
		} else {
			b, _ := json.Marshal(res)
			got = string(b)
		}
		if got != c.want {
			t.Errorf("%s:\n got %s\nwant %s", c.q, got, c.want)
		}
	}
}

func TestDeviceJobsQuery(t *testing.T) {
	rows := []map[string]any{
		{"deviceId": "a", "jobId": "j1", "status": "completed"},
		{"deviceId": "b", "jobId": "j1", "status": "failed"},
		{"deviceId": "a", "jobId": "j2", "status": "completed"},
	}
	q, err := Parse("SELECT * FROM devices.jobs WHERE devices.jobs.jobId = 'j1' AND devices.jobs.status = 'failed'")
	if err != nil {
		t.Fatal(err)
	}
	if q.From != DeviceJobs || q.ItemType() != "DeviceJob" {
		t.Fatalf("from %v item type %s", q.From, q.ItemType())
	}
	if got := q.Run(rows); len(got) != 1 || got[0].(map[string]any)["deviceId"] != "b" {
		t.Errorf("got %v", got)
	}
}

func TestCondition(t *testing.T) {
	all, err := ParseCondition(" * ")
	if err != nil || all != nil {
		t.Fatalf("* gave %v %v", all, err)
	}
	c, err := ParseCondition("tags.site = 'north' AND deviceId IN ['a1']")
	if err != nil {
		t.Fatal(err)
	}
	r := rows(t)
	if !Match(c, Devices, r[0]) || Match(c, Devices, r[1]) {
		t.Errorf("condition %s matched wrongly", c)
	}
	if _, err := ParseCondition("tags.site = 'north' SELECT"); err == nil {
		t.Error("trailing garbage accepted")
	}
}

func TestErrorsArePositioned(t *testing.T) {
	for _, c := range []struct {
		q   string
		pos int
		msg string
	}{
		{"", 0, "starts with SELECT"},
		{"DELETE FROM devices", 0, "starts with SELECT"},
		{"SELECT * FROM devices.modules", 22, "no module identities"},
		{"SELECT * FROM routes", 14, "FROM supports devices"},
		{"SELECT * FROM devices WHERE tags.a = 'x", 37, "not closed"},
		{"SELECT * FROM devices WHERE tags.a ~ 1", 35, "unexpected character"},
		{"SELECT * FROM devices WHERE FOO(tags.a)", 28, "function FOO is not supported"},
		{"SELECT * FROM devices WHERE IS_DEFINED('x')", 28, "takes a property path"},
		{"SELECT * FROM devices WHERE STARTSWITH(deviceId)", 28, "takes 2 argument"},
		{"SELECT * FROM devices WHERE deviceId IN 'a'", 40, "takes a list"},
		{"SELECT * FROM devices WHERE tags.a = 1 ORDER BY deviceId", 39, "ORDER BY is not supported"},
		{"SELECT * FROM devices GROUP BY tags.a", 31, "needs an aggregate"},
		{"SELECT deviceId, COUNT() FROM devices", 7, "aggregate or a GROUP BY path"},
		{"SELECT COUNT() FROM devices WHERE COUNT() > 1", 34, "only allowed directly"},
		{"SELECT COUNT() FROM devices.jobs", 7, "not supported over devices.jobs"},
		{"SELECT TOP 0 * FROM devices", 11, "positive whole number"},
		{"SELECT * FROM devices WHERE tags.a = 1.2.3", 37, "not a number"},
		{"SELECT * FROM devices WHERE (tags.a = 1", 39, `expected ")"`},
		{"SELECT * FROM devices WHERE tags. = 1", 34, "property name"},
		{"SELECT * FROM devices WHERE " + strings.Repeat("(", 100) + "1" + strings.Repeat(")", 100), 92, "nests deeper"},
		{"SELECT * FROM devices WHERE tags.x = '" + strings.Repeat("a", MaxLength) + "'", MaxLength, "limit"},
	} {
		_, err := Parse(c.q)
		var qe *Error
		if !errors.As(err, &qe) {
			t.Errorf("%.60s: error %v is not a *query.Error", c.q, err)
			continue
		}
		if qe.Pos != c.pos || !strings.Contains(qe.Msg, c.msg) {
			t.Errorf("%.60s: got %v, want offset %d and %q", c.q, qe, c.pos, c.msg)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"SELECT * FROM devices WHERE tags.a = 1 AND NOT (deviceId IN ['x', \"y\"])",
		"SELECT deviceId, COUNT() AS n FROM devices GROUP BY deviceId",
		"SELECT * FROM devices.jobs WHERE devices.jobs.jobId = 'j'",
		"SELECT TOP 3 LOWER(tags.x) FROM devices WHERE STARTSWITH(deviceId, 'a') OR tags['k'] >= -2.5e3",
		"*", "tags.a = 1",
	} {
		f.Add(s)
	}
	r := []map[string]any{{"deviceId": "a", "tags": map[string]any{"a": 1.0, "k": "v"}}, {"deviceId": "b"}}
	f.Fuzz(func(t *testing.T, s string) {
		q, err := Parse(s)
		if err != nil {
			var qe *Error
			if !errors.As(err, &qe) || qe.Pos < 0 || qe.Pos > len(s) {
				t.Fatalf("bad error %v for %q", err, s)
			}
		} else {
			_ = q.Run(r)
			if _, err := Parse(s); err != nil {
				t.Fatalf("second parse differs: %v", err)
			}
		}
		if c, err := ParseCondition(s); err == nil {
			Match(c, Devices, r[0])
		}
	})
}

package main_test

import (
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"
)

// scrape reads /metrics with a token.
func scrape(t *testing.T, srv *kilnServer, token string) string {
	t.Helper()
	req, _ := http.NewRequest("GET", srv.url+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("scrape: %s %s", resp.Status, body)
	}
	return string(body)
}

// checkMetrics scrapes a real server while machine m of app runs: the app's token sees
// the machine's usage (read from its VMM's cgroup), its boot and its state, and nothing
// of the host's or another app's; the operator's sees the host as well.
func checkMetrics(t *testing.T, srv *kilnServer, appToken, app, m string) {
	t.Helper()
	mine := scrape(t, srv, appToken)
	for _, want := range []string{
		`fly_instance_cpu{app="` + app + `",instance="` + m + `",mode="user"} `,
		`fly_instance_memory_mem_total{app="` + app + `",instance="` + m + `"} `,
		`kiln_machines{app="` + app + `",state="started"} 1`,
		`kiln_machine_boot_seconds_count{app="` + app + `"} `,
	} {
		if !strings.Contains(mine, want) {
			t.Errorf("the app's scrape has no %s:\n%s", want, mine)
		}
	}
	// The VMM has run, so its CPU time is not zero; the guest's agent answered with its
	// available memory and its root filesystem's size.
	for _, series := range []string{
		`fly_instance_cpu{app="` + app + `",instance="` + m + `",mode="user"}`,
		`fly_instance_memory_mem_available{app="` + app + `",instance="` + m + `"}`,
		`fly_instance_filesystem_blocks{app="` + app + `",instance="` + m + `",mount="/"}`,
	} {
		if v := regexp.MustCompile(regexp.QuoteMeta(series) + ` ([0-9.e+]+)\n`).FindStringSubmatch(mine); v == nil || v[1] == "0" {
			t.Errorf("the app's scrape has %s %v; want it, not zero", series, v)
		}
	}
	for _, line := range strings.Split(strings.TrimSpace(mine), "\n") {
		if !strings.HasPrefix(line, "#") && !strings.Contains(line, `app="`+app+`"`) && !strings.Contains(line, `project="`+app+`"`) {
			t.Errorf("the app's token sees a series of something else: %s", line)
		}
	}
	if strings.Contains(mine, "kiln_host_") || strings.Contains(mine, "kiln_store_") {
		t.Errorf("the app's token sees the host's series")
	}
	all := scrape(t, srv, readToken(t, srv.e.dataDir+"/admin-token"))
	for _, want := range []string{"kiln_host_cpus_offered{", "kiln_host_memory_used_bytes{", "kiln_store_query_seconds_bucket{", `instance="` + m + `"`} {
		if !strings.Contains(all, want) {
			t.Errorf("the operator's scrape has no %s", want)
		}
	}
}

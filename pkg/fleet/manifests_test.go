package fleet

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"gopkg.in/yaml.v3"
)

// Small structs for the fields of deploy/kubernetes the fleet relies on.
type k8sObject struct {
	APIVersion string            `yaml:"apiVersion"`
	Kind       string            `yaml:"kind"`
	Metadata   k8sMeta           `yaml:"metadata"`
	Data       map[string]string `yaml:"data"`
	StringData map[string]string `yaml:"stringData"`
	Spec       struct {
		CompletionMode string  `yaml:"completionMode"`
		Completions    int     `yaml:"completions"`
		Parallelism    int     `yaml:"parallelism"`
		Template       k8sPod  `yaml:"template"`
		Selector       k8sSel  `yaml:"selector"`
		Endpoints      []k8sEP `yaml:"podMetricsEndpoints"`
	} `yaml:"spec"`
}

type k8sMeta struct {
	Name        string            `yaml:"name"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
}

type k8sSel struct {
	MatchLabels map[string]string `yaml:"matchLabels"`
}

type k8sEP struct {
	Port string `yaml:"port"`
	Path string `yaml:"path"`
}

type k8sPod struct {
	Metadata k8sMeta `yaml:"metadata"`
	Spec     struct {
		SecurityContext struct {
			RunAsNonRoot bool `yaml:"runAsNonRoot"`
		} `yaml:"securityContext"`
		Containers []struct {
			Name  string   `yaml:"name"`
			Image string   `yaml:"image"`
			Args  []string `yaml:"args"`
			Env   []struct {
				Name      string `yaml:"name"`
				Value     string `yaml:"value"`
				ValueFrom *struct {
					FieldRef struct {
						FieldPath string `yaml:"fieldPath"`
					} `yaml:"fieldRef"`
				} `yaml:"valueFrom"`
			} `yaml:"env"`
			Ports []struct {
				Name          string `yaml:"name"`
				ContainerPort int    `yaml:"containerPort"`
			} `yaml:"ports"`
			VolumeMounts []struct {
				Name      string `yaml:"name"`
				MountPath string `yaml:"mountPath"`
				SubPath   string `yaml:"subPath"`
			} `yaml:"volumeMounts"`
		} `yaml:"containers"`
		Volumes []struct {
			Name      string `yaml:"name"`
			ConfigMap *struct {
				Name string `yaml:"name"`
			} `yaml:"configMap"`
			Secret *struct {
				SecretName string `yaml:"secretName"`
			} `yaml:"secret"`
		} `yaml:"volumes"`
	} `yaml:"spec"`
}

func loadManifest(t *testing.T, name string) k8sObject {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("../../deploy/kubernetes", name))
	if err != nil {
		t.Fatal(err)
	}
	var o k8sObject
	if err := yaml.Unmarshal(b, &o); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if o.APIVersion == "" || o.Kind == "" || o.Metadata.Name == "" {
		t.Fatalf("%s is not a Kubernetes object: %+v", name, o)
	}
	return o
}

// The manifests decode as Kubernetes objects and wire the shard: an Indexed Job whose
// completions are the shard count given to the agent, JOB_COMPLETION_INDEX as the shard index,
// the ConfigMap's fleet file and the Secret's group key mounted where the file says, and the
// metrics port scraped.
func TestKubernetesManifests(t *testing.T) {
	cm := loadManifest(t, "configmap.yaml")
	sec := loadManifest(t, "secret.yaml")
	job := loadManifest(t, "job.yaml")
	pm := loadManifest(t, "podmonitor.yaml")
	if cm.Kind != "ConfigMap" || sec.Kind != "Secret" || job.Kind != "Job" || job.APIVersion != "batch/v1" || pm.Kind != "PodMonitor" {
		t.Fatalf("kinds: %s %s %s/%s %s", cm.Kind, sec.Kind, job.APIVersion, job.Kind, pm.Kind)
	}
	fc, err := Parse([]byte(cm.Data["fleet.yaml"]))
	if err != nil {
		t.Fatalf("the ConfigMap's fleet file: %v", err)
	}
	if _, err := fc.withDefaults(); err != nil {
		t.Fatalf("the ConfigMap's fleet file: %v", err)
	}
	if job.Spec.CompletionMode != "Indexed" || job.Spec.Completions < 1 || job.Spec.Parallelism != job.Spec.Completions {
		t.Fatalf("job: completionMode %q completions %d parallelism %d", job.Spec.CompletionMode, job.Spec.Completions, job.Spec.Parallelism)
	}
	pod := job.Spec.Template
	if !pod.Spec.SecurityContext.RunAsNonRoot || len(pod.Spec.Containers) != 1 {
		t.Fatal("job pod: want one container, runAsNonRoot")
	}
	c := pod.Spec.Containers[0]
	env := map[string]string{}
	for _, e := range c.Env {
		env[e.Name] = e.Value
		if e.ValueFrom != nil {
			env[e.Name] = "fieldRef:" + e.ValueFrom.FieldRef.FieldPath
		}
	}
	if env["IOTHUBBY_SHARD_COUNT"] != strconv.Itoa(job.Spec.Completions) {
		t.Fatalf("IOTHUBBY_SHARD_COUNT %q, want completions %d", env["IOTHUBBY_SHARD_COUNT"], job.Spec.Completions)
	}
	if env["JOB_COMPLETION_INDEX"] != "fieldRef:metadata.annotations['batch.kubernetes.io/job-completion-index']" {
		t.Fatalf("JOB_COMPLETION_INDEX = %q", env["JOB_COMPLETION_INDEX"])
	}
	if lo, hi := Shard(fc.Count, 0, job.Spec.Completions); hi-lo != fc.Count/job.Spec.Completions {
		t.Fatalf("shard 0 gets %d devices", hi-lo)
	}
	args := map[string]string{}
	for i := 0; i+1 < len(c.Args); i++ {
		args[c.Args[i]] = c.Args[i+1]
	}
	if c.Args[0] != "fleet" || args["--config"] != "/etc/iothubby/fleet.yaml" || args["--metrics-addr"] != ":9090" {
		t.Fatalf("args %v", c.Args)
	}
	if _, set := args["--shard-index"]; set {
		t.Fatal("--shard-index on the command line would override JOB_COMPLETION_INDEX")
	}
	mounts := map[string]string{}
	for _, m := range c.VolumeMounts {
		mounts[m.Name] = m.MountPath
	}
	for _, v := range pod.Spec.Volumes {
		switch {
		case v.ConfigMap != nil && v.ConfigMap.Name != cm.Metadata.Name:
			t.Fatalf("volume %s names ConfigMap %s, not %s", v.Name, v.ConfigMap.Name, cm.Metadata.Name)
		case v.Secret != nil && v.Secret.SecretName != sec.Metadata.Name:
			t.Fatalf("volume %s names Secret %s, not %s", v.Name, v.Secret.SecretName, sec.Metadata.Name)
		case v.Secret != nil:
			if want := filepath.Join(mounts[v.Name], "group.key"); fc.DPS.GroupKeyFile != want {
				t.Fatalf("fleet file reads the group key at %s, the Secret is mounted at %s", fc.DPS.GroupKeyFile, want)
			}
			if _, ok := sec.StringData["group.key"]; !ok {
				t.Fatal("the Secret has no group.key")
			}
		}
	}
	if mounts["config"] != args["--config"] {
		t.Fatalf("config mounted at %s, read from %s", mounts["config"], args["--config"])
	}
	if a := pod.Metadata.Annotations; a["prometheus.io/scrape"] != "true" || a["prometheus.io/port"] != "9090" {
		t.Fatalf("scrape annotations %v", a)
	}
	if len(c.Ports) != 1 || c.Ports[0].ContainerPort != 9090 || len(pm.Spec.Endpoints) != 1 || pm.Spec.Endpoints[0].Port != c.Ports[0].Name {
		t.Fatal("the PodMonitor does not scrape the container's metrics port")
	}
	for k, v := range pm.Spec.Selector.MatchLabels {
		if pod.Metadata.Labels[k] != v {
			t.Fatalf("the PodMonitor's selector %s=%s does not match the pods", k, v)
		}
	}
}

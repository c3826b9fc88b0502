package deploy

import (
	"fmt"
	"net"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"sigs.k8s.io/yaml"

	"github.com/tp-proxy/tp/internal/lib/config"
)

const manifestFile = "kubernetes/tpd.yaml"

// manifests is the Kubernetes manifest decoded into the API's own types.
type manifests struct {
	configMaps   []*corev1.ConfigMap
	statefulSets []*appsv1.StatefulSet
	deployments  []*appsv1.Deployment
	secrets      []*corev1.Secret
	services     []*corev1.Service
	pdbs         []*policyv1.PodDisruptionBudget
}

// splitDocs splits a multi-document YAML file on its "---" lines, dropping
// documents that hold only comments.
func splitDocs(text string) []string {
	var docs []string
	var cur []string
	flush := func() {
		for _, l := range cur {
			if t := strings.TrimSpace(l); t != "" && !strings.HasPrefix(t, "#") {
				docs = append(docs, strings.Join(cur, "\n"))
				break
			}
		}
		cur = nil
	}
	for _, line := range strings.Split(text, "\n") {
		if strings.TrimRight(line, " ") == "---" {
			flush()
			continue
		}
		cur = append(cur, line)
	}
	flush()
	return docs
}

// decodeManifests decodes every document strictly: an unknown or misspelt
// field, a duplicate key, a wrong type or an unknown kind is an error.
func decodeManifests(text string) (manifests, error) {
	var m manifests
	for i, doc := range splitDocs(text) {
		var head struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
		}
		if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
			return m, fmt.Errorf("document %d: %w", i+1, err)
		}
		var obj any
		switch head.APIVersion + " " + head.Kind {
		case "v1 Namespace":
			obj = &corev1.Namespace{}
		case "v1 ConfigMap":
			cm := &corev1.ConfigMap{}
			m.configMaps, obj = append(m.configMaps, cm), cm
		case "apps/v1 StatefulSet":
			ss := &appsv1.StatefulSet{}
			m.statefulSets, obj = append(m.statefulSets, ss), ss
		case "apps/v1 Deployment":
			dep := &appsv1.Deployment{}
			m.deployments, obj = append(m.deployments, dep), dep
		case "v1 Secret":
			sec := &corev1.Secret{}
			m.secrets, obj = append(m.secrets, sec), sec
		case "v1 Service":
			svc := &corev1.Service{}
			m.services, obj = append(m.services, svc), svc
		case "policy/v1 PodDisruptionBudget":
			pdb := &policyv1.PodDisruptionBudget{}
			m.pdbs, obj = append(m.pdbs, pdb), pdb
		default:
			return m, fmt.Errorf("document %d: apiVersion %q kind %q is not one this test knows; add it to decodeManifests", i+1, head.APIVersion, head.Kind)
		}
		if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
			return m, fmt.Errorf("document %d (%s): %w", i+1, head.Kind, err)
		}
	}
	return m, nil
}

// Every document decodes strictly into k8s.io/api's types; a misspelt field
// would fail (bad input checked here: "terminationGracePeriodSecond").
func TestKubernetesManifestsDecodeStrictly(t *testing.T) {
	b, err := os.ReadFile(manifestFile)
	if err != nil {
		t.Fatal(err)
	}
	m, err := decodeManifests(string(b))
	if err != nil {
		t.Fatalf("%s: %v", manifestFile, err)
	}
	if len(m.statefulSets) != 1 || len(m.configMaps) != 1 || len(m.pdbs) != 1 || len(m.services) == 0 {
		t.Fatalf("%s: want one StatefulSet, ConfigMap and PodDisruptionBudget and a Service; got %d, %d, %d, %d",
			manifestFile, len(m.statefulSets), len(m.configMaps), len(m.pdbs), len(m.services))
	}
	misspelt := strings.Replace(string(b), "terminationGracePeriodSeconds:", "terminationGracePeriodSecond:", 1)
	if misspelt == string(b) {
		t.Fatalf("%s sets no terminationGracePeriodSeconds", manifestFile)
	}
	if _, err := decodeManifests(misspelt); err == nil || !strings.Contains(err.Error(), "terminationGracePeriodSecond") {
		t.Fatalf("a misspelt field decoded without an error naming it: %v", err)
	}
}

// What the types do not check: the pieces agree with each other and with tpd.
// The ConfigMap's tpd.yaml is a configuration tpd accepts; the container ports
// are the ones it configures; readiness asks /readyz and liveness /healthz on
// the admin port; a preStop lets endpoints drop the pod before SIGTERM, and the
// grace period covers it plus a full drain; one replica, covered by a
// PodDisruptionBudget; Services and the PDB select the pod; it runs as the
// image's nonroot user; TP_CONFIG and TP_DATA_DIR are mounted.
func TestKubernetesManifestsFitTogether(t *testing.T) {
	b, err := os.ReadFile(manifestFile)
	if err != nil {
		t.Fatal(err)
	}
	m, err := decodeManifests(string(b))
	if err != nil {
		t.Fatalf("%s: %v", manifestFile, err)
	}
	if len(m.statefulSets) != 1 || len(m.configMaps) != 1 || len(m.pdbs) != 1 {
		t.Fatalf("%s: want one StatefulSet, ConfigMap and PodDisruptionBudget", manifestFile)
	}
	ss, cm, pdb := m.statefulSets[0], m.configMaps[0], m.pdbs[0]
	if ss.Spec.Replicas == nil || *ss.Spec.Replicas != 1 {
		t.Errorf("StatefulSet replicas = %v; tpd's CA and user store are single-writer files: one replica", ss.Spec.Replicas)
	}
	pod := ss.Spec.Template.Spec
	if len(pod.Containers) != 1 {
		t.Fatalf("pod has %d containers, want 1", len(pod.Containers))
	}
	c := pod.Containers[0]
	env := map[string]string{}
	for _, e := range c.Env {
		env[e.Name] = e.Value
	}

	// The ConfigMap mounted at TP_CONFIG's directory holds a tpd.yaml that tpd accepts.
	cfgPath := env["TP_CONFIG"]
	cfgVolume := mountAt(t, c, path.Dir(cfgPath))
	var cfgMapName string
	for _, v := range pod.Volumes {
		if v.Name == cfgVolume && v.ConfigMap != nil {
			cfgMapName = v.ConfigMap.Name
		}
	}
	if cfgMapName != cm.Name {
		t.Fatalf("TP_CONFIG=%s is not in a volume of ConfigMap %q", cfgPath, cm.Name)
	}
	yamlText, ok := cm.Data[path.Base(cfgPath)]
	if !ok {
		t.Fatalf("ConfigMap %s has no key %s (TP_CONFIG=%s)", cm.Name, path.Base(cfgPath), cfgPath)
	}
	var keys map[string]any
	if err := yaml.UnmarshalStrict([]byte(yamlText), &keys); err != nil {
		t.Fatalf("ConfigMap %s, %s: %v", cm.Name, path.Base(cfgPath), err)
	}
	checkable := keys
	cfgFile := filepath.Join(t.TempDir(), "tpd.yaml")
	out, err := yaml.Marshal(checkable)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfgFile, out, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TP_CONFIG", cfgFile)
	t.Setenv("TP_DATA_DIR", t.TempDir())
	cfg, err := config.LoadServer(nil)
	if err != nil {
		t.Fatalf("tpd refuses the ConfigMap's tpd.yaml: %v", err)
	}
	if mountAt(t, c, env["TP_DATA_DIR"]) != "data" {
		t.Errorf("TP_DATA_DIR=%s is not the persistent volume \"data\"", env["TP_DATA_DIR"])
	}
	var claimed bool
	for _, pvc := range ss.Spec.VolumeClaimTemplates {
		claimed = claimed || pvc.Name == "data"
	}
	if !claimed {
		t.Error("no volumeClaimTemplate \"data\": the CA would be lost with the pod")
	}

	// Ports: the public one as listen says, TCP and UDP; the admin one as admin-listen says.
	ports := map[string]corev1.ContainerPort{}
	for _, p := range c.Ports {
		ports[p.Name] = p
	}
	listenPort := portOf(t, "listen", cfg.Listen)
	for name, proto := range map[string]corev1.Protocol{"tls": corev1.ProtocolTCP, "quic": corev1.ProtocolUDP} {
		if p := ports[name]; p.ContainerPort != listenPort || p.Protocol != proto {
			t.Errorf("container port %q = %d/%s, want %d/%s as listen %q", name, p.ContainerPort, p.Protocol, listenPort, proto, cfg.Listen)
		}
	}
	adminListen, _ := keys["admin-listen"].(string)
	if p := ports["admin"]; p.ContainerPort != portOf(t, "admin-listen", adminListen) || p.Protocol != corev1.ProtocolTCP {
		t.Errorf("container port \"admin\" = %d/%s, want admin-listen %q's port over TCP", p.ContainerPort, p.Protocol, adminListen)
	}

	// Probes on the admin listener.
	probe := func(what string, p *corev1.Probe, wantPath string) {
		if p == nil || p.HTTPGet == nil {
			t.Errorf("%s: want an HTTP GET of %s on the admin port", what, wantPath)
			return
		}
		if p.HTTPGet.Path != wantPath || p.HTTPGet.Port.String() != "admin" {
			t.Errorf("%s asks %s on port %s, want %s on \"admin\"", what, p.HTTPGet.Path, p.HTTPGet.Port.String(), wantPath)
		}
	}
	probe("readinessProbe", c.ReadinessProbe, "/readyz")
	probe("livenessProbe", c.LivenessProbe, "/healthz")
	if c.StartupProbe != nil {
		probe("startupProbe", c.StartupProbe, "/healthz")
	}

	// Stopping: preStop, then SIGTERM and a drain, all within the grace period.
	var preStop time.Duration
	switch {
	case c.Lifecycle == nil || c.Lifecycle.PreStop == nil:
		t.Fatal("no preStop: endpoints would still send new connections to a draining pod")
	case c.Lifecycle.PreStop.Sleep != nil:
		preStop = time.Duration(c.Lifecycle.PreStop.Sleep.Seconds) * time.Second
	default:
		// The image is distroless: no shell or sleep binary to exec.
		t.Fatalf("preStop %+v: use the sleep action; the distroless image has no sleep binary", c.Lifecycle.PreStop)
	}
	if preStop <= 0 {
		t.Errorf("preStop sleeps %s", preStop)
	}
	if pod.TerminationGracePeriodSeconds == nil {
		t.Fatal("terminationGracePeriodSeconds unset: Kubernetes' default 30s cannot hold a preStop and a full drain")
	}
	if grace := time.Duration(*pod.TerminationGracePeriodSeconds) * time.Second; grace <= preStop+drainBound {
		t.Errorf("terminationGracePeriodSeconds %s does not exceed preStop %s + drain %s: a draining tpd would be killed", grace, preStop, drainBound)
	}

	// Selection: the PDB and every Service select the pod; targetPorts exist with their protocol.
	labels := ss.Spec.Template.Labels
	if !selects(ss.Spec.Selector.MatchLabels, labels) {
		t.Errorf("StatefulSet selector %v does not select its own pods %v", ss.Spec.Selector.MatchLabels, labels)
	}
	if pdb.Spec.Selector == nil || !selects(pdb.Spec.Selector.MatchLabels, labels) {
		t.Errorf("PodDisruptionBudget does not select the pod %v", labels)
	}
	if pdb.Spec.MinAvailable == nil || pdb.Spec.MinAvailable.IntValue() != 1 {
		t.Errorf("PodDisruptionBudget minAvailable = %v, want 1 (the one replica)", pdb.Spec.MinAvailable)
	}
	var governing bool
	for _, svc := range m.services {
		if !selects(svc.Spec.Selector, labels) {
			t.Errorf("Service %s selector %v does not select the pod %v", svc.Name, svc.Spec.Selector, labels)
		}
		for _, sp := range svc.Spec.Ports {
			cp, ok := ports[sp.TargetPort.String()]
			if !ok || cp.Protocol != sp.Protocol {
				t.Errorf("Service %s port %s targets %q/%s, which the container does not expose", svc.Name, sp.Name, sp.TargetPort.String(), sp.Protocol)
			}
		}
		if svc.Name == ss.Spec.ServiceName && svc.Spec.ClusterIP == corev1.ClusterIPNone {
			governing = true
		}
	}
	if !governing {
		t.Errorf("StatefulSet serviceName %q is not a headless Service in %s", ss.Spec.ServiceName, manifestFile)
	}

	// Security: the image's nonroot user, nothing to escalate to.
	if sc := pod.SecurityContext; sc == nil || sc.RunAsUser == nil || *sc.RunAsUser != nonrootUID || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot {
		t.Errorf("pod securityContext must run as non-root uid %d, the image's user", nonrootUID)
	}
	if sc := c.SecurityContext; sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Error("container may escalate privileges")
	}
	if len(c.Args) == 0 || c.Args[0] != "serve" {
		t.Errorf("container args %v, want serve", c.Args)
	}
	if out, err := runTPD(t, nil, append(c.Args, "--help")...); err != nil {
		t.Errorf("tpd does not accept the container's arguments %v: %v\n%s", c.Args, err, out)
	}
}

// mountAt returns the name of the volume mounted at dir in c.
func mountAt(t *testing.T, c corev1.Container, dir string) string {
	t.Helper()
	for _, vm := range c.VolumeMounts {
		if path.Clean(vm.MountPath) == path.Clean(dir) {
			return vm.Name
		}
	}
	t.Fatalf("container %s mounts nothing at %q", c.Name, dir)
	return ""
}

// portOf returns the port of a host:port setting.
func portOf(t *testing.T, key, addr string) int32 {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%s %q: %v", key, addr, err)
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil {
		t.Fatalf("%s %q: port: %v", key, addr, err)
	}
	return int32(n)
}

// selects reports whether selector (match labels) selects labels.
func selects(selector, labels map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

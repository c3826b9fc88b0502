package deploy

import (
	"os"
	"path"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/tp-proxy/tp/internal/lib/config"
)

const haManifestFile = "kubernetes/tpd-ha.yaml"

// The manifest for several replicas decodes strictly (bad input checked: a
// misspelt "maxUnavailable") and fits together: a Deployment of at least 3
// replicas whose rolling update never takes one away before its successor is
// ready; a PodDisruptionBudget that lets a drain take fewer than all; one
// Service with TCP and UDP 443 to the container's public port; readiness on
// /readyz, a preStop sleep and a grace period covering it and a drain; the
// ConfigMap's tpd.yaml loads, with the DSN from a Secret (TP_DATABASE) and the
// password from a file mounted from a Secret; the CA from a Secret at the data
// dir's ca/ (one CA for all replicas); the QUIC-LB server ID from the pod IP,
// which tpd accepts.
func TestKubernetesHAManifestFitsTogether(t *testing.T) {
	b, err := os.ReadFile(haManifestFile)
	if err != nil {
		t.Fatal(err)
	}
	m, err := decodeManifests(string(b))
	if err != nil {
		t.Fatalf("%s: %v", haManifestFile, err)
	}
	misspelt := strings.Replace(string(b), "maxUnavailable: 1", "maxUnavailabel: 1", 1)
	if _, err := decodeManifests(misspelt); err == nil || !strings.Contains(err.Error(), "maxUnavailabel") {
		t.Fatalf("a misspelt field decoded without an error naming it: %v", err)
	}
	if len(m.deployments) != 1 || len(m.configMaps) != 1 || len(m.pdbs) != 1 || len(m.statefulSets) != 0 {
		t.Fatalf("want one Deployment, ConfigMap and PodDisruptionBudget and no StatefulSet; got %d, %d, %d, %d",
			len(m.deployments), len(m.configMaps), len(m.pdbs), len(m.statefulSets))
	}
	dep, cm, pdb := m.deployments[0], m.configMaps[0], m.pdbs[0]
	if dep.Spec.Replicas == nil || *dep.Spec.Replicas < 3 {
		t.Errorf("replicas = %v, want at least 3", dep.Spec.Replicas)
	}
	if ru := dep.Spec.Strategy.RollingUpdate; ru == nil || ru.MaxUnavailable == nil || ru.MaxUnavailable.IntValue() != 0 {
		t.Error("rolling update may take a replica away before its successor is ready: want maxUnavailable 0")
	}
	labels := dep.Spec.Template.Labels
	if !selects(dep.Spec.Selector.MatchLabels, labels) {
		t.Errorf("Deployment selector %v does not select its pods %v", dep.Spec.Selector.MatchLabels, labels)
	}
	if pdb.Spec.Selector == nil || !selects(pdb.Spec.Selector.MatchLabels, labels) {
		t.Errorf("PodDisruptionBudget does not select the pods %v", labels)
	}
	switch {
	case pdb.Spec.MaxUnavailable != nil:
		if n := pdb.Spec.MaxUnavailable.IntValue(); n < 1 || n >= int(*dep.Spec.Replicas) {
			t.Errorf("PodDisruptionBudget maxUnavailable %d: want at least 1 and fewer than the replicas", n)
		}
	case pdb.Spec.MinAvailable != nil:
		if n := pdb.Spec.MinAvailable.IntValue(); n < 1 || n >= int(*dep.Spec.Replicas) {
			t.Errorf("PodDisruptionBudget minAvailable %d: want at least 1 and fewer than the replicas", n)
		}
	default:
		t.Error("PodDisruptionBudget bounds nothing")
	}

	pod := dep.Spec.Template.Spec
	if len(pod.Containers) != 1 {
		t.Fatalf("pod has %d containers, want 1", len(pod.Containers))
	}
	c := pod.Containers[0]
	env := map[string]corev1.EnvVar{}
	for _, e := range c.Env {
		env[e.Name] = e
	}
	volumes := map[string]corev1.Volume{}
	for _, v := range pod.Volumes {
		volumes[v.Name] = v
	}
	secretNames := map[string]*corev1.Secret{}
	for _, s := range m.secrets {
		secretNames[s.Name] = s
	}

	// The configuration tpd loads, with the environment the pod gives it.
	cfgPath := env["TP_CONFIG"].Value
	if v := volumes[mountAt(t, c, path.Dir(cfgPath))]; v.ConfigMap == nil || v.ConfigMap.Name != cm.Name {
		t.Fatalf("TP_CONFIG=%s is not in a volume of ConfigMap %q", cfgPath, cm.Name)
	}
	yamlText, ok := cm.Data[path.Base(cfgPath)]
	if !ok {
		t.Fatalf("ConfigMap %s has no key %s", cm.Name, path.Base(cfgPath))
	}
	var keys map[string]any
	if err := yaml.UnmarshalStrict([]byte(yamlText), &keys); err != nil {
		t.Fatalf("ConfigMap %s: %v", cm.Name, err)
	}
	dsnRef := env["TP_DATABASE"].ValueFrom
	if dsnRef == nil || dsnRef.SecretKeyRef == nil {
		t.Fatal("TP_DATABASE does not come from a Secret")
	}
	dbSecret := secretNames[dsnRef.SecretKeyRef.Name]
	if dbSecret == nil || dbSecret.StringData[dsnRef.SecretKeyRef.Key] == "" {
		t.Fatalf("TP_DATABASE names key %q of Secret %q, which this file does not define", dsnRef.SecretKeyRef.Key, dsnRef.SecretKeyRef.Name)
	}
	pwFile, _ := keys["database-password-file"].(string)
	pwVolume := volumes[mountAt(t, c, path.Dir(pwFile))]
	if pwVolume.Secret == nil || pwVolume.Secret.SecretName != dbSecret.Name {
		t.Fatalf("database-password-file %q is not mounted from Secret %s", pwFile, dbSecret.Name)
	}
	var pwItem bool
	for _, it := range pwVolume.Secret.Items {
		pwItem = pwItem || (it.Path == path.Base(pwFile) && dbSecret.StringData[it.Key] != "")
	}
	if !pwItem {
		t.Errorf("Secret volume %s does not place a defined key at %s", pwVolume.Name, path.Base(pwFile))
	}
	podIP := env["POD_IP"].ValueFrom
	if podIP == nil || podIP.FieldRef == nil || podIP.FieldRef.FieldPath != "status.podIP" {
		t.Error("POD_IP does not come from status.podIP")
	}
	sid := env["TP_QUIC_SERVER_ID"].Value
	if sid != "ip:$(POD_IP)" {
		t.Errorf("TP_QUIC_SERVER_ID = %q, want ip:$(POD_IP)", sid)
	}
	cfgFile := filepath.Join(t.TempDir(), "tpd.yaml")
	if err := os.WriteFile(cfgFile, []byte(yamlText), 0o600); err != nil {
		t.Fatal(err)
	}
	pw := filepath.Join(t.TempDir(), "password")
	if err := os.WriteFile(pw, []byte("secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TP_CONFIG", cfgFile)
	t.Setenv("TP_DATA_DIR", t.TempDir())
	t.Setenv("TP_DATABASE", dbSecret.StringData[dsnRef.SecretKeyRef.Key])
	t.Setenv("TP_DATABASE_PASSWORD_FILE", pw) // the mount's path exists only in the pod
	t.Setenv("TP_QUIC_SERVER_ID", strings.ReplaceAll(sid, "$(POD_IP)", "10.1.2.3"))
	cfg, err := config.LoadServer(nil)
	if err != nil {
		t.Fatalf("tpd refuses the ConfigMap's tpd.yaml with the pod's environment: %v", err)
	}
	if id, err := cfg.QUICServerIDBytes(); err != nil || len(id) != 4 || id[0] != 10 || id[3] != 3 {
		t.Errorf("QUIC server ID from a pod IP: %x, %v; want the address's 4 octets", id, err)
	}
	if cfg.Database == "" {
		t.Error("no database: replicas would not share state")
	}

	// One CA for all: the data dir's ca/ from a Secret.
	if v := volumes[mountAt(t, c, path.Join(env["TP_DATA_DIR"].Value, "ca"))]; v.Secret == nil {
		t.Error("the data dir's ca/ is not a Secret: each replica would make a CA of its own")
	}

	// The public Service: TCP and UDP 443 to the container's public port.
	ports := map[string]corev1.ContainerPort{}
	for _, p := range c.Ports {
		ports[p.Name] = p
	}
	listenPort := portOf(t, "listen", cfg.Listen)
	var tcp443, udp443 bool
	for _, svc := range m.services {
		if !selects(svc.Spec.Selector, labels) {
			t.Errorf("Service %s selector %v does not select the pods %v", svc.Name, svc.Spec.Selector, labels)
		}
		for _, sp := range svc.Spec.Ports {
			cp, ok := ports[sp.TargetPort.String()]
			if !ok || cp.Protocol != sp.Protocol {
				t.Errorf("Service %s port %s targets %q/%s, which the container does not expose", svc.Name, sp.Name, sp.TargetPort.String(), sp.Protocol)
				continue
			}
			if sp.Port == 443 && cp.ContainerPort == listenPort {
				if svc.Spec.SessionAffinity != corev1.ServiceAffinityClientIP {
					t.Errorf("Service %s serves 443 without sessionAffinity: ClientIP: an agent over TLS would have its session pickups sent to replicas that do not hold its control session", svc.Name)
				}
				tcp443 = tcp443 || sp.Protocol == corev1.ProtocolTCP
				udp443 = udp443 || sp.Protocol == corev1.ProtocolUDP
			}
		}
	}
	if !tcp443 || !udp443 {
		t.Errorf("public 443: TCP %t, UDP %t to the listen port %d; want both", tcp443, udp443, listenPort)
	}

	// Readiness, preStop, grace.
	if p := c.ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/readyz" || p.HTTPGet.Port.String() != "admin" {
		t.Error("readinessProbe is not /readyz on the admin port")
	}
	if c.Lifecycle == nil || c.Lifecycle.PreStop == nil || c.Lifecycle.PreStop.Sleep == nil || c.Lifecycle.PreStop.Sleep.Seconds <= 0 {
		t.Fatal("no preStop sleep: endpoints would still send new connections to a draining pod")
	}
	preStop := time.Duration(c.Lifecycle.PreStop.Sleep.Seconds) * time.Second
	if pod.TerminationGracePeriodSeconds == nil || time.Duration(*pod.TerminationGracePeriodSeconds)*time.Second <= preStop+drainBound {
		t.Errorf("terminationGracePeriodSeconds %v does not exceed preStop %s + drain %s", pod.TerminationGracePeriodSeconds, preStop, drainBound)
	}
	if sc := pod.SecurityContext; sc == nil || sc.RunAsUser == nil || *sc.RunAsUser != nonrootUID {
		t.Errorf("pod must run as uid %d, the image's user", nonrootUID)
	}
}

package e2e

import (
	"crypto/ecdh"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// wireGuardGoModule is wireguard-go, the userspace WireGuard, as the module
// proxy serves it (a pseudo-version: the project tags no releases).
const wireGuardGoModule = "golang.zx2c4.com/wireguard@v0.0.0-20260522210424-ecfc5a8d5446"

// wgServiceAddr is the service host's address reached through WireGuard.
const wgServiceAddr = "10.201.4.1"

// prepareWireGuardRoutes gives the service host the address reached through
// WireGuard and routes between it and the WireGuard addresses through T, so
// that its listeners can be made before WireGuard runs.
func prepareWireGuardRoutes(b *testing.B, n *ipNet) {
	b.Helper()
	for _, c := range [][]string{
		{n.S, "addr", "add", wgServiceAddr + "/32", "dev", "s0"},
		{n.S, "route", "add", "10.203.0.0/24", "via", "10.201.2.1"},
		{n.T, "route", "add", "10.201.4.0/24", "via", "10.201.2.2"},
	} {
		sh(b, append([]string{"ip", "-n", c[0]}, c[1:]...)...)
	}
}

// startWireGuardGo runs wireguard-go on C and T, a WireGuard tunnel between
// them like `tp ip`'s (C's traffic to wgServiceAddr goes through it; T
// forwards), and returns false with the reason when it cannot (no module
// proxy or cache for wireguard-go).
func startWireGuardGo(b *testing.B, n *ipNet) (bool, string) {
	b.Helper()
	// tpbench names its peer binary (or "none" when it has none).
	wg := os.Getenv("TP_BENCH_WIREGUARD_GO")
	switch wg {
	case "none":
		return false, "wireguard-go not given"
	case "":
		dir := b.TempDir()
		build := exec.Command("go", "install", wireGuardGoModule)
		build.Env = append(os.Environ(), "GOBIN="+dir, "GOFLAGS=-mod=mod")
		if out, err := build.CombinedOutput(); err != nil {
			return false, fmt.Sprintf("building wireguard-go: %v\n%s", err, out)
		}
		wg = filepath.Join(dir, "wireguard")
	}
	key := func() (priv, pub string) {
		k, err := ecdh.X25519().GenerateKey(rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		return hex.EncodeToString(k.Bytes()), hex.EncodeToString(k.PublicKey().Bytes())
	}
	cPriv, cPub := key()
	tPriv, tPub := key()
	// Interface names are global to the UAPI sockets (/var/run/wireguard).
	id := os.Getpid() % 100000
	cDev, tDev := fmt.Sprintf("wgc%d", id), fmt.Sprintf("wgt%d", id)
	for _, d := range []struct{ ns, dev string }{{n.C, cDev}, {n.T, tDev}} {
		cmd := command("ip", "netns", "exec", d.ns, wg, "-f", d.dev)
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = cmd.Process.Signal(syscall.SIGTERM); _ = cmd.Wait() })
	}
	uapi := func(dev, conf string) {
		sock := "/var/run/wireguard/" + dev + ".sock"
		deadline := time.Now().Add(30 * time.Second)
		var c net.Conn
		var err error
		for {
			if c, err = net.Dial("unix", sock); err == nil {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("wireguard-go's %s: %v", sock, err)
			}
			time.Sleep(20 * time.Millisecond) // polling for wireguard-go's socket, bounded by the deadline
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		if _, err := c.Write([]byte("set=1\n" + conf + "\n")); err != nil {
			b.Fatal(err)
		}
		buf := make([]byte, 256)
		k, _ := c.Read(buf)
		if !strings.Contains(string(buf[:k]), "errno=0") {
			b.Fatalf("configuring wireguard-go's %s: %q", dev, buf[:k])
		}
	}
	uapi(tDev, "private_key="+tPriv+"\nlisten_port=51820\npublic_key="+cPub+"\nallowed_ip=10.203.0.1/32\n")
	uapi(cDev, "private_key="+cPriv+"\npublic_key="+tPub+"\nendpoint=10.201.1.1:51820\nallowed_ip=10.203.0.0/24\nallowed_ip="+wgServiceAddr+"/32\n")
	for _, c := range [][]string{
		{n.T, "addr", "add", "10.203.0.2/24", "dev", tDev}, {n.T, "link", "set", tDev, "up"},
		{n.C, "addr", "add", "10.203.0.1/24", "dev", cDev}, {n.C, "link", "set", cDev, "up"},
		{n.C, "route", "add", wgServiceAddr + "/32", "dev", cDev},
	} {
		sh(b, append([]string{"ip", "-n", c[0]}, c[1:]...)...)
	}
	return true, ""
}

package clients

import (
	"crypto/ecdsa"
	"crypto/x509"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/internal/testpki"
)

// A tp process reading its certificate while another renews it never sees the
// new key beside the old certificate as an error.
func TestCertificateDuringRenewal(t *testing.T) {
	ca := testpki.New(t)
	var creds []*login.Credentials
	for range 2 {
		c := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})
		creds = append(creds, &login.Credentials{Chain: []*x509.Certificate{c.Leaf, ca.Intermediate}, Key: c.PrivateKey.(*ecdsa.PrivateKey)})
	}
	h := Home{Dir: t.TempDir()}
	if err := h.SaveCredentials(creds[0]); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{}) // the writer is done
	quit := make(chan struct{}) // the reader failed: the writer stops
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(stop)
		for i := 0; i < 200; i++ {
			select {
			case <-quit:
				return
			default:
			}
			if err := h.SaveCredentials(creds[i%2]); err != nil {
				t.Error(err)
				return
			}
			// Renewals are hours apart; a few milliseconds apart, every read
			// still overlaps a write, and a reader's retries (20 ms apart) can
			// tell a renewal in progress from one that never ends.
			time.Sleep(2 * time.Millisecond)
		}
	}()
	for {
		select {
		case <-stop:
			wg.Wait()
			return
		default:
		}
		if _, err := h.Certificate(); err != nil {
			close(quit)
			wg.Wait()
			t.Fatalf("reading during a renewal: %v", err)
		}
	}
}

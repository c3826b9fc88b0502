package authz_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
)

var (
	oidSAN                 = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidPermanentIdentifier = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 8, 3}
)

// sanWithPermanentIDs encodes a subjectAltName holding one permanentIdentifier
// otherName per value, plus dnsNames, the way step-ca writes them.
func sanWithPermanentIDs(t testing.TB, values []string, dnsNames ...string) pkix.Extension {
	t.Helper()
	var seq []byte
	for _, v := range values {
		type permID struct {
			IdentifierValue string `asn1:"utf8,optional"`
		}
		inner, err := asn1.Marshal(permID{IdentifierValue: v})
		if err != nil {
			t.Fatal(err)
		}
		type otherName struct {
			TypeID asn1.ObjectIdentifier
			Value  asn1.RawValue
		}
		on, err := asn1.MarshalWithParams(otherName{
			TypeID: oidPermanentIdentifier,
			Value:  asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 0, IsCompound: true, Bytes: inner},
		}, "tag:0")
		if err != nil {
			t.Fatal(err)
		}
		seq = append(seq, on...)
	}
	for _, n := range dnsNames {
		b, err := asn1.Marshal(asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 2, Bytes: []byte(n)})
		if err != nil {
			t.Fatal(err)
		}
		seq = append(seq, b...)
	}
	b, err := asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: seq})
	if err != nil {
		t.Fatal(err)
	}
	return pkix.Extension{Id: oidSAN, Value: b}
}

// handCert builds a self-signed leaf; the chain does not matter to IdentityFromCert.
func handCert(t testing.TB, cn string, eku []x509.ExtKeyUsage, ext ...pkix.Extension) *x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:    big.NewInt(0x0abc),
		Subject:         pkix.Name{CommonName: cn},
		NotBefore:       time.Now().Add(-time.Minute),
		NotAfter:        time.Date(2031, 2, 3, 4, 5, 6, 0, time.UTC),
		KeyUsage:        x509.KeyUsageDigitalSignature,
		ExtKeyUsage:     eku,
		ExtraExtensions: ext,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

var clientAuth = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}

func TestIdentityFromCert(t *testing.T) {
	ca := testpki.New(t)
	good := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{}).Leaf

	tests := []struct {
		name    string
		leaf    *x509.Certificate
		want    string // device ID, when no error is expected
		wantErr string
	}{
		{name: "testpki client cert", leaf: good, want: "alice@laptop"},
		{name: "dotted names", leaf: ca.ClientCert(t, "a.b-c_d@host-1.lan", testpki.LeafOptions{}).Leaf, want: "a.b-c_d@host-1.lan"},
		{name: "empty CN", leaf: handCert(t, "", clientAuth, sanWithPermanentIDs(t, []string{"bob@pc"})), want: "bob@pc"},
		{name: "clientAuth among others", leaf: ca.ClientCert(t, "bob@pc", testpki.LeafOptions{
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}).Leaf, want: "bob@pc"},
		{name: "with DNS SAN too", leaf: handCert(t, "bob@pc", clientAuth, sanWithPermanentIDs(t, []string{"bob@pc"}, "pc.example")), want: "bob@pc"},

		{name: "nil", leaf: nil, wantErr: "no client certificate was presented; run dlogin"},
		{name: "server cert", leaf: ca.ServerCert(t, "tp.example").Leaf, wantErr: "carries no TP device identity; run dlogin to get one"},
		{name: "no SAN at all", leaf: handCert(t, "alice@laptop", clientAuth), wantErr: "carries no TP device identity"},
		{name: "two identities", leaf: handCert(t, "", clientAuth, sanWithPermanentIDs(t, []string{"alice@laptop", "bob@pc"})), wantErr: "carries 2 device identities"},
		{name: "same identity twice", leaf: handCert(t, "", clientAuth, sanWithPermanentIDs(t, []string{"alice@laptop", "alice@laptop"})), wantErr: "carries 2 device identities"},
		{name: "CN mismatch", leaf: handCert(t, "bob@pc", clientAuth, sanWithPermanentIDs(t, []string{"alice@laptop"})), wantErr: `names "bob@pc" in its subject but "alice@laptop"`},
		{name: "upper-case user", leaf: ca.ClientCert(t, "Alice@laptop", testpki.LeafOptions{}).Leaf, wantErr: `invalid user name "Alice"`},
		{name: "bad device", leaf: ca.ClientCert(t, "alice@-laptop", testpki.LeafOptions{}).Leaf, wantErr: `invalid device name "-laptop"`},
		{name: "no at", leaf: ca.ClientCert(t, "alice", testpki.LeafOptions{}).Leaf, wantErr: "not of the form user@device"},
		{name: "two ats", leaf: ca.ClientCert(t, "alice@lap@top", testpki.LeafOptions{}).Leaf, wantErr: "invalid device name"},
		{name: "empty identity", leaf: handCert(t, "", clientAuth, sanWithPermanentIDs(t, []string{""})), wantErr: "not of the form user@device"},
		{name: "serverAuth only", leaf: ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}).Leaf,
			wantErr: "not valid for client authentication"},
		{name: "no EKU", leaf: handCert(t, "", nil, sanWithPermanentIDs(t, []string{"alice@laptop"})), wantErr: "not valid for client authentication"},
		{name: "any EKU", leaf: handCert(t, "", []x509.ExtKeyUsage{x509.ExtKeyUsageAny}, sanWithPermanentIDs(t, []string{"alice@laptop"})), wantErr: "no clientAuth"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id, err := authz.IdentityFromCert(tt.leaf)
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("no error; identity %+v", id)
				}
				if !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("error %q does not contain %q", err, tt.wantErr)
				}
				if id.DeviceID != "" {
					t.Errorf("error came with identity %+v", id)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			user, device, _ := strings.Cut(tt.want, "@")
			if id.DeviceID != tt.want || id.User != user || id.Device != device || id.String() != tt.want {
				t.Errorf("identity %+v, want %s", id, tt.want)
			}
			if want := tt.leaf.SerialNumber.Text(16); id.Serial != want || strings.ToLower(want) != want {
				t.Errorf("serial %q, want %q", id.Serial, want)
			}
			if !id.NotAfter.Equal(tt.leaf.NotAfter) {
				t.Errorf("NotAfter %v, want %v", id.NotAfter, tt.leaf.NotAfter)
			}
			if len(id.Groups) != 0 {
				t.Errorf("groups %v from a certificate", id.Groups)
			}
		})
	}
}

func TestValidName(t *testing.T) {
	for _, s := range []string{"a", "0", "alice", "a.b", "a_b", "a-b", "a..", "x1", strings.Repeat("a", 63)} {
		if !authz.ValidName(s) {
			t.Errorf("ValidName(%q) = false", s)
		}
	}
	for _, s := range []string{"", ".a", "_a", "-a", "Alice", "a b", "a@b", "a/b", "ä", strings.Repeat("a", 64), "a\x00"} {
		if authz.ValidName(s) {
			t.Errorf("ValidName(%q) = true", s)
		}
	}
}

func TestDeviceIDRoundTrip(t *testing.T) {
	id := authz.DeviceID("alice", "laptop")
	if id != "alice@laptop" {
		t.Fatalf("DeviceID = %q", id)
	}
	u, d, err := authz.SplitDeviceID(id)
	if err != nil || u != "alice" || d != "laptop" {
		t.Fatalf("SplitDeviceID(%q) = %q, %q, %v", id, u, d, err)
	}
	for _, bad := range []string{"", "@", "alice@", "@laptop", "alice", "a@b@c", "Alice@laptop"} {
		if _, _, err := authz.SplitDeviceID(bad); err == nil {
			t.Errorf("SplitDeviceID(%q) succeeded", bad)
		}
	}
}

package authz

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"math/big"
	"slices"
	"testing"
	"time"

	"go.step.sm/crypto/x509util"
)

// sanCert builds a certificate whose subjectAltName extension is san, signed and
// then parsed by crypto/x509 as a real handshake would; nil when crypto/x509
// refuses it (then no identity could come from it anyway).
func sanCert(t testing.TB, key *ecdsa.PrivateKey, san []byte) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber:    big.NewInt(1),
		NotBefore:       time.Unix(0, 0),
		NotAfter:        time.Unix(1<<32, 0),
		Subject:         pkix.Name{},
		ExtKeyUsage:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		ExtraExtensions: []pkix.Extension{{Id: oidSubjectAltName, Critical: true, Value: san}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil
	}
	return c
}

func sanSeed(t testing.TB, values ...string) []byte {
	t.Helper()
	var gns []byte
	for _, v := range values {
		ext, err := PermanentIdentifierSAN(v)
		if err != nil {
			t.Fatal(err)
		}
		var seq asn1.RawValue
		if _, err := asn1.Unmarshal(ext.Value, &seq); err != nil {
			t.Fatal(err)
		}
		gns = append(gns, seq.Bytes...)
	}
	dns, _ := asn1.Marshal(asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 2, Bytes: []byte("tp.example.org")})
	gns = append(gns, dns...)
	out, _ := asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: gns})
	return out
}

// FuzzPermanentIdentifiers: any subjectAltName a certificate crypto/x509 accepts.
// TP's own parser (which keeps the client binary free of step's template
// libraries) never reads an identity that step-ca's parser (the CA's view of the
// same certificate) would not: when TP's succeeds, the reference succeeds too and
// finds the same identifiers in the same order.
func FuzzPermanentIdentifiers(f *testing.F) {
	f.Add(sanSeed(f, "alice@laptop"))
	f.Add(sanSeed(f, "alice@laptop", "mallory@laptop"))
	f.Add(sanSeed(f, ""))
	f.Add(sanSeed(f))
	f.Add([]byte{0x30, 0x00})
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, san []byte) {
		c := sanCert(t, key, san)
		if c == nil {
			return
		}
		got, err := permanentIdentifiers(c)
		if err != nil {
			return // stricter than the reference is allowed: no identity, a refusal
		}
		ref, rerr := x509util.ParseSubjectAlternativeNames(c)
		if rerr != nil {
			t.Fatalf("TP read identifiers %q from a SAN step-ca refuses (%v): % x", got, rerr, san)
		}
		var want []string
		for _, p := range ref.PermanentIdentifiers {
			want = append(want, p.Identifier)
		}
		if !slices.Equal(got, want) {
			t.Fatalf("TP read %q, step-ca %q, from % x", got, want, san)
		}
	})
}

// TestPermanentIdentifiersRefusesMalformed: bad input, each a subjectAltName a
// forged or broken certificate could carry; every one is an error, not a skip that
// would let a second, readable identifier stand alone.
func TestPermanentIdentifiersRefusesMalformed(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	good := sanSeed(t, "alice@laptop")
	wrap := func(gns ...[]byte) []byte {
		out, _ := asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: slices.Concat(gns...)})
		return out
	}
	var goodSeq asn1.RawValue
	if _, err := asn1.Unmarshal(good, &goodSeq); err != nil {
		t.Fatal(err)
	}
	oid, _ := asn1.Marshal(oidPermanentIdentifier)
	notUTF8, _ := asn1.Marshal(asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 0, IsCompound: true, Bytes: slices.Concat(oid,
		mustMarshal(t, asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 0, IsCompound: true, Bytes: mustMarshal(t, asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: []byte{0x02, 0x01, 0x05}})}))})
	untagged, _ := asn1.Marshal(asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 0, IsCompound: true, Bytes: slices.Concat(oid,
		mustMarshal(t, asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: mustMarshal(t, "alice@laptop")}))})
	hmnOID, _ := asn1.Marshal(asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 8, 4})
	badHMN, _ := asn1.Marshal(asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 0, IsCompound: true, Bytes: slices.Concat(hmnOID,
		mustMarshal(t, asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 0, IsCompound: true, Bytes: []byte{0x02, 0x01, 0x05}}))})
	tpmOID, _ := asn1.Marshal(asn1.ObjectIdentifier{2, 23, 133, 2, 1})
	atv := mustMarshal(t, asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: slices.Concat(tpmOID, []byte{0x02, 0x01, 0x05})})
	rdn := mustMarshal(t, asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSet, IsCompound: true, Bytes: atv})
	tpmInteger, _ := asn1.Marshal(asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true,
		Bytes: mustMarshal(t, asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: rdn})})
	for _, tc := range []struct {
		name string
		san  []byte
	}{
		{"an identifier value that is an INTEGER, not a UTF8String", wrap(goodSeq.Bytes, notUTF8)},
		{"a permanentIdentifier without its [0] tag", wrap(untagged, goodSeq.Bytes)},
		// The CA refuses these (or fails on them), so TP must not read the identity beside them.
		{"a hardwareModuleName whose value is an INTEGER, beside a good identifier", wrap(goodSeq.Bytes, badHMN)},
		{"a directoryName whose TPM manufacturer is an INTEGER, beside a good identifier", wrap(goodSeq.Bytes, tpmInteger)},
	} {
		c := sanCert(t, key, tc.san)
		if c == nil {
			t.Fatalf("%s: crypto/x509 refused the certificate; the test must reach TP's parser", tc.name)
		}
		if ids, err := permanentIdentifiers(c); err == nil {
			t.Errorf("%s: read %q, want an error", tc.name, ids)
		}
	}
	c := sanCert(t, key, sanSeed(t, "alice@laptop", "bob@phone"))
	if ids, err := permanentIdentifiers(c); err != nil || !slices.Equal(ids, []string{"alice@laptop", "bob@phone"}) {
		t.Fatalf("two identifiers read as %q, %v", ids, err)
	}
}

func mustMarshal(t *testing.T, v any) []byte {
	t.Helper()
	b, err := asn1.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

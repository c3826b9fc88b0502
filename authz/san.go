package authz

import (
	"crypto/x509/pkix"
	"encoding/asn1"
)

var (
	oidSubjectAltName      = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidPermanentIdentifier = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 8, 3}
)

// PermanentIdentifierSAN encodes a subjectAltName extension holding one RFC 4043
// permanentIdentifier otherName — the form TP's CA puts device IDs in, and the form
// a device's certificate request carries them in.
func PermanentIdentifierSAN(value string) (pkix.Extension, error) {
	type permanentIdentifier struct {
		IdentifierValue string `asn1:"utf8,optional"`
	}
	inner, err := asn1.Marshal(permanentIdentifier{IdentifierValue: value})
	if err != nil {
		return pkix.Extension{}, err
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
		return pkix.Extension{}, err
	}
	seq, err := asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: on})
	if err != nil {
		return pkix.Extension{}, err
	}
	return pkix.Extension{Id: oidSubjectAltName, Value: seq}, nil
}

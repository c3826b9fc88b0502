package authz

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"unicode/utf8"
)

var (
	oidSubjectAltName      = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidPermanentIdentifier = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 8, 3}
	oidHardwareModuleName  = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 8, 4}
	// The TPM attributes (TCG EK credential profile) step-ca reads from a
	// directoryName as strings.
	oidTPMAttributes = []asn1.ObjectIdentifier{{2, 23, 133, 2, 1}, {2, 23, 133, 2, 2}, {2, 23, 133, 2, 3}}
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

// permanentIdentifiers returns the value of every RFC 4043 permanentIdentifier
// otherName in leaf's subjectAltName extension, in order. Other kinds of name are
// skipped; anything malformed on the way to a permanentIdentifier is an error, so
// a certificate TP cannot read fully never yields an identity. crypto/x509 has
// already refused certificates with two subjectAltName extensions.
func permanentIdentifiers(leaf *x509.Certificate) ([]string, error) {
	var ids []string
	for _, ext := range leaf.Extensions {
		if !ext.Id.Equal(oidSubjectAltName) {
			continue
		}
		var names asn1.RawValue
		if rest, err := asn1.Unmarshal(ext.Value, &names); err != nil {
			return nil, err
		} else if len(rest) > 0 {
			return nil, errors.New("bytes after the subjectAltName sequence")
		}
		if names.Class != asn1.ClassUniversal || names.Tag != asn1.TagSequence || !names.IsCompound {
			return nil, errors.New("subjectAltName is not a sequence")
		}
		for b := names.Bytes; len(b) > 0; {
			var gn asn1.RawValue
			var err error
			if b, err = asn1.Unmarshal(b, &gn); err != nil {
				return nil, err
			}
			if gn.Class != asn1.ClassContextSpecific {
				return nil, errors.New("subjectAltName holds an element that is no GeneralName")
			}
			if gn.Tag == 4 {
				// A directoryName holds no identity, but the CA reads one (TPM
				// attributes): a certificate the CA could not read is not read here
				// either.
				if err := checkDirectoryName(gn); err != nil {
					return nil, err
				}
				continue
			}
			if gn.Tag != 0 {
				continue // another kind of name: only otherName ([0]) can hold an identity
			}
			id, ok, err := permanentIdentifier(gn)
			if err != nil {
				return nil, err
			}
			if ok {
				ids = append(ids, id)
			}
		}
	}
	return ids, nil
}

// permanentIdentifier decodes one otherName: ok is false when it is another kind
// of otherName.
//
//	OtherName ::= SEQUENCE { type-id OBJECT IDENTIFIER, value [0] EXPLICIT ANY }
//	PermanentIdentifier ::= SEQUENCE { identifierValue UTF8String OPTIONAL,
//	                                   assigner OBJECT IDENTIFIER OPTIONAL }
func permanentIdentifier(gn asn1.RawValue) (string, bool, error) {
	if !gn.IsCompound {
		return "", false, errors.New("otherName is not constructed")
	}
	var on struct {
		TypeID asn1.ObjectIdentifier
		Value  asn1.RawValue
	}
	if rest, err := asn1.UnmarshalWithParams(gn.FullBytes, &on, "tag:0"); err != nil {
		return "", false, fmt.Errorf("otherName: %w", err)
	} else if len(rest) > 0 {
		return "", false, errors.New("bytes after an otherName")
	}
	if on.TypeID.Equal(oidHardwareModuleName) {
		// No identity either, but one the CA parses: malformed, it makes the CA
		// refuse the whole subjectAltName, so TP refuses it too.
		var hmn struct {
			Type         asn1.ObjectIdentifier
			SerialNumber []byte `asn1:"tag:4"`
		}
		if _, err := asn1.UnmarshalWithParams(on.Value.FullBytes, &hmn, "explicit,tag:0"); err != nil {
			return "", false, fmt.Errorf("hardwareModuleName: %w", err)
		}
		return "", false, nil
	}
	if !on.TypeID.Equal(oidPermanentIdentifier) {
		return "", false, nil
	}
	if on.Value.Class != asn1.ClassContextSpecific || on.Value.Tag != 0 || !on.Value.IsCompound {
		return "", false, errors.New("permanentIdentifier value is not tagged [0]")
	}
	// Read the sequence element by element: encoding/asn1 would take an element
	// of the wrong type for an absent optional field and go on.
	var seq asn1.RawValue
	if rest, err := asn1.Unmarshal(on.Value.Bytes, &seq); err != nil {
		return "", false, fmt.Errorf("permanentIdentifier: %w", err)
	} else if len(rest) > 0 {
		return "", false, errors.New("bytes after a permanentIdentifier")
	}
	if seq.Class != asn1.ClassUniversal || seq.Tag != asn1.TagSequence || !seq.IsCompound {
		return "", false, errors.New("permanentIdentifier is not a sequence")
	}
	var value string
	b := seq.Bytes
	for i := 0; len(b) > 0; i++ {
		var el asn1.RawValue
		var err error
		if b, err = asn1.Unmarshal(b, &el); err != nil {
			return "", false, fmt.Errorf("permanentIdentifier: %w", err)
		}
		switch {
		case i == 0 && el.Class == asn1.ClassUniversal && el.Tag == asn1.TagUTF8String && !el.IsCompound:
			if !utf8.Valid(el.Bytes) {
				return "", false, errors.New("permanentIdentifier value is not UTF-8")
			}
			value = string(el.Bytes)
		case el.Class == asn1.ClassUniversal && el.Tag == asn1.TagOID && len(b) == 0:
			var oid asn1.ObjectIdentifier
			if _, err := asn1.Unmarshal(el.FullBytes, &oid); err != nil {
				return "", false, fmt.Errorf("permanentIdentifier assigner: %w", err)
			}
		default:
			return "", false, errors.New("permanentIdentifier holds an element that is neither its value nor its assigner")
		}
	}
	return value, true, nil
}

// checkDirectoryName refuses a directoryName GeneralName that step-ca's reading
// of the same certificate would refuse (or fail on): one that is no RDN sequence,
// or whose TPM attributes are not strings.
func checkDirectoryName(gn asn1.RawValue) error {
	var rdns pkix.RDNSequence
	if rest, err := asn1.Unmarshal(gn.Bytes, &rdns); err != nil {
		return fmt.Errorf("directoryName: %w", err)
	} else if len(rest) > 0 {
		return errors.New("bytes after a directoryName")
	}
	for _, set := range rdns {
		for _, atv := range set {
			for _, oid := range oidTPMAttributes {
				if _, ok := atv.Value.(string); atv.Type.Equal(oid) && !ok {
					return fmt.Errorf("directoryName: TPM attribute %v is not a string", atv.Type)
				}
			}
		}
	}
	return nil
}

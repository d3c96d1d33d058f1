package dps_test

import (
	"crypto/ecdsa"
	"crypto/x509"
	"testing"
)

type ecdsaKey = ecdsa.PrivateKey

func mustParse(t *testing.T, der []byte) *x509.Certificate {
	t.Helper()
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

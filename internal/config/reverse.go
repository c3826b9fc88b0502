package config

import "strings"

// validZone accepts a lower-case DNS name of two or more labels.
func validZone(z string) bool {
	labels := strings.Split(z, ".")
	if len(labels) < 2 || len(z) > 200 {
		return false
	}
	for _, l := range labels {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for i := 0; i < len(l); i++ {
			if c := l[i]; !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

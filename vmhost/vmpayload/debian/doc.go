// Package debian is a small client for a Debian archive, enough to build
// actiond's VM payload with nothing but Go and HTTP: it fetches a suite's
// InRelease and verifies its OpenPGP signature against Debian's archive
// keys (carried in this package), fetches Packages.xz checked by its
// SHA-256 in InRelease, downloads .deb files checked by their SHA-256 in
// Packages into a cache, resolves dependencies the way debootstrap's first
// stage does, and unpacks .deb files (ar, then tar with xz, zstd or gzip).
//
// Nothing unverified is ever kept: downloads go to a temporary name and
// are renamed into the cache only after their hash matched.
package debian

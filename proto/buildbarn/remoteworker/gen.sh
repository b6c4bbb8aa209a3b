#!/bin/sh
# Regenerates remoteworker.pb.go and remoteworker_grpc.pb.go. Needs protoc
# (Debian protobuf-compiler), protoc-gen-go and protoc-gen-go-grpc on PATH:
#   go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
#   go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
set -eu
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
go run ./internal/descset "$tmp/deps.pb"
cd ../..
protoc --descriptor_set_in="$tmp/deps.pb" --proto_path=. \
  --go_out=. --go_opt=paths=source_relative \
  --go-grpc_out=. --go-grpc_opt=paths=source_relative \
  buildbarn/remoteworker/remoteworker.proto

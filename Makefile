# actiond: `make test` installs what the tests need, builds test payloads
# (cached outside the clone) and runs every test. `make bench` runs the
# benchmarks. Everything else is plain `go`.

GO          ?= go
CACHE_DIR   ?= /var/cache/actiond
RUNTIME_DIR ?= $(CACHE_DIR)/runtimes
VM_DIR      ?= $(CACHE_DIR)/vm
ARCH        ?= amd64
FUZZTIME    ?= 10s
TEST_TIMEOUT ?= 60m
STATICCHECK_VERSION ?= v0.8.2
export ACTIOND_RUNTIME_DIR := $(RUNTIME_DIR)
# serve-vm, `actiond vm payload` and the VM tests find payloads here
# (default: the user's cache dir).
export ACTIOND_VM_PAYLOAD_DIR := $(VM_DIR)

# Debian packages the tests use, as "command:package". makedeps_test.go
# fails when the code or a test runs a program this list does not install.
DEB_DEPS := bazel:bazel-bootstrap debootstrap:debootstrap mksquashfs:squashfs-tools unsquashfs:squashfs-tools \
            protoc:protobuf-compiler mkfs.ext4:e2fsprogs ip:iproute2 gcc:gcc wget:wget xz:xz-utils \
            qemu-system-x86_64:qemu-system-x86 qemu-system-aarch64:qemu-system-arm cpio:cpio \
            unshare:util-linux setpriv:util-linux chromium:chromium \
            chmod:coreutils chown:coreutils touch:coreutils dash:dash ldd:libc-bin

.PHONY: all build test deps runtimes vm-payload vm-payloads standalone darwin unit shared-root fuzz vet bench fmt

STANDALONE_BIN ?= bin/actiond-standalone

all: build

build:
	$(GO) build ./...

# deps installs missing Debian packages (as root) and downloads Go modules.
deps:
	@missing=""; for d in $(DEB_DEPS); do \
	  cmd=$${d%%:*}; pkg=$${d#*:}; \
	  command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || [ -x /sbin/$$cmd ] || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make deps: missing Debian packages:$$missing (run as root to install them)"; \
	  else echo "make deps: installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi; \
	fi
	$(GO) mod download

# runtimes builds the glibc runtime SquashFS images (debootstrap, cached).
runtimes: deps
	@if [ "$$(id -u)" = 0 ]; then tools/mkruntimes.sh $(RUNTIME_DIR); \
	else echo "make runtimes: needs root (debootstrap); runtime tests will skip"; fi

# vm-payload builds the kernel, initramfs and runtimes disk that serve-vm
# boots, for ARCH=amd64|arm64, into $(VM_DIR)/$(ARCH) (cached): the same
# Go builder as `actiond vm payload` and serve-vm's first start (no root,
# no Debian tools; Debian's archive over HTTP).
vm-payload:
	$(GO) run ./cmd/actiond vm payload --arch $(ARCH) --payload-dir $(VM_DIR)/$(ARCH)

vm-payloads:
	$(MAKE) vm-payload ARCH=amd64
	$(MAKE) vm-payload ARCH=arm64

# standalone: actiond with the VM payload embedded (serve-vm needs no other
# file; serve uses the embedded runtimes). Staged files are git-ignored.
standalone: runtimes vm-payload
	$(GO) run ./tools/stagepayload -payload-dir $(VM_DIR)/$(ARCH) -runtime-dir $(RUNTIME_DIR) -out internal/payload/files
	$(GO) build -trimpath -tags actiond_standalone -o $(STANDALONE_BIN) ./cmd/actiond

# darwin builds actiond for macOS (Apple silicon) and signs it ad hoc with
# the virtualization entitlement, for installing. Needs a Mac: the vz
# backend uses cgo (Virtualization.framework), which needs Apple's SDK.
# (serve-vm signs a copy of an unsigned binary by itself; this is for a
# binary you install.)
DARWIN_BIN ?= bin/actiond-darwin-arm64
darwin:
	CGO_ENABLED=1 GOOS=darwin GOARCH=arm64 $(GO) build -trimpath -o $(DARWIN_BIN) ./cmd/actiond
	codesign --sign - --force --entitlements vmhost/vz/actiond.entitlements $(DARWIN_BIN)
	codesign -d --entitlements - --xml $(DARWIN_BIN) | grep -q com.apple.security.virtualization

vet:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) ./...

unit:
	$(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./...

# shared-root runs the sandbox and actiondfs suites and the Bazel
# remote-execution e2e again in a mount namespace whose / is rshared, as on
# every systemd host (this lab's / is private, which hides mount leaks).
shared-root:
	@if [ "$$(id -u)" != 0 ]; then echo "make shared-root: needs root (unshare -m)"; \
	  if [ "$$CI" = true ]; then exit 1; fi; exit 0; fi
	unshare -m --propagation shared -- sh -c 'mount --make-rshared / && \
	  $(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./sandbox/... ./fs/ && \
	  $(GO) test -count=1 -timeout $(TEST_TIMEOUT) -run "^TestBazelRemoteExec" ./e2e/'

# fuzz runs each fuzz target briefly (go test allows one target per run).
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParseDigest$$' -fuzztime $(FUZZTIME) ./cas/
	$(GO) test -run '^$$' -fuzz '^FuzzParseResource$$' -fuzztime $(FUZZTIME) ./cas/

test: deps runtimes vm-payloads vet
	$(MAKE) unit
	$(MAKE) shared-root
	$(MAKE) fuzz

# bench runs the Go benchmarks and bench/run.sh (Execute latency against
# Bazel's linux-sandbox, input staging, the stress build remote vs local);
# numbers go into BENCHMARKS.md by hand.
bench: deps runtimes vm-payload
	$(GO) test -run '^$$' -bench . -benchtime 3x -timeout 60m ./cas/ ./executor/ ./fs/ ./vmhost/ ./vmhost/qemu/
	bench/run.sh

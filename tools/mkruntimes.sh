#!/usr/bin/env bash
# mkruntimes.sh OUTDIR [RUNTIME...]
#
# Builds the actiond runtime root images: zstd SquashFS images of Debian
# "minbase" trees, one per glibc version, named after the `libc` platform
# property value that selects them:
#
#   glibc2.31  Debian 11 bullseye
#   glibc2.36  Debian 12 bookworm
#   glibc2.41  Debian 13 trixie
#
# For each runtime: debootstrap --variant=minbase SUITE TREE MIRROR, check
# that `chroot TREE ldd --version` reports the expected glibc and that the
# tree has /etc/passwd, /etc/group, /etc/shadow, /etc/nsswitch.conf, then
# mksquashfs TREE IMAGE -comp zstd -noappend (without var/cache/apt/archives/
# *.deb and var/lib/apt/lists/*). Before packaging, /etc/hostname,
# /etc/resolv.conf (which debootstrap copies from the build host) and
# /etc/hosts are replaced by host-independent ones (localhost only); the rest
# of /etc (passwd, group, shadow, ...) stays as debootstrap leaves it.
#
# Cached and idempotent: OUTDIR/NAME.squashfs.stamp records the recipe hash
# (script version, suite, mirror, variant, excludes, compression) and the
# image's sha256; a runtime whose image matches its stamp is skipped.
# Atomic: the image is written to a temporary name in OUTDIR and renamed; the
# stamp is written (also by rename) only after the image is in place.
#
# Needs root, debootstrap, mksquashfs (squashfs-tools >= 4.4 for zstd),
# debian-archive-keyring (with the trixie keys: bookworm's 2023.3+deb12u2
# has them), sha256sum, flock.
#
# Environment:
#   ACTIOND_DEBIAN_MIRROR   Debian mirror (default: the first Debian URI in
#                           /etc/apt/sources.list* that serves the suite,
#                           else http://deb.debian.org/debian)
#   MKRUNTIMES_JOBS         runtimes built at once (default: 2, or 1 on a
#                           single-core machine)
#   MKRUNTIMES_FORCE=1      rebuild even if the stamp matches
#   MKRUNTIMES_KEEP_TREE=1  keep the debootstrap trees in OUTDIR/.work
#   MKRUNTIMES_NO_CHECK_GPG=1  pass --no-check-gpg to debootstrap (last
#                           resort for a suite whose keys the host lacks;
#                           the recipe hash changes with it)
#
# Exit status: 0 if every requested runtime is up to date, 1 otherwise
# (each failure is reported on stderr with the runtime name and the tail of
# its log, OUTDIR/.logs/NAME.log), 2 on usage errors.

set -euo pipefail
shopt -s nullglob

# Bump when the recipe changes in a way that changes the images.
readonly SCRIPT_VERSION=2
readonly VARIANT=minbase
readonly COMP=zstd
# Excluded from the images (paths relative to the tree root, mksquashfs -wildcards syntax).
readonly EXCLUDES=('var/cache/apt/archives/*.deb' 'var/lib/apt/lists/*')

# name suite expected-glibc
readonly RUNTIMES=(
	"glibc2.31 bullseye 2.31"
	"glibc2.36 bookworm 2.36"
	"glibc2.41 trixie 2.41"
)

prog=${0##*/}
start_all=$SECONDS

die() { echo "$prog: $*" >&2; exit 2; }
say() { echo "$prog: $*" >&2; }

usage() {
	echo "usage: $prog OUTDIR [RUNTIME...]   (runtimes: glibc2.31 glibc2.36 glibc2.41)" >&2
	exit 2
}

[[ $# -ge 1 ]] || usage
[[ $1 != -h && $1 != --help ]] || usage
outdir=$1
shift

[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap and chroot need it)"
for tool in debootstrap mksquashfs sha256sum flock chroot findmnt; do
	command -v "$tool" >/dev/null || die "$tool not found (apt-get install debootstrap squashfs-tools util-linux coreutils)"
done
# (No `| grep -q`: with pipefail, grep exiting early SIGPIPEs mksquashfs.)
[[ $(mksquashfs -help 2>&1 || true) == *zstd* ]] || die "this mksquashfs has no zstd compressor (need squashfs-tools >= 4.4)"

mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
workroot=$outdir/.work
logdir=$outdir/.logs
mkdir -p "$workroot" "$logdir"

# One mkruntimes.sh per OUTDIR at a time (e.g. under make -j).
exec 9>"$outdir/.lock"
if ! flock -n 9; then
	say "another $prog is running on $outdir; waiting"
	flock 9
fi

# Select runtimes.
selected=()
if [[ $# -eq 0 ]]; then
	selected=("${RUNTIMES[@]}")
else
	for want in "$@"; do
		found=
		for r in "${RUNTIMES[@]}"; do
			read -r name _ _ <<<"$r"
			if [[ $name == "$want" ]]; then selected+=("$r"); found=1; fi
		done
		[[ -n $found ]] || die "unknown runtime $want"
	done
fi

# Candidate Debian mirrors, in order of preference.
mirror_candidates() {
	if [[ -n ${ACTIOND_DEBIAN_MIRROR:-} ]]; then
		echo "${ACTIOND_DEBIAN_MIRROR%/}"
		return
	fi
	local f
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
		[[ -r $f ]] || continue
		# one-line format: deb [opts] URI suite comp...; deb822: URIs: URI...
		sed -nE -e 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([a-z]+:\/\/[^[:space:]]+).*/\2/p' \
			-e 's/^URIs:[[:space:]]*(.*)/\1/p' "$f" | tr ' ' '\n'
	done | grep -E '^https?://' | grep -Ev -- '-security|/security|debian-ports' |
		grep -E '/debian/?$|snapshot\.debian\.org/archive/debian/[0-9TZ]+/?$' | sed 's:/*$::' || true
	echo "http://deb.debian.org/debian"
}

# pick_mirror SUITE: the first candidate that serves dists/SUITE/Release.
pick_mirror() {
	local suite=$1 m
	while read -r m; do
		[[ -n $m ]] || continue
		if wget -q --spider --timeout=20 --tries=2 "$m/dists/$suite/Release" 2>/dev/null; then
			echo "$m"
			return 0
		fi
	done < <(mirror_candidates | awk '!seen[$0]++')
	return 1
}

recipe_hash() { # name suite mirror
	{
		echo "script-version=$SCRIPT_VERSION"
		echo "name=$1"
		echo "suite=$2"
		echo "mirror=$3"
		echo "variant=$VARIANT"
		echo "comp=$COMP"
		printf 'exclude=%s\n' "${EXCLUDES[@]}"
		[[ -z ${MKRUNTIMES_NO_CHECK_GPG:-} ]] || echo "no-check-gpg"
	} | sha256sum | cut -d' ' -f1
}

stamp_field() { # stampfile key
	awk -v k="$2=" 'index($0, k) == 1 { print substr($0, length(k) + 1); exit }' "$1" 2>/dev/null || true
}

# Unmount whatever debootstrap left mounted inside dir, then delete it
# without crossing into other filesystems.
remove_tree() {
	local dir=$1 m
	[[ -e $dir ]] || return 0
	while read -r m; do
		umount -l "$m" 2>/dev/null || true
	done < <(findmnt -rn -o TARGET | awk -v d="$dir/" 'index($0, d) == 1' | sort -r)
	rm -rf --one-file-system "$dir"
}

human() { # bytes
	awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'
}

# build_one NAME SUITE GLIBC MIRROR HASH: runs in a subshell; progress on
# stderr, tool output in the log.
build_one() {
	local name=$1 suite=$2 glibc=$3 mirror=$4 hash=$5
	local log=$logdir/$name.log image=$outdir/$name.squashfs stamp=$outdir/$name.squashfs.stamp
	local t0=$SECONDS t work tree tmpimg excl step
	work=$(mktemp -d "$workroot/$name.XXXXXX")
	tree=$work/root
	tmpimg=$outdir/.$name.squashfs.tmp.$BASHPID
	excl=$work/excludes
	step=setup
	: >"$log"

	cleanup() {
		rm -f "$tmpimg"
		if [[ -n ${MKRUNTIMES_KEEP_TREE:-} ]]; then
			echo "$prog: runtime $name: tree kept in $tree" >&2
		else
			remove_tree "$work"
		fi
	}
	fail() {
		echo "$prog: runtime $name: FAILED during $step after $((SECONDS - t0))s: $*" >&2
		echo "$prog: runtime $name: last lines of $log:" >&2
		tail -n 25 "$log" | sed "s/^/  [$name] /" >&2
		cleanup
		exit 1
	}
	trap 'fail "interrupted"' INT TERM
	trap 'fail "unexpected error at line $LINENO"' ERR

	step=debootstrap
	echo "$prog: runtime $name: debootstrap $suite from $mirror ... (1/3)" >&2
	local gpg=()
	[[ -z ${MKRUNTIMES_NO_CHECK_GPG:-} ]] || gpg=(--no-check-gpg)
	t=$SECONDS
	debootstrap "${gpg[@]}" --variant="$VARIANT" "$suite" "$tree" "$mirror" >>"$log" 2>&1 ||
		fail "debootstrap $suite exited with status $?"
	echo "$prog: runtime $name: debootstrap done in $((SECONDS - t))s" >&2

	step=check
	echo "$prog: runtime $name: checking glibc $glibc and /etc ... (2/3)" >&2
	local ldd
	# Whole output first: `| head -1` can kill ldd with SIGPIPE (and pipefail reports it).
	ldd=$(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C chroot "$tree" ldd --version 2>>"$log") ||
		fail "chroot $tree ldd --version failed (status $?)"
	ldd=${ldd%%$'\n'*}
	echo "ldd --version: $ldd" >>"$log"
	# e.g. "ldd (Debian GLIBC 2.36-9+deb12u10) 2.36"
	[[ ${ldd##* } == "$glibc" ]] || fail "ldd --version reports '$ldd', want glibc $glibc"
	local f
	for f in etc/passwd etc/group etc/shadow etc/nsswitch.conf bin/sh; do
		[[ -e $tree/$f ]] || fail "tree lacks /$f"
	done
	# debootstrap must have unmounted /proc and /sys again; do not package them.
	local leftover
	leftover=$(findmnt -rn -o TARGET | awk -v d="$tree/" 'index($0, d) == 1')
	[[ -z $leftover ]] || fail "mounts left inside $tree: ${leftover//$'\n'/ }"

	# debootstrap copies the build host's /etc/hostname and /etc/resolv.conf
	# into the tree; the images must not depend on (or reveal) the machine
	# that built them. Actions get loopback-only networking: localhost must
	# resolve without DNS.
	step=normalize
	printf 'localhost\n' >"$tree/etc/hostname"
	printf '# actiond runtime: actions have no network but loopback.\n' >"$tree/etc/resolv.conf"
	printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$tree/etc/hosts"

	step=mksquashfs
	echo "$prog: runtime $name: mksquashfs -comp $COMP ... (3/3)" >&2
	printf '%s\n' "${EXCLUDES[@]}" >"$excl"
	t=$SECONDS
	rm -f "$tmpimg"
	mksquashfs "$tree" "$tmpimg" -comp "$COMP" -noappend -no-progress -wildcards -ef "$excl" >>"$log" 2>&1 ||
		fail "mksquashfs exited with status $?"
	local sha size
	sha=$(sha256sum "$tmpimg" | cut -d' ' -f1)
	size=$(stat -c %s "$tmpimg")

	step=install
	rm -f "$stamp"
	mv -f "$tmpimg" "$image"
	{
		echo "recipe=$hash"
		echo "sha256=$sha"
		echo "size=$size"
		echo "name=$name"
		echo "suite=$suite"
		echo "mirror=$mirror"
		echo "ldd=$ldd"
		echo "script-version=$SCRIPT_VERSION"
	} >"$stamp.tmp.$BASHPID"
	mv -f "$stamp.tmp.$BASHPID" "$stamp"
	cleanup
	echo "$prog: runtime $name: mksquashfs done in $((SECONDS - t))s" >&2
	echo "$prog: runtime $name: built $image ($(human "$size"), $ldd) in $((SECONDS - t0))s" >&2
}

jobs_max=${MKRUNTIMES_JOBS:-}
if [[ -z $jobs_max ]]; then
	jobs_max=2
	[[ $(nproc 2>/dev/null || echo 1) -gt 1 ]] || jobs_max=1
fi
[[ $jobs_max =~ ^[1-9][0-9]*$ ]] || die "MKRUNTIMES_JOBS must be a positive integer"

# Leftovers of an interrupted run.
for w in "$workroot"/*; do remove_tree "$w"; done
rm -f "$outdir"/.*.squashfs.tmp.* "$outdir"/*.stamp.tmp.*

declare -A pid_name=()
failed=()
running=0

# Kill our own children (by pid) on interruption.
on_signal() {
	local p
	for p in "${!pid_name[@]}"; do
		# the build's current tool (debootstrap, mksquashfs), then the build subshell itself
		pkill -TERM -P "$p" 2>/dev/null || true
		kill -TERM "$p" 2>/dev/null || true
	done
	wait || true
	say "interrupted"
	exit 130
}
trap on_signal INT TERM

reap_one() {
	local done_pid=
	local rc=0
	wait -n -p done_pid "${!pid_name[@]}" || rc=$?
	[[ -n $done_pid ]] || return 0
	[[ $rc -eq 0 ]] || failed+=("${pid_name[$done_pid]}")
	unset "pid_name[$done_pid]"
	running=$((running - 1))
}

for r in "${selected[@]}"; do
	read -r name suite glibc <<<"$r"
	image=$outdir/$name.squashfs
	stamp=$outdir/$name.squashfs.stamp
	if ! mirror=$(pick_mirror "$suite"); then
		say "runtime $name: FAILED: no mirror serves $suite (candidates: $(mirror_candidates | awk '!seen[$0]++' | tr '\n' ' '); set ACTIOND_DEBIAN_MIRROR)"
		failed+=("$name")
		continue
	fi
	hash=$(recipe_hash "$name" "$suite" "$mirror")
	if [[ -z ${MKRUNTIMES_FORCE:-} && -f $image && -f $stamp && $(stamp_field "$stamp" recipe) == "$hash" ]]; then
		# A size check is cheap; the sha256 costs ~0.1 s per image and catches truncation or tampering.
		if [[ $(stat -c %s "$image") == "$(stamp_field "$stamp" size)" &&
			$(sha256sum "$image" | cut -d' ' -f1) == "$(stamp_field "$stamp" sha256)" ]]; then
			say "runtime $name: up to date ($image, $(human "$(stat -c %s "$image")"), $(stamp_field "$stamp" ldd))"
			continue
		fi
		say "runtime $name: image does not match its stamp; rebuilding"
	elif [[ -n ${MKRUNTIMES_FORCE:-} ]]; then
		say "runtime $name: MKRUNTIMES_FORCE set; rebuilding"
	elif [[ -f $image ]]; then
		say "runtime $name: recipe changed (or no stamp); rebuilding"
	fi
	while [[ $running -ge $jobs_max ]]; do reap_one; done
	build_one "$name" "$suite" "$glibc" "$mirror" "$hash" &
	pid_name[$!]=$name
	running=$((running + 1))
done
while [[ $running -gt 0 ]]; do reap_one; done

rmdir "$workroot" 2>/dev/null || true
if [[ ${#failed[@]} -gt 0 ]]; then
	say "FAILED runtimes: ${failed[*]} (logs in $logdir) after $((SECONDS - start_all))s"
	exit 1
fi
say "all runtimes ready in $outdir after $((SECONDS - start_all))s"

#!/usr/bin/env bash
# boot-qemu.sh [-a ARCH] [-p PAYLOAD_DIR] [-c CAS_IMAGE] [-s SOCKET] [-- KERNEL_ARGS...]
#
# Boots a payload built by `go run ./tools/vmpayload` under QEMU with TCG,
# for trying the guest by hand (tests and serve-vm start QEMU themselves):
# the console on this terminal (Ctrl-A X quits QEMU), the CAS disk
# (created sparse, 4 GiB, if missing; the guest formats it), the runtimes
# disk read-only, and the guest's virtio-serial port "actiond" on a unix
# socket (connect with streammux.Dial; one stream per gRPC connection).
# QMP is on SOCKET.qmp: {"execute":"system_powerdown"} presses the power
# button.
#
#   ARCH         amd64 (QEMU -M microvm) or arm64 (-M virt, virtio-pci);
#                default: this machine's
#   PAYLOAD_DIR  default /var/cache/actiond/vm/ARCH
#   CAS_IMAGE    default /tmp/actiond-vm-ARCH/cas.img
#   SOCKET       default /tmp/actiond-vm-ARCH/actiond.sock
#   KERNEL_ARGS  appended to the manifest's command line, e.g.
#                actiond.loglevel=debug
#
# Needs qemu-system-x86 (amd64) or qemu-system-arm (arm64), python3.

set -euo pipefail

arch=$(go env GOARCH 2>/dev/null || dpkg --print-architecture)
payload= cas= sock=
while getopts "a:p:c:s:h" opt; do
	case $opt in
	a) arch=$OPTARG ;;
	p) payload=$OPTARG ;;
	c) cas=$OPTARG ;;
	s) sock=$OPTARG ;;
	*) sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
[[ ${1:-} == -- ]] && shift

payload=${payload:-/var/cache/actiond/vm/$arch}
work=/tmp/actiond-vm-$arch
cas=${cas:-$work/cas.img}
sock=${sock:-$work/actiond.sock}
mkdir -p "$work" "$(dirname "$cas")" "$(dirname "$sock")"
manifest=$payload/manifest.json
[[ -f $manifest ]] || { echo "boot-qemu: no $manifest; build it: go run ./cmd/actiond vm payload --arch $arch" >&2; exit 1; }

field() { python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); v=m
for k in sys.argv[2:]: v=v.get(k, "") if isinstance(v, dict) else ""
print(v)' "$manifest" "$@"; }

kernel=$payload/$(field kernel)
initrd=$payload/$(field initramfs)
runtimes=$(field runtimes)
[[ -e $cas ]] || truncate -s 4G "$cas"
rm -f "$sock" "$sock.qmp"

case $arch in
amd64)
	qemu=qemu-system-x86_64
	machine=(-M microvm,rtc=on -cpu max)
	dev=device
	cmdline=$(field cmdlines qemu-microvm)
	# Under TCG the guest's TSC is the host's; without its frequency the
	# guest calibrates against the emulated PIT, which fails (and hangs
	# the boot) on a busy host. cpu MHz is close enough here.
	khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
	[[ -n $khz ]] && cmdline+=" tsc_early_khz=$khz"
	;;
arm64)
	qemu=qemu-system-aarch64
	machine=(-M virt -cpu cortex-a72)
	dev=pci
	cmdline=$(field cmdlines qemu-virt)
	;;
*) echo "boot-qemu: unknown arch $arch" >&2; exit 2 ;;
esac
cmdline+=" $*"

args=("${machine[@]}" -accel tcg -m 2048 -smp 2 -nographic -nodefaults -no-reboot
	-chardev stdio,id=con,mux=on,signal=off -serial chardev:con -mon chardev=con,mode=readline
	-kernel "$kernel" -initrd "$initrd" -append "$cmdline"
	-drive "id=cas,file=$cas,format=raw,if=none" -device "virtio-blk-$dev,drive=cas")
if [[ -n $runtimes ]]; then
	args+=(-drive "id=rt,file=$payload/$runtimes,format=raw,if=none,readonly=on" -device "virtio-blk-$dev,drive=rt")
fi
args+=(-device "virtio-serial-$dev"
	-chardev "socket,path=$sock,server=on,wait=off,id=c0" -device virtserialport,chardev=c0,name=actiond
	-device "virtio-rng-$dev"
	-qmp "unix:$sock.qmp,server=on,wait=off")

echo "boot-qemu: $qemu ${args[*]}" >&2
echo "boot-qemu: guest link on $sock (streammux); QMP on $sock.qmp; Ctrl-A X quits" >&2
exec "$qemu" "${args[@]}"

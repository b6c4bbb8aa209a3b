package guest

import (
	"encoding/binary"
	"io"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"strings"
)

// Linux input event constants (linux/input-event-codes.h).
const (
	evKey    = 0x01
	keyPower = 116
	// inputEventSize is sizeof(struct input_event) on 64-bit kernels:
	// struct timeval (16) + type (2) + code (2) + value (4).
	inputEventSize = 24
)

// hasKey reports whether a capabilities/key bitmap (hex words, most
// significant first, as in /sys/class/input/*/device/capabilities/key)
// has the bit for code.
func hasKey(bitmap string, code int) bool {
	words := strings.Fields(bitmap)
	if len(words) == 0 {
		return false
	}
	n := new(big.Int)
	wordBits := 64
	for _, w := range words {
		v, ok := new(big.Int).SetString(w, 16)
		if !ok {
			return false
		}
		n.Lsh(n, uint(wordBits))
		n.Or(n, v)
	}
	return n.Bit(code) == 1
}

// watchPowerButton watches the input devices that have a power key (the
// ACPI power button on x86, gpio-keys on arm64: what QEMU's
// system_powerdown and a hypervisor's "stop" press) and sends on the
// returned channel when one is pressed. It returns the names of the
// devices it watches (none without evdev and a button driver).
func watchPowerButton(log *slog.Logger) (<-chan string, []string) {
	ch := make(chan string, 1)
	events, _ := filepath.Glob("/sys/class/input/event*")
	var names []string
	for _, sys := range events {
		if !hasKey(readSysString(filepath.Join(sys, "device", "capabilities", "key")), keyPower) {
			continue
		}
		dev := "/dev/input/" + filepath.Base(sys)
		name := readSysString(filepath.Join(sys, "device", "name"))
		f, err := os.Open(dev)
		if err != nil {
			log.Warn("cannot watch the power button", "device", dev, "err", err)
			continue
		}
		names = append(names, name)
		go func() {
			defer f.Close()
			buf := make([]byte, inputEventSize)
			for {
				if _, err := io.ReadFull(f, buf); err != nil {
					log.Warn("power button watch ended", "device", dev, "err", err)
					return
				}
				typ := binary.NativeEndian.Uint16(buf[16:])
				code := binary.NativeEndian.Uint16(buf[18:])
				value := int32(binary.NativeEndian.Uint32(buf[20:]))
				if typ == evKey && code == keyPower && value == 1 {
					select {
					case ch <- "power button (" + name + ")":
					default:
					}
				}
			}
		}()
	}
	return ch, names
}

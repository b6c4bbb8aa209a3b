package vmhost

import (
	"context"
	"fmt"
	"net"
	"time"

	"google.golang.org/protobuf/types/known/emptypb"
)

// GuestControlService is the gRPC service package guest serves next to
// the REAPI services for the host (guest.ControlService; vmhost does not
// import package guest, which only builds for the guest).
const GuestControlService = "actiond.guest.v1.Guest"

// PowerOffTimeout bounds RequestPowerOff's call.
const PowerOffTimeout = 5 * time.Second

// RequestPowerOff asks the guest, through a new stream from dial, to shut
// down cleanly (drain, sync, unmount) and power off. It returns once the
// guest accepted; the VM ends some time later.
func RequestPowerOff(ctx context.Context, dial func(context.Context) (net.Conn, error)) error {
	ctx, cancel := context.WithTimeout(ctx, PowerOffTimeout)
	defer cancel()
	cc, err := dialClientConn(ctx, dial)
	if err != nil {
		return fmt.Errorf("power off: %w", err)
	}
	defer cc.Close()
	if err := cc.Invoke(ctx, "/"+GuestControlService+"/PowerOff", &emptypb.Empty{}, &emptypb.Empty{}); err != nil {
		return fmt.Errorf("power off: %w", err)
	}
	return nil
}

package guest

import (
	"context"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/structpb"
)

// ControlService is the gRPC service the guest serves next to the REAPI
// services, for the host that runs the VM:
//
//	rpc PowerOff(google.protobuf.Empty) returns (google.protobuf.Empty)
//	rpc Info(google.protobuf.Empty) returns (google.protobuf.Struct)
//
// PowerOff answers, then the guest shuts down as on SIGTERM: running calls
// drain (actiond.drain), file systems are synced and unmounted, and the VM
// powers off. It works on every transport and hypervisor, unlike a power
// button. Info describes the guest (kernel, disks, runtimes, boot timings).
const ControlService = "actiond.guest.v1.Guest"

// controlServer implements ControlService.
type controlServer interface {
	powerOff(ctx context.Context) error
	info(ctx context.Context) (*structpb.Struct, error)
}

var controlDesc = grpc.ServiceDesc{
	ServiceName: ControlService,
	HandlerType: (*controlServer)(nil),
	Methods: []grpc.MethodDesc{
		{MethodName: "PowerOff", Handler: func(srv any, ctx context.Context, dec func(any) error, ic grpc.UnaryServerInterceptor) (any, error) {
			in := new(emptypb.Empty)
			if err := dec(in); err != nil {
				return nil, err
			}
			h := func(ctx context.Context, _ any) (any, error) {
				return &emptypb.Empty{}, srv.(controlServer).powerOff(ctx)
			}
			if ic == nil {
				return h(ctx, in)
			}
			return ic(ctx, in, &grpc.UnaryServerInfo{Server: srv, FullMethod: "/" + ControlService + "/PowerOff"}, h)
		}},
		{MethodName: "Info", Handler: func(srv any, ctx context.Context, dec func(any) error, ic grpc.UnaryServerInterceptor) (any, error) {
			in := new(emptypb.Empty)
			if err := dec(in); err != nil {
				return nil, err
			}
			h := func(ctx context.Context, _ any) (any, error) { return srv.(controlServer).info(ctx) }
			if ic == nil {
				return h(ctx, in)
			}
			return ic(ctx, in, &grpc.UnaryServerInfo{Server: srv, FullMethod: "/" + ControlService + "/Info"}, h)
		}},
	},
	Metadata: "actiond/guest/control.go",
}

// PowerOff asks the guest behind cc to shut down cleanly and power off. It
// returns once the guest has accepted; wait for the VM to exit.
func PowerOff(ctx context.Context, cc grpc.ClientConnInterface) error {
	if err := cc.Invoke(ctx, "/"+ControlService+"/PowerOff", &emptypb.Empty{}, &emptypb.Empty{}); err != nil {
		return fmt.Errorf("guest power off: %w", err)
	}
	return nil
}

// Info returns the guest's description: kernel release, disks, runtimes,
// transport and boot timings (seconds since the kernel started).
func Info(ctx context.Context, cc grpc.ClientConnInterface) (map[string]any, error) {
	out := new(structpb.Struct)
	if err := cc.Invoke(ctx, "/"+ControlService+"/Info", &emptypb.Empty{}, out); err != nil {
		return nil, fmt.Errorf("guest info: %w", err)
	}
	return out.AsMap(), nil
}

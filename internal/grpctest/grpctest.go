// Package grpctest serves gRPC servers in process for tests: a real server
// on an in-memory (bufconn) listener, reached through a real client
// connection, so tests drive the services exactly as clients do without
// opening a port; and Serving, the health probe for a server started in
// another process.
package grpctest

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/test/bufconn"
)

// BufSize is the listener buffer most tests use.
const BufSize = 1 << 20

// Dial serves g on a bufconn listener of bufSize bytes and returns a client
// connection to it, dialled with opts after the in-memory dialer and
// insecure credentials. Stopping g and closing the connection are the
// caller's: tests differ in what else must be closed, and in which order.
func Dial(t testing.TB, g *grpc.Server, bufSize int, opts ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	lis := bufconn.Listen(bufSize)
	go g.Serve(lis)
	opts = append([]grpc.DialOption{
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
	}, opts...)
	conn, err := grpc.NewClient("passthrough:///bufconn", opts...)
	if err != nil {
		g.Stop()
		t.Fatalf("grpctest: dial the in-process server: %v", err)
	}
	return conn
}

// Serving dials the gRPC server listening at addr (a real address, for a
// server in another process) and asks its health service for the overall
// status, within timeout: nil when it is SERVING.
func Serving(addr string, timeout time.Duration) error {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return err
	}
	c.Close()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return err
	}
	if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("health: %v", resp.GetStatus())
	}
	return nil
}

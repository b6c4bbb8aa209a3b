package vmhost

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// ReadyOptions tune WaitReady.
type ReadyOptions struct {
	// Timeout bounds the whole wait (default 2 minutes: a first boot
	// formats the CAS disk, and TCG is slow).
	Timeout time.Duration
	// AttemptTimeout bounds one dial plus health check (default 5s).
	AttemptTimeout time.Duration
	// Interval is the pause between failed attempts (default 50ms).
	Interval time.Duration
	// Done, when closed, ends the wait at once (the VM died).
	Done <-chan struct{}
}

// WaitReady polls the guest's gRPC health service (service "", the whole
// server) through streams from dial until it answers SERVING. It returns
// how long that took, or an error naming the last failure.
func WaitReady(ctx context.Context, dial func(context.Context) (net.Conn, error), o ReadyOptions) (time.Duration, error) {
	if o.Timeout <= 0 {
		o.Timeout = 2 * time.Minute
	}
	if o.AttemptTimeout <= 0 {
		o.AttemptTimeout = 5 * time.Second
	}
	if o.Interval <= 0 {
		o.Interval = 50 * time.Millisecond
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	if o.Done != nil {
		go func() {
			select {
			case <-o.Done:
				cancel()
			case <-ctx.Done():
			}
		}()
	}
	var last error
	attempts := 0
	for {
		attempts++
		actx, acancel := context.WithTimeout(ctx, o.AttemptTimeout)
		err := CheckHealth(actx, dial)
		acancel()
		if err == nil {
			return time.Since(start), nil
		}
		last = err
		select {
		case <-ctx.Done():
			why := "timed out"
			if o.Done != nil {
				select {
				case <-o.Done:
					why = "the VM ended"
				default:
				}
			}
			if why == "timed out" && !errors.Is(ctx.Err(), context.DeadlineExceeded) {
				why = ctx.Err().Error()
			}
			return time.Since(start), fmt.Errorf("guest not ready after %v (%s, %d attempts): last error: %w", time.Since(start).Round(time.Millisecond), why, attempts, last)
		case <-time.After(o.Interval):
		}
	}
}

// CheckHealth opens one stream with dial and asks the guest's health
// service whether the server is SERVING.
func CheckHealth(ctx context.Context, dial func(context.Context) (net.Conn, error)) error {
	cc, err := dialClientConn(ctx, dial)
	if err != nil {
		return err
	}
	defer cc.Close()
	resp, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return fmt.Errorf("health check: %w", err)
	}
	if s := resp.GetStatus(); s != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("health check: status %v", s)
	}
	return nil
}

// dialClientConn opens one stream with dial and makes a gRPC client over
// it (ClientConn).
func dialClientConn(ctx context.Context, dial func(context.Context) (net.Conn, error)) (*grpc.ClientConn, error) {
	conn, err := dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("dial guest: %w", err)
	}
	cc, err := ClientConn(conn)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return cc, nil
}

// ClientConn makes a gRPC client over one already-open stream to the
// guest; it does not reconnect.
func ClientConn(conn net.Conn) (*grpc.ClientConn, error) {
	var once sync.Once
	cc, err := grpc.NewClient("passthrough:///actiond-guest",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var c net.Conn
			once.Do(func() { c = conn })
			if c == nil {
				return nil, errors.New("guest stream already used")
			}
			return c, nil
		}))
	if err != nil {
		return nil, fmt.Errorf("grpc client over guest stream: %w", err)
	}
	return cc, nil
}

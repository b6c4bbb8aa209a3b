package worker

import (
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
)

// MaxMessageSize bounds gRPC messages to and from the farm; it matches
// actiond's server limit (ExecuteResponses and batch reads can be large).
const MaxMessageSize = 64 << 20

// DialOptions are the gRPC options for reaching a scheduler or a CAS:
// plaintext, large messages, and a reconnection backoff short enough that
// a restarted scheduler is found again within seconds (gRPC's default
// grows to two minutes).
func DialOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessageSize), grpc.MaxCallSendMsgSize(MaxMessageSize)),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.Config{
				BaseDelay:  100 * time.Millisecond,
				Multiplier: 1.6,
				Jitter:     0.2,
				MaxDelay:   5 * time.Second,
			},
			MinConnectTimeout: 5 * time.Second,
		}),
	}
}

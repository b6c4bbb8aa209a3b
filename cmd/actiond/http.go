package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/observe"
)

// httpStatus is the optional --http listener: Prometheus metrics at
// /metrics and the status page at /.
type httpStatus struct {
	addr string
	obs  *observe.Observer
	srv  *http.Server
}

// prepare makes the observer and hooks it into opts; no-op without --http.
func (h *httpStatus) prepare(opts *actiond.Options) {
	if h.addr == "" {
		return
	}
	h.obs = observe.New(observe.Options{})
	opts.Observer = h.obs
	opts.GRPCOptions = append(opts.GRPCOptions, h.obs.ServerOptions()...)
}

// start attaches srv and starts serving; the returned function stops it.
func (h *httpStatus) start(srv *actiond.Server, log *slog.Logger) (func(), error) {
	if h.obs == nil {
		return func() {}, nil
	}
	h.obs.Attach(srv)
	l, err := net.Listen("tcp", h.addr)
	if err != nil {
		return nil, fmt.Errorf("--http: listen on %s: %w", h.addr, err)
	}
	h.srv = &http.Server{Handler: h.obs.Handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := h.srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("http status listener", "err", err)
		}
	}()
	log.Info("status page and metrics", "url", "http://"+l.Addr().String()+"/", "metrics", "http://"+l.Addr().String()+"/metrics")
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		h.srv.Shutdown(ctx)
	}, nil
}

// serveVMStatus starts serve-vm's optional --http listener. serve-vm is a
// byte proxy with no server of its own, so it exposes the VM's state; the
// guest's own metrics stay inside the guest. The returned setter records a
// state ("starting", "running", "dead", "stopped").
func serveVMStatus(addr string, log *slog.Logger) (func(string), func(), error) {
	if addr == "" {
		return func(string) {}, func() {}, nil
	}
	obs := observe.New(observe.Options{})
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("--http: listen on %s: %w", addr, err)
	}
	srv := &http.Server{Handler: obs.Handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("http status listener", "err", err)
		}
	}()
	log.Info("vm state metrics", "metrics", "http://"+l.Addr().String()+"/metrics")
	return obs.SetVMState, func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}, nil
}

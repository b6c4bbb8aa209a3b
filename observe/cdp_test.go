package observe_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// browser is headless Chromium driven over the DevTools protocol with a
// minimal client: enough to load a page, read the DOM and collect console
// errors, exceptions and failed loads.
type browser struct {
	t    *testing.T
	ws   *websocket.Conn
	mu   sync.Mutex
	next int
	wait map[int]chan cdpMsg
	errs []string
	load chan struct{}
}

type cdpMsg struct {
	ID     int             `json:"id,omitempty"`
	Method string          `json:"method,omitempty"`
	Params json.RawMessage `json:"params,omitempty"`
	Result json.RawMessage `json:"result,omitempty"`
	Error  *struct {
		Message string `json:"message"`
	} `json:"error,omitempty"`
}

func chromiumPath() string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return ""
}

// startBrowser starts Chromium with a fresh profile and connects to its
// first page.
func startBrowser(t *testing.T, bin string) *browser {
	t.Helper()
	profile := t.TempDir()
	cmd := exec.Command(bin, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
		"--user-data-dir="+profile, "--remote-debugging-port=0", "--remote-allow-origins=*", "about:blank")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	var port string
	deadline := time.Now().Add(30 * time.Second)
	for port == "" {
		if b, err := os.ReadFile(filepath.Join(profile, "DevToolsActivePort")); err == nil && strings.Contains(string(b), "\n") {
			port = strings.SplitN(string(b), "\n", 2)[0]
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("chromium did not open its DevTools port; stderr:\n%s", stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	var targets []struct{ Type, WebSocketDebuggerURL string }
	for {
		resp, err := http.Get("http://127.0.0.1:" + port + "/json/list")
		if err == nil {
			err = json.NewDecoder(resp.Body).Decode(&targets)
			resp.Body.Close()
		}
		wsURL := ""
		for _, tg := range targets {
			if tg.Type == "page" {
				wsURL = tg.WebSocketDebuggerURL
			}
		}
		if wsURL != "" {
			ws, err := websocket.Dial(wsURL, "", "http://127.0.0.1/")
			if err != nil {
				t.Fatalf("connect to DevTools at %s: %v", wsURL, err)
			}
			b := &browser{t: t, ws: ws, wait: map[int]chan cdpMsg{}, load: make(chan struct{}, 16)}
			t.Cleanup(func() { ws.Close() })
			go b.read()
			for _, m := range []string{"Page.enable", "Runtime.enable", "Log.enable"} {
				b.call(m, nil)
			}
			return b
		}
		if time.Now().After(deadline) {
			t.Fatalf("no page target in DevTools (%v); stderr:\n%s", err, stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (b *browser) read() {
	for {
		var m cdpMsg
		if err := websocket.JSON.Receive(b.ws, &m); err != nil {
			return
		}
		b.mu.Lock()
		if m.ID != 0 {
			if c := b.wait[m.ID]; c != nil {
				c <- m
				delete(b.wait, m.ID)
			}
			b.mu.Unlock()
			continue
		}
		switch m.Method {
		case "Page.loadEventFired":
			select {
			case b.load <- struct{}{}:
			default:
			}
		case "Runtime.exceptionThrown":
			b.errs = append(b.errs, "exception: "+string(m.Params))
		case "Runtime.consoleAPICalled":
			var p struct{ Type string }
			json.Unmarshal(m.Params, &p)
			if p.Type == "error" || p.Type == "assert" {
				b.errs = append(b.errs, "console."+p.Type+": "+string(m.Params))
			}
		case "Log.entryAdded":
			var p struct {
				Entry struct{ Level, Text, URL string }
			}
			json.Unmarshal(m.Params, &p)
			if p.Entry.Level == "error" {
				b.errs = append(b.errs, fmt.Sprintf("log error: %s %s", p.Entry.Text, p.Entry.URL))
			}
		}
		b.mu.Unlock()
	}
}

func (b *browser) call(method string, params any) json.RawMessage {
	b.t.Helper()
	b.mu.Lock()
	b.next++
	id := b.next
	c := make(chan cdpMsg, 1)
	b.wait[id] = c
	b.mu.Unlock()
	req := map[string]any{"id": id, "method": method}
	if params != nil {
		req["params"] = params
	}
	if err := websocket.JSON.Send(b.ws, req); err != nil {
		b.t.Fatalf("DevTools %s: %v", method, err)
	}
	select {
	case m := <-c:
		if m.Error != nil {
			b.t.Fatalf("DevTools %s: %s", method, m.Error.Message)
		}
		return m.Result
	case <-time.After(30 * time.Second):
		b.t.Fatalf("DevTools %s: no answer", method)
	}
	return nil
}

// navigate loads url and waits for its load event.
func (b *browser) navigate(url string) {
	b.t.Helper()
	for len(b.load) > 0 {
		<-b.load
	}
	b.call("Page.navigate", map[string]any{"url": url})
	select {
	case <-b.load:
	case <-time.After(30 * time.Second):
		b.t.Fatalf("%s did not load", url)
	}
}

// eval returns the string value of a JavaScript expression.
func (b *browser) eval(expr string) string {
	b.t.Helper()
	raw := b.call("Runtime.evaluate", map[string]any{"expression": expr, "returnByValue": true})
	var r struct {
		Result struct {
			Value any `json:"value"`
		} `json:"result"`
		ExceptionDetails any `json:"exceptionDetails"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		b.t.Fatalf("evaluate %s: %v", expr, err)
	}
	if r.ExceptionDetails != nil {
		b.t.Fatalf("evaluate %s: %v", expr, r.ExceptionDetails)
	}
	return fmt.Sprint(r.Result.Value)
}

func (b *browser) consoleErrors() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.errs...)
}

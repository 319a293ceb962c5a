// Command gopeer is the Go end of pysmux's end-to-end interoperability tests.
//
// It runs one side of an smux session with github.com/xtaci/smux (Debian's
// 1.5.16) over loopback TCP and reports what it saw as JSON lines on stdout,
// one object per line, each with an "event" field. Diagnostics go to stderr.
//
// The process always ends by itself: when its work is done, when stdin reaches
// EOF (the test closed it), or after -deadline (exit status 3). The line
// "close" on stdin tells -mode=abandon to close its session.
//
// A Go client closes its session when its work is done, unless -hold. Without
// -hold, anything the peer sent that Go had not read yet (a v2 UPD, a FIN)
// makes the kernel answer the close with a TCP reset, which can destroy data
// still in flight: smux has no graceful session close.
//
// Data the peer writes is a deterministic pattern seeded with the stream id
// (see pattern below); tests_e2e/peers.py produces the same bytes in Python.
package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/xtaci/smux"
)

// patternBlock is the period of the test pattern: a prime, so that a
// reordered or duplicated frame (32768 bytes) never lines up with itself.
const patternBlock = 65521

var (
	role      = flag.String("role", "server", "client or server")
	addr      = flag.String("addr", "127.0.0.1:0", "server: listen address; client: address to dial (loopback only)")
	version   = flag.Int("version", 1, "smux protocol version, 1 or 2")
	kaInt     = flag.Duration("ka-interval", 10*time.Second, "keepalive interval")
	kaTimeout = flag.Duration("ka-timeout", 30*time.Second, "keepalive timeout")
	noKA      = flag.Bool("no-keepalive", false, "disable keepalive")
	mode      = flag.String("mode", "echo", "server: echo|writefirst|sink; client: client-echo|send|readreply|abandon|openmany|idle")
	conns     = flag.Int("conns", 1, "server: connections to accept before closing the listener")
	streams   = flag.Int("streams", 1, "client: streams to open")
	workers   = flag.Int("workers", 0, "client: goroutines opening streams (0: one per stream)")
	size      = flag.Int64("size", 0, "bytes to write per stream (-1: until an error)")
	reply     = flag.Int64("reply", 0, "sink/readreply: bytes to write back after the peer's EOF")
	linger    = flag.Duration("linger", 0, "keep a failed session open this long before closing it")
	hold      = flag.Bool("hold", false, "client: echo streams the server opens; keep the session until it ends")
	deadline  = flag.Duration("deadline", 60*time.Second, "exit with status 3 after this long")
	useTLS    = flag.Bool("tls", false, "run smux over TLS (crypto/tls)")
	tlsCA     = flag.String("tls-ca", "", "with -tls: client: verify the server against this CA (PEM); server: require client certificates it signed")
	tlsCert   = flag.String("tls-cert", "", "with -tls: this end's certificate (PEM); a server needs one")
	tlsKey    = flag.String("tls-key", "", "with -tls: the private key of -tls-cert")
	tlsName   = flag.String("tls-server-name", "localhost", "with -tls, client: the name the server's certificate must have")
)

// closeCmd is closed when the line "close" arrives on stdin.
var (
	closeCmd  = make(chan struct{})
	closeOnce sync.Once
)

var (
	outMu sync.Mutex
	out   = json.NewEncoder(os.Stdout)
)

// emit prints one JSON object on stdout.
func emit(event string, kv ...interface{}) {
	m := map[string]interface{}{"event": event}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i].(string)] = kv[i+1]
	}
	outMu.Lock()
	defer outMu.Unlock()
	if err := out.Encode(m); err != nil {
		os.Exit(4)
	}
}

func errString(err error) interface{} {
	if err == nil {
		return nil
	}
	return err.Error()
}

var blocks sync.Map // seed -> []byte

// block returns the pattern period for a seed: SHA-256 of "seed:i" for
// i = 0, 1, ... concatenated and cut to patternBlock bytes.
func block(seed uint32) []byte {
	if b, ok := blocks.Load(seed); ok {
		return b.([]byte)
	}
	var buf bytes.Buffer
	for i := 0; buf.Len() < patternBlock; i++ {
		sum := sha256.Sum256([]byte(fmt.Sprintf("%d:%d", seed, i)))
		buf.Write(sum[:])
	}
	b := buf.Bytes()[:patternBlock]
	blocks.Store(seed, b)
	return b
}

// pattern fills dst with the pattern of seed starting at stream offset off.
func pattern(seed uint32, off int64, dst []byte) {
	b := block(seed)
	pos := int(off % patternBlock)
	for n := 0; n < len(dst); {
		c := copy(dst[n:], b[pos:])
		n += c
		pos = 0
	}
}

// writePattern writes n bytes of the pattern of seed (n < 0: until an error).
func writePattern(w io.Writer, seed uint32, n int64) (int64, error) {
	buf := make([]byte, 4*patternBlock)
	var done int64
	for n < 0 || done < n {
		chunk := int64(len(buf))
		if n >= 0 && n-done < chunk {
			chunk = n - done
		}
		pattern(seed, done, buf[:chunk])
		w2, err := w.Write(buf[:chunk])
		done += int64(w2)
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

// readToEOF reads until EOF and returns the byte count and SHA-256; a nil
// error means a clean EOF.
func readToEOF(r io.Reader) (int64, string, error) {
	h := sha256.New()
	n, err := io.Copy(h, r)
	return n, hex.EncodeToString(h.Sum(nil)), cleanEOF(err)
}

// cleanEOF maps io.EOF to nil. Stream.WriteTo (used by io.Copy) returns
// io.EOF at the peer's FIN, and Go 1.5.16 also returns io.EOF when the
// transport ends without a FIN: Go cannot tell the two apart (docs/design.md 9.4).
func cleanEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

func config() *smux.Config {
	c := smux.DefaultConfig()
	c.Version = *version
	c.KeepAliveDisabled = *noKA
	c.KeepAliveInterval = *kaInt
	c.KeepAliveTimeout = *kaTimeout
	return c
}

func main() {
	flag.Parse()
	host, _, err := net.SplitHostPort(*addr)
	if err != nil || !net.ParseIP(host).IsLoopback() {
		fmt.Fprintf(os.Stderr, "gopeer: -addr must be a loopback address, got %q\n", *addr)
		os.Exit(2)
	}
	if err := smux.VerifyConfig(config()); err != nil {
		fmt.Fprintf(os.Stderr, "gopeer: %v\n", err)
		os.Exit(2)
	}
	time.AfterFunc(*deadline, func() {
		emit("deadline")
		os.Exit(3)
	})
	go func() { // commands on stdin; EOF means the test is done with us: stop at once
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			if sc.Text() == "close" {
				closeOnce.Do(func() { close(closeCmd) })
			}
		}
		os.Exit(0)
	}()
	switch *role {
	case "server":
		runServer()
	case "client":
		runClient()
	default:
		fmt.Fprintf(os.Stderr, "gopeer: unknown -role %q\n", *role)
		os.Exit(2)
	}
	emit("done")
}

// tlsConfig is the crypto/tls configuration of -tls, -tls-ca, -tls-cert and
// -tls-key, for the client or the server side; TLS 1.2 at least.
func tlsConfig(server bool) *tls.Config {
	c := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: *tlsName}
	if *tlsCert != "" {
		pair, err := tls.LoadX509KeyPair(*tlsCert, *tlsKey)
		if err != nil {
			fmt.Fprintf(os.Stderr, "gopeer: -tls-cert: %v\n", err)
			os.Exit(2)
		}
		c.Certificates = []tls.Certificate{pair}
	}
	if *tlsCA != "" {
		pem, err := os.ReadFile(*tlsCA)
		pool := x509.NewCertPool()
		if err != nil || !pool.AppendCertsFromPEM(pem) {
			fmt.Fprintf(os.Stderr, "gopeer: -tls-ca: no certificate in %q (%v)\n", *tlsCA, err)
			os.Exit(2)
		}
		if server {
			c.ClientCAs = pool
			c.ClientAuth = tls.RequireAndVerifyClientCert
		} else {
			c.RootCAs = pool
		}
	}
	return c
}

// ---- server ----

func runServer() {
	var ln net.Listener
	var err error
	if *useTLS {
		ln, err = tls.Listen("tcp", *addr, tlsConfig(true))
	} else {
		ln, err = net.Listen("tcp", *addr)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "gopeer: %v\n", err)
		os.Exit(1)
	}
	emit("listening", "addr", ln.Addr().String(), "pid", os.Getpid())
	var wg sync.WaitGroup
	for i := 0; i < *conns; i++ {
		conn, err := ln.Accept()
		if err != nil {
			fmt.Fprintf(os.Stderr, "gopeer: accept: %v\n", err)
			os.Exit(1)
		}
		sess, err := smux.Server(conn, config())
		if err != nil {
			fmt.Fprintf(os.Stderr, "gopeer: %v\n", err)
			os.Exit(1)
		}
		emit("session", "remote", conn.RemoteAddr().String())
		wg.Add(1)
		go func() {
			defer wg.Done()
			serveSession(sess, *mode)
		}()
	}
	ln.Close()
	wg.Wait()
}

func serveSession(sess *smux.Session, mode string) {
	var wg sync.WaitGroup
	for {
		st, err := sess.AcceptStream()
		if err != nil {
			emit("session-end", "err", errString(err))
			break
		}
		emit("accepted", "id", st.ID())
		wg.Add(1)
		go func() {
			defer wg.Done()
			serveStream(st, mode)
		}()
	}
	if *linger > 0 {
		time.Sleep(*linger)
	}
	sess.Close()
	wg.Wait()
}

func serveStream(st *smux.Stream, mode string) {
	defer st.Close()
	switch mode {
	case "echo":
		n, err := io.Copy(st, st)
		err = cleanEOF(err)
		emit("stream", "id", st.ID(), "bytes", n, "err", errString(err))
	case "writefirst":
		n, err := writePattern(st, st.ID(), *size)
		emit("stream", "id", st.ID(), "written", n, "err", errString(err))
	case "sink":
		n, sum, err := readToEOF(st)
		var w int64
		var werr error
		if err == nil && *reply != 0 {
			w, werr = writePattern(st, st.ID(), *reply)
		}
		emit("stream", "id", st.ID(), "bytes", n, "sha256", sum, "err", errString(err),
			"written", w, "write_err", errString(werr))
	default:
		fmt.Fprintf(os.Stderr, "gopeer: unknown server -mode %q\n", mode)
		os.Exit(2)
	}
}

// ---- client ----

func runClient() {
	var conn net.Conn
	var err error
	if *useTLS {
		conn, err = tls.Dial("tcp", *addr, tlsConfig(false))
	} else {
		conn, err = net.Dial("tcp", *addr)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "gopeer: %v\n", err)
		os.Exit(1)
	}
	sess, err := smux.Client(conn, config())
	if err != nil {
		fmt.Fprintf(os.Stderr, "gopeer: %v\n", err)
		os.Exit(1)
	}
	emit("connected", "local", conn.LocalAddr().String(), "pid", os.Getpid())
	defer sess.Close()

	// With -hold, echo the streams the server opens, from the start, and keep
	// the session until it ends (keepalive, peer close, protocol error).
	served := make(chan struct{})
	if *hold || *mode == "idle" {
		go func() {
			defer close(served)
			serveSession(sess, "echo")
		}()
	} else {
		close(served)
	}

	switch *mode {
	case "idle":
	case "abandon":
		forStreams(sess, func(st *smux.Stream) map[string]interface{} {
			n, err := writePattern(st, st.ID(), *size)
			return map[string]interface{}{"written": n, "err": errString(err)}
		})
		emit("abandoned", "num_streams", sess.NumStreams())
		// Close the session (not a stream) when told: closing at once could
		// reset the connection while our data is still in flight.
		<-closeCmd
		return
	case "client-echo":
		forStreams(sess, clientEcho)
	case "send":
		forStreams(sess, func(st *smux.Stream) map[string]interface{} {
			n, err := writePattern(st, st.ID(), *size)
			return map[string]interface{}{"written": n, "err": errString(err), "close_err": errString(st.Close())}
		})
	case "readreply":
		forStreams(sess, readReply)
	case "openmany":
		forStreams(sess, openMany)
	default:
		fmt.Fprintf(os.Stderr, "gopeer: unknown client -mode %q\n", *mode)
		os.Exit(2)
	}
	<-served
}

// forStreams opens -streams streams from -workers goroutines, runs fn on
// each, prints one "stream" line per stream and a "summary" line.
func forStreams(sess *smux.Session, fn func(*smux.Stream) map[string]interface{}) {
	nw := *workers
	if nw <= 0 || nw > *streams {
		nw = *streams
	}
	var next, ok, failed int64
	next = -1
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < nw; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for atomic.AddInt64(&next, 1) < int64(*streams) {
				st, err := sess.OpenStream()
				if err != nil {
					atomic.AddInt64(&failed, 1)
					emit("stream", "open_err", err.Error())
					continue
				}
				res := fn(st)
				res["id"] = st.ID()
				if res["err"] == nil {
					atomic.AddInt64(&ok, 1)
				} else {
					atomic.AddInt64(&failed, 1)
				}
				emit("stream", flatten(res)...)
			}
		}()
	}
	wg.Wait()
	emit("summary", "ok", ok, "failed", failed, "seconds", time.Since(start).Seconds(),
		"session_closed", sess.IsClosed())
}

func flatten(m map[string]interface{}) []interface{} {
	kv := make([]interface{}, 0, 2*len(m))
	for k, v := range m {
		kv = append(kv, k, v)
	}
	return kv
}

// clientEcho writes -size bytes and reads exactly as many back (Go 1.5.16
// has no half-close), comparing them with what it sent, then closes.
func clientEcho(st *smux.Stream) map[string]interface{} {
	defer st.Close()
	werr := make(chan error, 1)
	go func() {
		_, err := writePattern(st, st.ID(), *size)
		werr <- err
	}()
	want := make([]byte, 4*patternBlock)
	got := make([]byte, len(want))
	var off int64
	var err error
	for off < *size && err == nil {
		chunk := int64(len(got))
		if *size-off < chunk {
			chunk = *size - off
		}
		if _, err = io.ReadFull(st, got[:chunk]); err != nil {
			break
		}
		pattern(st.ID(), off, want[:chunk])
		if !bytes.Equal(got[:chunk], want[:chunk]) {
			err = fmt.Errorf("echo mismatch in [%d, %d)", off, off+chunk)
		}
		off += chunk
	}
	if e := <-werr; err == nil {
		err = e
	}
	return map[string]interface{}{"bytes": off, "err": errString(err)}
}

// readReply says hello (one byte, so the peer knows we registered the
// stream: see docs/design.md 9.1), reads until the peer's FIN, then writes -reply
// bytes after that EOF and closes.
func readReply(st *smux.Stream) map[string]interface{} {
	defer st.Close()
	if _, err := st.Write([]byte{'h'}); err != nil {
		return map[string]interface{}{"err": errString(err)}
	}
	n, sum, err := readToEOF(st)
	res := map[string]interface{}{"bytes": n, "sha256": sum, "err": errString(err)}
	if err == nil {
		w, werr := writePattern(st, st.ID(), *reply)
		res["written"], res["err"] = w, errString(werr)
	}
	return res
}

// openMany sends the stream's id as 4 bytes and expects them back; a FIN
// before any byte means the peer refused the stream.
func openMany(st *smux.Stream) map[string]interface{} {
	defer st.Close()
	var msg, back [4]byte
	binary.LittleEndian.PutUint32(msg[:], st.ID())
	if _, err := st.Write(msg[:]); err != nil {
		return map[string]interface{}{"err": errString(err)}
	}
	_ = st.SetReadDeadline(time.Now().Add(30 * time.Second))
	n, err := io.ReadFull(st, back[:])
	if errors.Is(err, io.EOF) && n == 0 {
		return map[string]interface{}{"refused": true, "err": nil}
	}
	if err == nil && back != msg {
		err = fmt.Errorf("got %v, want %v", back, msg)
	}
	return map[string]interface{}{"refused": false, "err": errString(err)}
}

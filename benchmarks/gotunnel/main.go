// Command gotunnel is the Go side of benchmarks/tunnel_bench.py: a minimal smux
// tunnel over TCP in kcptun's design (one smux session per client, one stream
// per TCP connection, io.Copy both ways, both ends closed when either copy
// ends), and the TCP target the benchmark downloads from and echoes through.
//
// Build offline from Debian's golang-github-xtaci-smux-dev (no module download):
//
//	GO111MODULE=off GOPATH=$(mktemp -d):/usr/share/gocode go build -o /tmp/gotunnel ./benchmarks/gotunnel
//
// Usage (each prints "listening on HOST:PORT" once it listens, as the pysmux
// command does, then serves until killed):
//
//	gotunnel client -l ADDR -r SERVER -smuxver 1|2 [-smuxbuf N -streambuf N]
//	gotunnel server -l ADDR -t TARGET -smuxver 1|2 [-smuxbuf N -streambuf N]
//	gotunnel target -l ADDR
//
// The target's protocol: the first byte of a connection says what it wants.
//
//	'D' + u64 little-endian n: the target sends n bytes, then closes.
//	'E': the target echoes everything it reads until EOF, then closes.
package main

import (
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"net"
	"os"

	"github.com/xtaci/smux"
)

const chunk = 1 << 20 // bytes per Write of a download

func die(err error) {
	fmt.Fprintln(os.Stderr, "gotunnel:", err)
	os.Exit(1)
}

func listen(addr string) net.Listener {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		die(err)
	}
	fmt.Printf("listening on %s\n", ln.Addr())
	return ln
}

// pipe copies both ways between a and b; when either copy ends both are closed.
func pipe(a, b io.ReadWriteCloser) {
	done := make(chan struct{}, 2)
	copyClose := func(dst io.Writer, src io.Reader) {
		io.Copy(dst, src)
		a.Close()
		b.Close()
		done <- struct{}{}
	}
	go copyClose(a, b)
	copyClose(b, a)
	<-done
}

func client(ln net.Listener, remote string, cfg *smux.Config) {
	conn, err := net.Dial("tcp", remote)
	if err != nil {
		die(err)
	}
	sess, err := smux.Client(conn, cfg)
	if err != nil {
		die(err)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			die(err)
		}
		go func() {
			st, err := sess.OpenStream()
			if err != nil {
				c.Close()
				die(err) // the one session is gone: the benchmark row fails loudly
			}
			pipe(c, st)
		}()
	}
}

func server(ln net.Listener, target string, cfg *smux.Config) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			die(err)
		}
		sess, err := smux.Server(conn, cfg)
		if err != nil {
			die(err)
		}
		go func() {
			defer sess.Close()
			for {
				st, err := sess.AcceptStream()
				if err != nil {
					return
				}
				go func() {
					c, err := net.Dial("tcp", target)
					if err != nil {
						st.Close()
						return
					}
					pipe(c, st)
				}()
			}
		}()
	}
}

func serveTarget(c net.Conn) {
	defer c.Close()
	var mode [1]byte
	if _, err := io.ReadFull(c, mode[:]); err != nil {
		return
	}
	switch mode[0] {
	case 'D':
		var size [8]byte
		if _, err := io.ReadFull(c, size[:]); err != nil {
			return
		}
		left := binary.LittleEndian.Uint64(size[:])
		buf := make([]byte, chunk)
		for left > 0 {
			n := uint64(len(buf))
			if left < n {
				n = left
			}
			if _, err := c.Write(buf[:n]); err != nil {
				return
			}
			left -= n
		}
	case 'E':
		// A plain loop, not io.Copy(c, c): that splices through a pipe, two more
		// descriptors per connection, and 10,000 echoes would need 30,000.
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}
}

func target(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			die(err)
		}
		go serveTarget(c)
	}
}

func main() {
	if len(os.Args) < 2 {
		die(fmt.Errorf("usage: gotunnel client|server|target [flags]"))
	}
	role := os.Args[1]
	fs := flag.NewFlagSet(role, flag.ExitOnError)
	addr := fs.String("l", "127.0.0.1:0", "listen address")
	remote := fs.String("r", "", "client: the tunnel server")
	tgt := fs.String("t", "", "server: where each stream goes")
	version := fs.Int("smuxver", 1, "smux protocol version")
	smuxbuf := fs.Int("smuxbuf", 4194304, "session receive buffer")
	streambuf := fs.Int("streambuf", 2097152, "per-stream window (version 2)")
	fs.Parse(os.Args[2:])
	cfg := smux.DefaultConfig()
	cfg.Version = *version
	cfg.MaxReceiveBuffer = *smuxbuf
	cfg.MaxStreamBuffer = *streambuf
	if err := smux.VerifyConfig(cfg); err != nil {
		die(err)
	}
	ln := listen(*addr)
	switch role {
	case "client":
		client(ln, *remote, cfg)
	case "server":
		server(ln, *tgt, cfg)
	case "target":
		target(ln)
	default:
		die(fmt.Errorf("unknown role %q", role))
	}
}

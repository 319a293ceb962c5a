// Command gobench is the Go side of benchmarks/bench.py: Go smux (and plain Go
// TCP) client and server speaking the same tiny request protocol as bench.py.
//
// Build offline from Debian's golang-github-xtaci-smux-dev (no module download):
//
//	GO111MODULE=off GOPATH=$(mktemp -d):/usr/share/gocode go build -o /tmp/gobench ./benchmarks/gobench
//
// Request protocol, on each stream (or TCP connection): the client sends a
// 9-byte header, mode byte + u64 little-endian argument.
//
//	'B' n: the client then sends n bytes; the server reads them all and answers
//	       with the 8-byte count.
//	'P' k: ping-pong; the client sends 16 bytes and reads the 16-byte echo, k times.
//
// Usage:
//
//	gobench server -mode smux|tcp -smuxver 1|2        prints "PORT <n>", serves until killed
//	gobench client -mode smux|tcp -smuxver 1|2 -addr host:port -bulk BYTES -pings K
//	                                                   prints one JSON line of results
package main

import (
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/xtaci/smux"
)

const (
	writeChunk = 1 << 20   // bytes per Write call, as bench.py
	readChunk  = 256 << 10 // bytes per Read call, as bench.py
	pingSize   = 16
)

func config(version int) *smux.Config {
	c := smux.DefaultConfig()
	c.Version = version
	return c
}

func die(err error) {
	fmt.Fprintln(os.Stderr, "gobench:", err)
	os.Exit(1)
}

// handle serves one request on conn (a stream or a TCP connection).
func handle(conn io.ReadWriteCloser) {
	defer conn.Close()
	var hdr [9]byte
	if _, err := io.ReadFull(conn, hdr[:]); err != nil {
		return
	}
	arg := binary.LittleEndian.Uint64(hdr[1:])
	switch hdr[0] {
	case 'B':
		buf := make([]byte, readChunk)
		var got uint64
		for got < arg {
			n, err := conn.Read(buf)
			got += uint64(n)
			if err != nil {
				return
			}
		}
		var ack [8]byte
		binary.LittleEndian.PutUint64(ack[:], got)
		conn.Write(ack[:])
	case 'P':
		buf := make([]byte, pingSize)
		for i := uint64(0); i < arg; i++ {
			if _, err := io.ReadFull(conn, buf); err != nil {
				return
			}
			if _, err := conn.Write(buf); err != nil {
				return
			}
		}
	}
}

func serve(mode string, version int) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		die(err)
	}
	fmt.Printf("PORT %d\n", ln.Addr().(*net.TCPAddr).Port)
	for {
		conn, err := ln.Accept()
		if err != nil {
			die(err)
		}
		if mode == "tcp" {
			go handle(conn)
			continue
		}
		sess, err := smux.Server(conn, config(version))
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
				go handle(st)
			}
		}()
	}
}

type opener func() (io.ReadWriteCloser, error)

func request(open opener, mode byte, arg uint64) (io.ReadWriteCloser, error) {
	c, err := open()
	if err != nil {
		return nil, err
	}
	var hdr [9]byte
	hdr[0] = mode
	binary.LittleEndian.PutUint64(hdr[1:], arg)
	if _, err := c.Write(hdr[:]); err != nil {
		return nil, err
	}
	return c, nil
}

func bulk(open opener, total uint64) (float64, error) {
	start := time.Now()
	c, err := request(open, 'B', total)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	buf := make([]byte, writeChunk)
	for sent := uint64(0); sent < total; {
		n := uint64(len(buf))
		if total-sent < n {
			n = total - sent
		}
		if _, err := c.Write(buf[:n]); err != nil {
			return 0, err
		}
		sent += n
	}
	var ack [8]byte
	if _, err := io.ReadFull(c, ack[:]); err != nil {
		return 0, err
	}
	if got := binary.LittleEndian.Uint64(ack[:]); got != total {
		return 0, fmt.Errorf("server got %d bytes, sent %d", got, total)
	}
	return time.Since(start).Seconds(), nil
}

func pingpong(open opener, count uint64) (float64, error) {
	c, err := request(open, 'P', count)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	msg := make([]byte, pingSize)
	reply := make([]byte, pingSize)
	start := time.Now()
	for i := uint64(0); i < count; i++ {
		if _, err := c.Write(msg); err != nil {
			return 0, err
		}
		if _, err := io.ReadFull(c, reply); err != nil {
			return 0, err
		}
	}
	return time.Since(start).Seconds(), nil
}

func client(mode string, version int, addr string, bulkBytes, pings uint64, repeat int) {
	var open opener
	if mode == "tcp" {
		open = func() (io.ReadWriteCloser, error) { return net.Dial("tcp", addr) }
	} else {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			die(err)
		}
		sess, err := smux.Client(conn, config(version))
		if err != nil {
			die(err)
		}
		defer sess.Close()
		open = func() (io.ReadWriteCloser, error) { return sess.OpenStream() }
	}
	result := map[string][]float64{"bulk_seconds": {}, "pingpong_seconds": {}}
	for i := 0; i < repeat; i++ {
		if bulkBytes > 0 {
			s, err := bulk(open, bulkBytes)
			if err != nil {
				die(err)
			}
			result["bulk_seconds"] = append(result["bulk_seconds"], s)
		}
		if pings > 0 {
			s, err := pingpong(open, pings)
			if err != nil {
				die(err)
			}
			result["pingpong_seconds"] = append(result["pingpong_seconds"], s)
		}
	}
	out, _ := json.Marshal(result)
	fmt.Println(string(out))
}

func main() {
	if len(os.Args) < 2 || (os.Args[1] != "server" && os.Args[1] != "client") {
		die(fmt.Errorf("usage: gobench server|client [flags]"))
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	mode := fs.String("mode", "smux", "smux or tcp")
	version := fs.Int("smuxver", 1, "smux protocol version, 1 or 2")
	addr := fs.String("addr", "", "server address (client)")
	bulkBytes := fs.Uint64("bulk", 256<<20, "bytes for the bulk test, 0 to skip (client)")
	pings := fs.Uint64("pings", 20000, "ping-pong round trips, 0 to skip (client)")
	repeat := fs.Int("repeat", 1, "times to run each test (client)")
	fs.Parse(os.Args[2:])
	if os.Args[1] == "server" {
		serve(*mode, *version)
	} else {
		client(*mode, *version, *addr, *bulkBytes, *pings, *repeat)
	}
}

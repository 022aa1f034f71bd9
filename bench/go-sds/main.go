// go-sds: a benchmark peer for meshca's SDS server, built on go-control-plane's snapshot
// cache (pkg/cache/v3) and xDS server (pkg/server/v3). It serves two secrets over
// SecretDiscoveryService (StreamSecrets, DeltaSecrets and FetchSecrets come with the server):
//
//   - default: tls_certificate with certificate_chain (DIR/cert.pem) and private_key
//     (DIR/key.pem) as inline bytes;
//   - ROOTCA:  validation_context.trusted_ca (DIR/ca.pem) as inline bytes.
//
// Every node maps to one snapshot. SIGHUP re-reads the three files and sets a new snapshot
// with a new version; SIGTERM or SIGINT stops the server. Once it listens it prints
// "ready <listen>" on stdout (with a Unix socket, the socket exists from then on).
//
//	go-sds -dir DIR -listen unix:/path/sds.sock
//	go-sds -dir DIR -listen tcp:127.0.0.1:PORT [-tls-cert F -tls-key F -tls-client-ca F]
//
// It is a benchmark peer only (bench/sds-peer.sh runs it beside meshca with the same load);
// nothing in meshca depends on it.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"log"
	"math"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	secretservice "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	server "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// oneKey maps every node to the same snapshot.
type oneKey struct{}

func (oneKey) ID(*core.Node) string { return "all" }

const nodeKey = "all"

func inline(b []byte) *core.DataSource {
	return &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: b}}
}

// snapshot reads DIR/{cert,key,ca}.pem into a snapshot of version v.
func snapshot(dir string, v int) (*cache.Snapshot, error) {
	read := func(name string) ([]byte, error) { return os.ReadFile(filepath.Join(dir, name)) }
	chain, err := read("cert.pem")
	if err != nil {
		return nil, err
	}
	key, err := read("key.pem")
	if err != nil {
		return nil, err
	}
	ca, err := read("ca.pem")
	if err != nil {
		return nil, err
	}
	secrets := []types.Resource{
		&tlsv3.Secret{
			Name: "default",
			Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
				CertificateChain: inline(chain),
				PrivateKey:       inline(key),
			}},
		},
		&tlsv3.Secret{
			Name: "ROOTCA",
			Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
				TrustedCa: inline(ca),
			}},
		},
	}
	return cache.NewSnapshot(strconv.Itoa(v), map[resource.Type][]types.Resource{
		resource.SecretType: secrets,
	})
}

func listen(spec string) (net.Listener, error) {
	switch {
	case strings.HasPrefix(spec, "unix:"):
		path := strings.TrimPrefix(spec, "unix:")
		_ = os.Remove(path)
		return net.Listen("unix", path)
	case strings.HasPrefix(spec, "tcp:"):
		addr := strings.TrimPrefix(spec, "tcp:")
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, err
		}
		if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
			return nil, fmt.Errorf("tcp: only loopback addresses, not %q", host)
		}
		return net.Listen("tcp", addr)
	}
	return nil, fmt.Errorf("listen %q: want unix:PATH or tcp:127.0.0.1:PORT", spec)
}

func serverTLS(certFile, keyFile, clientCA string) (credentials.TransportCredentials, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	pem, err := os.ReadFile(clientCA)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no certificate", clientCA)
	}
	return credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
	}), nil
}

func main() {
	dir := flag.String("dir", "", "directory with cert.pem (chain), key.pem and ca.pem")
	addr := flag.String("listen", "", "unix:PATH or tcp:127.0.0.1:PORT")
	tlsCert := flag.String("tls-cert", "", "server certificate (PEM) for mutual TLS on tcp")
	tlsKey := flag.String("tls-key", "", "server key (PEM)")
	tlsCA := flag.String("tls-client-ca", "", "CA (PEM) that client certificates must chain to")
	flag.Parse()
	if *dir == "" || *addr == "" {
		flag.Usage()
		os.Exit(1)
	}

	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	snaps := cache.NewSnapshotCache(false, oneKey{}, nil)
	version := 1
	snap, err := snapshot(*dir, version)
	if err != nil {
		log.Fatalf("go-sds: %v", err)
	}
	if err := snaps.SetSnapshot(ctx, nodeKey, snap); err != nil {
		log.Fatalf("go-sds: %v", err)
	}

	opts := []grpc.ServerOption{grpc.MaxConcurrentStreams(math.MaxUint32)}
	if *tlsCert != "" {
		creds, err := serverTLS(*tlsCert, *tlsKey, *tlsCA)
		if err != nil {
			log.Fatalf("go-sds: tls: %v", err)
		}
		opts = append(opts, grpc.Creds(creds))
	}
	gs := grpc.NewServer(opts...)
	secretservice.RegisterSecretDiscoveryServiceServer(gs, server.NewServer(ctx, snaps, nil))

	lis, err := listen(*addr)
	if err != nil {
		log.Fatalf("go-sds: %v", err)
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		for s := range sigs {
			if s != syscall.SIGHUP {
				gs.Stop()
				return
			}
			snap, err := snapshot(*dir, version+1)
			if err != nil {
				log.Printf("go-sds: reload: %v (keeping version %d)", err, version)
				continue
			}
			version++
			if err := snaps.SetSnapshot(ctx, nodeKey, snap); err != nil {
				log.Printf("go-sds: set snapshot: %v", err)
			}
		}
	}()
	fmt.Printf("ready %s\n", *addr)
	if err := gs.Serve(lis); err != nil {
		log.Fatalf("go-sds: %v", err)
	}
	if strings.HasPrefix(*addr, "unix:") {
		_ = os.Remove(strings.TrimPrefix(*addr, "unix:"))
	}
}

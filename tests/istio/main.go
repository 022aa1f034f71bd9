// istio-ca-client: a test client of Istio's CA API (istio.v1.auth.IstioCertificateService)
// built from istio.io/api's generated Go stubs and grpc-go. It sends what istio-agent and
// ztunnel send: a PEM CSR for spiffe://<td>/ns/<ns>/sa/<sa> with an empty subject and a
// critical SAN extension, validity_duration in seconds, the token as
// "authorization: Bearer <token>", "ClusterID" metadata, and optionally CertSigner
// (ISTIO_META_CERT_SIGNER) or ImpersonatedIdentity (ztunnel) in the request metadata.
//
// It writes the private key and the returned chain (leaf first, root last) and exits 0, or
// prints the gRPC status as "code=<Code> msg=<message>" on stderr and exits 3.
//
// The bench mode (-bench N) starts N agents at once, each waiting a random jitter, with at
// most -concurrency calls in flight, and prints a JSON summary of rate and latencies.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"math"
	mrand "math/rand"
	"net/url"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
)

type opts struct {
	addr, tokenFile, spiffe, clusterID, certSigner, impersonate string
	caFile, certFile, keyFile, outCert, outKey                  string
	ttl                                                         int64
}

// csrFor builds a CSR the way istio-agent does: no subject, one URI SAN in a critical SAN
// extension, an ECDSA P-256 key.
func csrFor(id string) ([]byte, *ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	u, err := url.Parse(id)
	if err != nil {
		return nil, nil, err
	}
	// GeneralName uniformResourceIdentifier is [6] IMPLICIT IA5String.
	san, err := asn1.Marshal([]asn1.RawValue{{Tag: 6, Class: asn1.ClassContextSpecific, Bytes: []byte(u.String())}})
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.CertificateRequest{
		Subject: pkix.Name{},
		ExtraExtensions: []pkix.Extension{{
			Id: asn1.ObjectIdentifier{2, 5, 29, 17}, Critical: true, Value: san,
		}},
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), key, nil
}

func dial(o *opts) (*grpc.ClientConn, error) {
	var creds credentials.TransportCredentials
	if o.caFile == "" {
		creds = insecure.NewCredentials()
	} else {
		pool := x509.NewCertPool()
		b, err := os.ReadFile(o.caFile)
		if err != nil {
			return nil, err
		}
		if !pool.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("%s: no certificate", o.caFile)
		}
		cfg := &tls.Config{RootCAs: pool, ServerName: "localhost"}
		if o.certFile != "" {
			c, err := tls.LoadX509KeyPair(o.certFile, o.keyFile)
			if err != nil {
				return nil, err
			}
			cfg.Certificates = []tls.Certificate{c}
		}
		creds = credentials.NewTLS(cfg)
	}
	return grpc.NewClient(o.addr, grpc.WithTransportCredentials(creds))
}

func request(ctx context.Context, c pb.IstioCertificateServiceClient, o *opts, token string) ([]string, *ecdsa.PrivateKey, error) {
	id := o.spiffe
	if o.impersonate != "" {
		id = o.impersonate
	}
	csr, key, err := csrFor(id)
	if err != nil {
		return nil, nil, err
	}
	fields := map[string]*structpb.Value{}
	if o.certSigner != "" {
		fields["CertSigner"] = structpb.NewStringValue(o.certSigner)
	}
	if o.impersonate != "" {
		fields["ImpersonatedIdentity"] = structpb.NewStringValue(o.impersonate)
	}
	req := &pb.IstioCertificateRequest{Csr: string(csr), ValidityDuration: o.ttl}
	if len(fields) > 0 {
		req.Metadata = &structpb.Struct{Fields: fields}
	}
	md := metadata.Pairs("ClusterID", o.clusterID)
	if token != "" {
		md.Append("authorization", "Bearer "+token)
	}
	resp, err := c.CreateCertificate(metadata.NewOutgoingContext(ctx, md), req)
	if err != nil {
		return nil, nil, err
	}
	return resp.CertChain, key, nil
}

func writeFile(path string, data []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func fail(err error) {
	if s, ok := status.FromError(err); ok {
		fmt.Fprintf(os.Stderr, "code=%s msg=%s\n", s.Code(), s.Message())
		os.Exit(3)
	}
	fmt.Fprintln(os.Stderr, "error:", err)
	os.Exit(2)
}

func bench(o *opts, n, concurrency int, jitter time.Duration, tokenDir string) {
	conn, err := dial(o)
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	c := pb.NewIstioCertificateServiceClient(conn)
	sem := make(chan struct{}, concurrency)
	lat := make([]float64, n)
	errs := make([]string, 0)
	var mu sync.Mutex
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			time.Sleep(time.Duration(mrand.Int63n(int64(jitter) + 1)))
			sem <- struct{}{}
			defer func() { <-sem }()
			tok, err := os.ReadFile(fmt.Sprintf("%s/%d.token", tokenDir, i))
			if err != nil {
				mu.Lock()
				errs = append(errs, err.Error())
				mu.Unlock()
				return
			}
			lines := strings.SplitN(strings.TrimSpace(string(tok)), "\n", 2)
			if len(lines) != 2 {
				mu.Lock()
				errs = append(errs, fmt.Sprintf("token %d: not <token>\\n<SPIFFE ID>", i))
				mu.Unlock()
				return
			}
			oo := *o
			oo.spiffe = lines[1]
			t0 := time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			_, _, err = request(ctx, c, &oo, lines[0])
			lat[i] = time.Since(t0).Seconds()
			if err != nil {
				mu.Lock()
				errs = append(errs, err.Error())
				mu.Unlock()
			}
		}(i)
	}
	wg.Wait()
	total := time.Since(start).Seconds()
	sort.Float64s(lat)
	q := func(p float64) float64 { return lat[int(math.Min(float64(n-1), math.Ceil(p*float64(n))-1))] * 1000 }
	out := map[string]any{"n": n, "errors": len(errs), "seconds": total, "rate_per_s": float64(n) / total,
		"p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": lat[n-1] * 1000}
	if len(errs) > 0 {
		out["first_error"] = errs[0]
	}
	b, _ := json.Marshal(out)
	fmt.Println(string(b))
}

func main() {
	o := &opts{}
	flag.StringVar(&o.addr, "addr", "127.0.0.1:15012", "CA address (CA_ADDR)")
	flag.StringVar(&o.tokenFile, "token", "", "file holding the ServiceAccount token (none: no authorization metadata)")
	flag.StringVar(&o.spiffe, "spiffe-id", "", "the SPIFFE ID the CSR asks for")
	flag.StringVar(&o.clusterID, "cluster-id", "Kubernetes", "ClusterID metadata")
	flag.StringVar(&o.certSigner, "cert-signer", "", "CertSigner request metadata (ISTIO_META_CERT_SIGNER)")
	flag.StringVar(&o.impersonate, "impersonate", "", "ImpersonatedIdentity request metadata (ztunnel); the CSR asks for it")
	flag.StringVar(&o.caFile, "ca", "", "root certificate(s) to verify the server with (none: plaintext)")
	flag.StringVar(&o.certFile, "cert", "", "client certificate chain for mutual TLS (renewal)")
	flag.StringVar(&o.keyFile, "key", "", "client key for mutual TLS")
	flag.StringVar(&o.outCert, "out-chain", "", "where to write the returned chain (PEM, leaf first)")
	flag.StringVar(&o.outKey, "out-key", "", "where to write the private key (PEM, 0600)")
	flag.Int64Var(&o.ttl, "ttl", 86400, "validity_duration in seconds")
	n := flag.Int("bench", 0, "bench mode: this many agents; tokens in -token-dir/<i>.token (token, newline, SPIFFE ID)")
	concurrency := flag.Int("concurrency", 64, "bench mode: calls in flight at most")
	jitter := flag.Duration("jitter", 2*time.Second, "bench mode: each agent starts after a random delay up to this")
	tokenDir := flag.String("token-dir", "", "bench mode: token directory")
	flag.Parse()
	if *n > 0 {
		bench(o, *n, *concurrency, *jitter, *tokenDir)
		return
	}
	token := ""
	if o.tokenFile != "" {
		b, err := os.ReadFile(o.tokenFile)
		if err != nil {
			fail(err)
		}
		token = strings.TrimSpace(string(b))
	}
	conn, err := dial(o)
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	chain, key, err := request(ctx, pb.NewIstioCertificateServiceClient(conn), o, token)
	if err != nil {
		fail(err)
	}
	if len(chain) < 2 {
		fail(fmt.Errorf("the chain has %d certificates; istio-agent wants the root too", len(chain)))
	}
	if o.outCert != "" {
		if err := writeFile(o.outCert, []byte(strings.Join(chain, "")), 0o644); err != nil {
			fail(err)
		}
	}
	if o.outKey != "" {
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			fail(err)
		}
		if err := writeFile(o.outKey, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
			fail(err)
		}
	}
	fmt.Printf("chain=%d\n", len(chain))
}

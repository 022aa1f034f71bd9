# Idle RSS, threads and CPU of `meshca sds serve` (local CA, Unix socket), before and after
# one client (grpc-python: FetchSecrets, then a StreamSecrets for default and ROOTCA) is served.
#   python3 sds/bench/idle_rss.py target/release/meshca [extra sds serve flags]
# Needs grpcio. Runs about a minute; stops the server it started.
import os, shutil, subprocess, sys, tempfile, time, grpc
bin_ = sys.argv[1]
extra = sys.argv[2:]
d = tempfile.mkdtemp()
env = dict(os.environ, MESHCA_HOME=d + "/home")
subprocess.run([bin_, "init", "--ca", "ca1"], env=env, check=True, capture_output=True)
sock = d + "/sds.sock"
p = subprocess.Popen([bin_, "sds", "serve", "--ca", "ca1", "--namespace", "mesh", "--service-account", "web",
                      "--listen", "unix:" + sock] + extra, env=env, stdout=subprocess.DEVNULL, stderr=open(d + "/log", "w"))
def status():
    s = dict(l.split(":", 1) for l in open(f"/proc/{p.pid}/status").read().splitlines() if ":" in l)
    return int(s["VmRSS"].split()[0]) / 1024, int(s["Threads"])
def cpu():
    f = open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
for _ in range(100):
    if os.path.exists(sock): break
    time.sleep(0.05)
time.sleep(12)
idle0 = status()
# One client: Fetch + a StreamSecrets stream for default and ROOTCA, then gone.
def fld(tag, b): return bytes([tag, len(b)]) + b
req = fld(0x1a, b"default") + fld(0x1a, b"ROOTCA") + fld(0x22, b"type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret")
with grpc.insecure_channel("unix:" + sock) as ch:
    svc = "/envoy.service.secret.v3.SecretDiscoveryService/"
    ch.unary_unary(svc + "FetchSecrets")(req, timeout=10)
    call = ch.stream_stream(svc + "StreamSecrets")(iter([req]), timeout=10)
    next(call); call.cancel()
time.sleep(12)
c0 = cpu(); t0 = time.time()
time.sleep(30)
served = status()
cpu_pct = 100 * (cpu() - c0) / (time.time() - t0)
print(f"idle {idle0[0]:.1f} MiB ({idle0[1]} threads); one client served {served[0]:.1f} MiB ({served[1]} threads); idle CPU {cpu_pct:.3f} % of a core over 30 s")
p.terminate(); p.wait()
shutil.rmtree(d, ignore_errors=True)

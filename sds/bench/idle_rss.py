# Idle RSS, PSS, threads and CPU of the SDS server (local CA, Unix socket), before and after
# one client (grpc-python: FetchSecrets, then a StreamSecrets for default and ROOTCA) is served.
#
#   python3 sds/bench/idle_rss.py [--evict] [--pair] [--sections] BIN [extra serve flags]
#   python3 sds/bench/idle_rss.py --evict-only FILE...
#
# BIN is `meshca` (run as `meshca sds serve`) or `meshca-sds` (run as `meshca-sds serve`); the
# CA is made with `meshca init` from the same directory (or $MESHCA_BIN). --evict drops BIN's
# pages from the page cache first (posix_fadvise DONTNEED: it works when no running process
# maps the file), so its pages come from disk as on a node that has just pulled the image.
# --pair starts a second server from the same file and reports both (they share the binary's
# pages: PSS). --sections adds, at the end, the resident KiB of each ELF section of BIN (from
# the present bits of /proc/PID/pagemap). --evict-only just evicts, for the kube-csr example's
# idle mode.
# Needs grpcio. Runs about a minute; stops the servers it started.
import os, shutil, subprocess, sys, tempfile, time


def evict(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def status(pid):
    s = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status").read().splitlines() if ":" in l)
    kib = lambda k: int(s[k].split()[0])
    return {"rss": kib("VmRSS"), "anon": kib("RssAnon"), "file": kib("RssFile"), "threads": int(s["Threads"])}


def pss(pid):
    for l in open(f"/proc/{pid}/smaps_rollup"):
        if l.startswith("Pss:"):
            return int(l.split()[1])


def by_mapping(pid, binary):
    """RSS in KiB of the binary's mappings (its pages, and the copies of its data that the
    process wrote), other files' mappings (libc, ...) and anonymous mappings (heap, stacks)."""
    out = {"binary": 0, "other files": 0, "anonymous": 0}
    name = None
    real = os.path.realpath(binary)
    for l in open(f"/proc/{pid}/smaps"):
        f = l.split()
        if not f[0].endswith(":"):
            name = f[5] if len(f) > 5 else ""
        elif f[0] == "Rss:":
            kb = int(f[1])
            if name == real:
                out["binary"] += kb
            elif name.startswith("/"):
                out["other files"] += kb
            else:
                out["anonymous"] += kb
    return out


def sections(pid, binary):
    """Resident KiB of each ELF section of BIN in process PID."""
    import re, struct
    real = os.path.realpath(binary)
    base = None
    for l in open(f"/proc/{pid}/maps"):
        f = l.split()
        if len(f) > 5 and f[5] == real and int(f[2], 16) == 0:
            base = int(f[0].split("-")[0], 16)
            break
    if "EXEC" in subprocess.run(["readelf", "-hW", real], capture_output=True, text=True).stdout:
        base = 0
    out = []
    with open(f"/proc/{pid}/pagemap", "rb") as pm:
        for l in subprocess.run(["readelf", "-SW", real], capture_output=True, text=True).stdout.splitlines():
            m = re.match(r"\s*\[\s*\d+\]\s+(\S+)\s+\S+\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)", l)
            if not m or int(m.group(2), 16) == 0:
                continue
            start, size = base + int(m.group(2), 16), int(m.group(3), 16)
            n = 0
            for pg in range(start // 4096, (start + size + 4095) // 4096):
                pm.seek(pg * 8)
                n += struct.unpack("<Q", pm.read(8))[0] >> 63
            if n * 4 >= 16:
                out.append(f"{m.group(1)} {n * 4} of {size // 1024}")
    return ", ".join(out)


def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def mib(kb):
    return f"{kb / 1024:.1f}"


def main():
    args = sys.argv[1:]
    if args and args[0] == "--evict-only":
        for p in args[1:]:
            evict(p)
        return
    do_evict = pair = by_section = False
    while args and args[0] in ("--evict", "--pair", "--sections"):
        do_evict |= args[0] == "--evict"
        pair |= args[0] == "--pair"
        by_section |= args[0] == "--sections"
        args = args[1:]
    bin_, extra = args[0], args[1:]
    import grpc

    sidecar = os.path.basename(bin_).startswith("meshca-sds")
    meshca = os.environ.get("MESHCA_BIN") or (os.path.join(os.path.dirname(bin_), "meshca") if sidecar else bin_)
    d = tempfile.mkdtemp()
    env = dict(os.environ, MESHCA_HOME=d + "/home")
    subprocess.run([meshca, "init", "--ca", "ca1"], env=env, check=True, capture_output=True)
    if do_evict:
        evict(bin_)
    serve = ["serve"] if sidecar else ["sds", "serve"]
    procs, socks = [], []
    for i in range(2 if pair else 1):
        sock = f"{d}/sds{i}.sock"
        socks.append(sock)
        procs.append(subprocess.Popen(
            [bin_] + serve + ["--ca", "ca1", "--namespace", "mesh", "--service-account", "web", "--listen", "unix:" + sock] + extra,
            env=env, stdout=subprocess.DEVNULL, stderr=open(f"{d}/log{i}", "w")))
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
    time.sleep(12)
    idle = [(status(p.pid), pss(p.pid)) for p in procs]
    # One client per server: Fetch + a StreamSecrets stream for default and ROOTCA, then gone.
    fld = lambda tag, b: bytes([tag, len(b)]) + b
    req = fld(0x1A, b"default") + fld(0x1A, b"ROOTCA") + fld(0x22, b"type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret")
    for sock in socks:
        with grpc.insecure_channel("unix:" + sock) as ch:
            svc = "/envoy.service.secret.v3.SecretDiscoveryService/"
            ch.unary_unary(svc + "FetchSecrets")(req, timeout=10)
            call = ch.stream_stream(svc + "StreamSecrets")(iter([req]), timeout=10)
            next(call)
            call.cancel()
    time.sleep(12)
    c0 = [cpu(p.pid) for p in procs]
    t0 = time.time()
    time.sleep(30)
    for i, p in enumerate(procs):
        st, ps = status(p.pid), pss(p.pid)
        cpu_pct = 100 * (cpu(p.pid) - c0[i]) / (time.time() - t0)
        parts = ", ".join(f"{k} {mib(v)}" for k, v in by_mapping(p.pid, bin_).items())
        i0, p0 = idle[i]
        print(f"{os.path.basename(bin_)}{' #' + str(i + 1) if pair else ''}: idle RSS {mib(i0['rss'])} MiB (PSS {mib(p0)}, "
              f"anon {mib(i0['anon'])}, {i0['threads']} threads); one client served: RSS {mib(st['rss'])} MiB "
              f"(PSS {mib(ps)}, anon {mib(st['anon'])}; mappings: {parts} MiB; {st['threads']} threads); idle CPU {cpu_pct:.3f} % of a core over 30 s")
        if by_section:
            print(f"  resident KiB of KiB per section: {sections(p.pid, bin_)}; VmRSS {st['rss']} KiB")
    for p in procs:
        p.terminate()
        p.wait()
    shutil.rmtree(d, ignore_errors=True)


main()

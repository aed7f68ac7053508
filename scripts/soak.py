#!/usr/bin/env python3
"""Soak test: two consul-proxy processes against a real Consul dev agent, under steady
traffic, while intentions flip, the CA rotates and the registration changes.

    cargo build --release && python3 scripts/soak.py [SECONDS]     (default 300)

Everything listens on loopback (ports 28xxx and 29xxx). Four clients fetch a 20 KB page
through web's upstream to db's app (python's http.server) as fast as they can. Every 10 s one
event, in turn:
  - deny web -> db for 2 s, then allow again (requests fail only inside that window);
  - rotate the CA (a new key type/size, so a new root);
  - add a second upstream (cache) to web's registration, or remove it again (the listener the
    clients use must not notice).
At the end it prints the requests that failed outside the deny windows (expected: none), the
proxies' open file descriptors and resident memory over time, their ERROR lines, and their
exit codes after SIGTERM; it exits 1 if any of those is wrong. Python standard library only.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXY = os.environ.get("CONSUL_PROXY_BIN", os.path.join(REPO, "target/release/consul-proxy"))
HTTP, DNS, SERF_LAN, SERF_WAN, SERVER = 28500, 28600, 28301, 28302, 28300
APP, WEB_UP, EXTRA_UP, DB_PUB, WEB_PUB = 28080, 29191, 29192, 28900, 28901
DB_ADMIN, WEB_ADMIN = 28910, 28911
AGENT = f"http://127.0.0.1:{HTTP}"
PAGE = 20_000


def consul_bin():
    if os.environ.get("CONSUL_BIN"):
        return os.environ["CONSUL_BIN"]
    out = subprocess.run(["bash", os.path.join(REPO, "scripts/install-consul.sh")],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def api(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(AGENT + path, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read()
            return json.loads(text) if text else None
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {path}: {e.code} {e.read().decode(errors='replace')}") from None


def intention(action):
    api("PUT", "/v1/connect/intentions/exact?source=web&destination=db",
        {"SourceName": "web", "DestinationName": "db", "Action": action})


def register_web(extra_upstream):
    upstreams = [{"DestinationName": "db", "LocalBindPort": WEB_UP}]
    if extra_upstream:
        upstreams.append({"DestinationName": "cache", "LocalBindPort": EXTRA_UP})
    api("PUT", "/v1/agent/service/register",
        {"ID": "web", "Name": "web", "Port": 1,
         "Connect": {"SidecarService": {"Port": WEB_PUB, "Proxy": {"Upstreams": upstreams}}}})


def fetch(port=WEB_UP):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            return len(r.read()) == PAGE
    except Exception:
        return False


def fds(p):
    return len(os.listdir(f"/proc/{p.pid}/fd"))


def rss_kib(p):
    with open(f"/proc/{p.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return -1


def main():
    duration = float(sys.argv[1]) if len(sys.argv) > 1 else 300
    work = tempfile.mkdtemp(prefix="consul-proxy-soak-")
    procs = []

    def start(args, log):
        p = subprocess.Popen(args, stdout=open(os.path.join(work, log), "w"),
                             stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    try:
        start([consul_bin(), "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
               "-grpc-port", "-1", f"-http-port={HTTP}", f"-dns-port={DNS}",
               f"-serf-lan-port={SERF_LAN}", f"-serf-wan-port={SERF_WAN}",
               f"-server-port={SERVER}"], "consul.log")
        deadline = time.time() + 30
        while True:
            try:
                if "127.0.0.1" in api("GET", "/v1/status/leader"):
                    break
            except OSError:
                pass
            if time.time() > deadline:
                sys.exit("the agent did not elect itself leader in 30 s")
            time.sleep(0.2)
        www = os.path.join(work, "www")
        os.makedirs(www)
        with open(os.path.join(www, "index.html"), "w") as f:
            f.write("x" * PAGE)
        start(["python3", "-m", "http.server", str(APP), "--bind", "127.0.0.1",
               "--directory", www], "app.log")
        api("PUT", "/v1/agent/service/register",
            {"ID": "db", "Name": "db", "Port": APP, "Connect": {"SidecarService": {"Port": DB_PUB}}})
        register_web(False)
        intention("allow")
        proxies = {
            "db": start([PROXY, "-http-addr", AGENT, "-sidecar-for", "db",
                         "-admin-addr", f"127.0.0.1:{DB_ADMIN}"], "db.log"),
            "web": start([PROXY, "-http-addr", AGENT, "-sidecar-for", "web",
                          "-admin-addr", f"127.0.0.1:{WEB_ADMIN}"], "web.log"),
        }
        t0 = time.time()
        while not fetch():
            if time.time() - t0 > 60:
                sys.exit("no page through the mesh in 60 s")
            time.sleep(0.5)
        print(f"mesh up after {time.time() - t0:.1f} s; logs in {work}", flush=True)

        stop = threading.Event()
        denying = threading.Event()
        lock = threading.Lock()
        stats = {"ok": 0, "failed_in_deny": 0, "failed_otherwise": 0}

        def client():
            while not stop.is_set():
                in_deny_before = denying.is_set()
                ok = fetch()
                with lock:
                    if ok:
                        stats["ok"] += 1
                    elif in_deny_before or denying.is_set():
                        stats["failed_in_deny"] += 1
                    else:
                        stats["failed_otherwise"] += 1

        clients = [threading.Thread(target=client) for _ in range(4)]
        for c in clients:
            c.start()
        samples = [(0, {n: (fds(p), rss_kib(p)) for n, p in proxies.items()})]
        extra = False
        step = 0
        end = time.time() + duration
        while time.time() < end:
            time.sleep(10)
            step += 1
            event = step % 3
            if event == 1:
                denying.set()
                intention("deny")
                time.sleep(2)
                intention("allow")
                # Requests already on their way when allow was written may still be refused.
                time.sleep(0.5)
                denying.clear()
            elif event == 2:
                ca = api("GET", "/v1/connect/ca/configuration")
                ca["Config"]["PrivateKeyType"] = "ec"
                ca["Config"]["PrivateKeyBits"] = 384 if ca["Config"].get("PrivateKeyBits") != 384 else 256
                api("PUT", "/v1/connect/ca/configuration", ca)
            else:
                extra = not extra
                register_web(extra)
            if step % 3 == 0:
                sample = {n: (fds(p), rss_kib(p)) for n, p in proxies.items()}
                samples.append((step * 10, sample))
                print(f"t={step * 10}s ok={stats['ok']} (fds, RSS KiB) {sample}", flush=True)
        stop.set()
        for c in clients:
            c.join()
        print("requests:", stats)
        problems = []
        if stats["failed_otherwise"]:
            problems.append(f"{stats['failed_otherwise']} requests failed outside the deny windows")
        first, last = samples[1][1] if len(samples) > 1 else samples[0][1], samples[-1][1]
        for name in proxies:
            if last[name][0] > first[name][0] + 8:
                problems.append(f"{name}: open files grew from {first[name][0]} to {last[name][0]}")
        for name in proxies:
            with open(os.path.join(work, f"{name}.log")) as f:
                errors = [line for line in f if " ERROR " in line or "panicked" in line]
            if errors:
                problems.append(f"{name}: {len(errors)} ERROR lines, first: {errors[0].strip()}")
        for name, p in proxies.items():
            p.send_signal(signal.SIGTERM)
        for name, p in proxies.items():
            code = p.wait(60)
            if code != 0:
                problems.append(f"{name} exited {code} after SIGTERM")
        for problem in problems:
            print("PROBLEM:", problem)
        print("soak", "failed" if problems else "passed")
        return 1 if problems else 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())

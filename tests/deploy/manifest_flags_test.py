#!/usr/bin/env python3
"""Starts the real binaries with the container command lines of the rendered manifests.

For every overlay of deploy/k8s: render it with `kubectl kustomize`, take each workload's
container command (with $(VAR) expanded from its env and the downward API: pod name, pod IP
127.0.0.1), map /usr/local/bin to the build directory, every mounted volume to a scratch
directory (ConfigMaps written out), every listen address and Service address to loopback ports,
and run them: init containers first (each must exit 0), then the coordinator must serve gRPC
(lomoctl list) and pass its readiness probe, the worker must pass its liveness and readiness
probes (ready = registered with that coordinator). The Secrets the manifests mount but do not
contain (tokens) are made as deploy/README.md says, with `lomo-coordinator token create`.
A flag the binaries do not know, or a value they refuse, fails the test: the manifests cannot
drift from the binaries. Where the overlay asks for a GPU and this machine has none, the worker
must refuse only its --device, after every other flag was accepted.

usage: manifest_flags_test.py BUILD_DIR SOURCE_DIR
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

BINARIES = {"lomo-coordinator": "server", "lomo-worker": "worker", "lomo-workerd": "worker",
            "lomoctl": "client"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def wait_for(what, condition, process, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"{what}: the process exited with status {process.returncode}")
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {seconds} s")


class Overlay:
    """One rendered overlay and the loopback ports that stand in for its addresses."""

    def __init__(self, docs):
        self.docs = [d for d in docs if d]
        self.ports = {}  # container port -> loopback port (ports are unique across lomo pods)
        self.services = {}  # (service name, port) -> container port

        for doc in self.of_kind("Service"):
            for port in doc["spec"]["ports"]:
                self.services[(doc["metadata"]["name"], port["port"])] = port
        for workload in self.workloads():
            for container in workload["spec"]["template"]["spec"]["containers"]:
                for port in container.get("ports", []):
                    self.ports[port["containerPort"]] = free_port()

    def of_kind(self, kind):
        return [d for d in self.docs if d["kind"] == kind]

    def workloads(self):
        return [d for d in self.docs if d["kind"] in ("StatefulSet", "Deployment", "DaemonSet")]

    def container_port(self, container, port):
        """A probe's port (a number or a name) as a number."""
        if isinstance(port, int):
            return port
        return next(p["containerPort"] for p in container["ports"] if p["name"] == port)

    def rewrite_addresses(self, text):
        """0.0.0.0:P and SERVICE[.ns.svc...]:P become 127.0.0.1 and the port that stands in."""
        def listen(match):
            return f"127.0.0.1:{self.ports[int(match.group(2))]}"

        text = re.sub(r"(0\.0\.0\.0|\[::\]):(\d+)", listen, text)
        for (name, port), spec in self.services.items():
            target = spec.get("targetPort", port)
            if not isinstance(target, int):
                target = port  # named target ports here always equal the Service port
            pattern = re.escape(name) + r"(\.[a-z0-9.-]+)?:" + str(port) + r"\b"
            text = re.sub(pattern, f"127.0.0.1:{self.ports[target]}", text)
        return text


def make_secrets(build, scratch):
    """The Secrets deploy/README.md tells an operator to create: the coordinator's tokens file
    (lomo-tokens) with a worker token (lomo-worker-token) and an admin token for lomoctl."""
    os.makedirs(scratch, exist_ok=True)
    tokens_file = os.path.join(scratch, "tokens.yaml")
    coordinator = os.path.join(build, "server/lomo-coordinator")

    def create(name, role, *extra):
        out = subprocess.run([coordinator, "token", "create", "--tokens-file", tokens_file,
                              "--name", name, "--role", role, *extra],
                             check=True, capture_output=True, text=True).stdout
        return out.strip()

    admin = create("deploy-test", "admin")
    worker = create("lomo-workers", "worker", "--worker-ids", "lomo-worker-*")
    with open(tokens_file) as f:
        tokens_yaml = f.read()
    admin_file = os.path.join(scratch, "admin.token")
    with open(admin_file, "w") as f:
        f.write(admin + "\n")
    return {"lomo-tokens": {"tokens.yaml": tokens_yaml},
            "lomo-worker-token": {"token": worker + "\n"}}, admin_file


class Pod:
    """One container of a workload (its first, or `container`), run here as a process."""

    def __init__(self, overlay, workload, scratch, build, secrets, container=None):
        self.overlay = overlay
        self.workload = workload
        self.secrets = secrets
        self.name = workload["metadata"]["name"] + "-0"
        spec = workload["spec"]["template"]["spec"]
        self.container = container or spec["containers"][0]
        self.root = os.path.join(scratch, self.name)
        self.mounts = self.make_volumes(spec)
        self.argv = self.command(build)
        self.log = open(os.path.join(self.root, f"log-{self.container['name']}.txt"), "w+")
        self.process = None
        self.init = [Pod(overlay, workload, scratch, build, secrets, c)
                     for c in ([] if container else spec.get("initContainers", []))]

    def make_volumes(self, spec):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        configmaps = {c["metadata"]["name"]: c for c in self.overlay.of_kind("ConfigMap")}
        mounts = {}
        for mount in self.container.get("volumeMounts", []):
            directory = os.path.join(self.root, "volumes", mount["name"])
            os.makedirs(directory, exist_ok=True)
            volume = volumes.get(mount["name"], {})
            if "configMap" in volume:
                data = configmaps[volume["configMap"]["name"]]["data"]
                for key, text in data.items():
                    with open(os.path.join(directory, key), "w") as out:
                        out.write(self.localize(text, mounts_so_far=None))
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                if name not in self.secrets:
                    raise AssertionError(f"{self.name}: mounts Secret {name}, which "
                                         "deploy/README.md does not say how to create")
                for key, text in self.secrets[name].items():
                    path = os.path.join(directory, key)
                    with open(path, "w") as out:
                        out.write(text)
                    os.chmod(path, 0o600)
            mounts[mount["mountPath"]] = directory
        return mounts

    def localize(self, text, mounts_so_far=True):
        text = self.overlay.rewrite_addresses(text)
        mounts = self.mounts if mounts_so_far else self.all_mount_paths()
        if not mounts:
            return text
        # One pass, longest mount path first: a replacement is never rewritten again (the scratch
        # directory may itself lie under a mount path such as /tmp).
        paths = sorted(mounts, key=len, reverse=True)
        pattern = "|".join(re.escape(p) for p in paths)
        return re.sub("(" + pattern + r")(?=/|\b|$)", lambda m: mounts[m.group(1)], text)

    def all_mount_paths(self):
        """Every container's mounts (a ConfigMap names paths the pod's other containers mount)."""
        spec = self.workload["spec"]["template"]["spec"]
        return {m["mountPath"]: os.path.join(self.root, "volumes", m["name"])
                for c in spec["containers"] + spec.get("initContainers", [])
                for m in c.get("volumeMounts", [])}

    def env(self):
        values = {}
        for var in self.container.get("env", []):
            if "value" in var:
                values[var["name"]] = str(var["value"])
                continue
            source = var["valueFrom"]
            if "fieldRef" in source:
                field = source["fieldRef"]["fieldPath"]
                values[var["name"]] = {"metadata.name": self.name,
                                       "status.podIP": "127.0.0.1"}[field]
            elif "resourceFieldRef" in source:
                values[var["name"]] = "1"
            else:
                raise AssertionError(f"{self.name}: env {var['name']}: unsupported source")
        return values

    def command(self, build):
        env = self.env()
        argv = self.container["command"] + self.container.get("args", [])
        expanded = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in argv]
        program = os.path.basename(expanded[0])
        if not expanded[0].startswith("/usr/local/bin/") or program not in BINARIES:
            raise AssertionError(f"{self.name}: unexpected program {expanded[0]}")
        local = os.path.join(build, BINARIES[program], program)
        return [local] + [self.localize(a) for a in expanded[1:]]

    def run_init(self):
        """Runs the init containers in order; each must exit 0 within a minute."""
        for init in self.init:
            print(f"[{self.name}] init container {init.container['name']}: {' '.join(init.argv)}")
            init.start()
            init.process.wait(timeout=60)
            if init.process.returncode != 0:
                raise AssertionError(f"{self.name}: init container {init.container['name']} "
                                     f"exited with {init.process.returncode}:\n{init.output()}")

    def start(self):
        env = dict(os.environ)
        env.update(self.env())  # OMP_NUM_THREADS: "1" stands in for the CPU limit
        self.process = subprocess.Popen(self.argv, cwd=self.root, stdout=self.log,
                                        stderr=subprocess.STDOUT, env=env)

    def probe_url(self, probe):
        get = self.container[probe]["httpGet"]
        port = self.overlay.ports[self.overlay.container_port(self.container, get["port"])]
        return f"http://127.0.0.1:{port}{get['path']}"

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def check_overlay(name, source, build, scratch):
    rendered = subprocess.run(["kubectl", "kustomize", os.path.join(source, "deploy/k8s/overlays",
                                                                     name)],
                              check=True, capture_output=True, text=True).stdout
    overlay = Overlay(yaml.safe_load_all(rendered))
    secrets, admin_token = make_secrets(build, os.path.join(scratch, "secrets"))
    pods = {w["metadata"]["labels"]["app.kubernetes.io/component"]:
            Pod(overlay, w, scratch, build, secrets) for w in overlay.workloads()}
    coordinator, worker = pods["coordinator"], pods["worker"]
    try:
        coordinator.run_init()
        print(f"[{name}] coordinator: {' '.join(coordinator.argv)}")
        coordinator.start()
        wait_for(f"[{name}] coordinator readiness probe",
                 lambda: http_status(coordinator.probe_url("readinessProbe")) == 200,
                 coordinator.process)
        grpc = overlay.rewrite_addresses("lomo-coordinator:7070")
        subprocess.run([os.path.join(build, "client/lomoctl"), "--coordinator", grpc,
                        "--token-file", admin_token, "list"], check=True, capture_output=True)

        worker.run_init()
        print(f"[{name}] worker: {' '.join(worker.argv)}")
        worker.start()
        wants_gpu = "nvidia.com/gpu" in worker.container["resources"].get("limits", {})
        if wants_gpu and not os.path.exists("/dev/nvidia0"):
            # No GPU here: every flag but the device must have been accepted.
            worker.process.wait(timeout=60)
            text = worker.output()
            assert worker.process.returncode == 2 and "--device 0:" in text and \
                "no usable GPU" in text and "usage:" not in text, text
            print(f"[{name}] worker accepted its flags; --device 0 refused: no GPU here")
            return
        for probe in ("livenessProbe", "readinessProbe"):
            wait_for(f"[{name}] worker {probe}",
                     lambda: http_status(worker.probe_url(probe)) == 200, worker.process)
        print(f"[{name}] both started from the manifests; probes pass")
    except Exception:
        for pod in pods.values():
            for container in pod.init + [pod]:
                print(f"--- {pod.name} {container.container['name']} log:\n"
                      f"{container.output()}")
        raise
    finally:
        for pod in reversed(list(pods.values())):
            pod.stop()


def main():
    build, source = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    if shutil.which("kubectl") is None:
        print("SKIP: kubectl is not installed")
        return 77
    overlays = sorted(os.listdir(os.path.join(source, "deploy/k8s/overlays")))
    scratch = tempfile.mkdtemp(prefix="manifest-flags.", dir=build)
    try:
        for name in overlays:
            check_overlay(name, source, build, os.path.join(scratch, name))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"PASS: {len(overlays)} overlays start the real binaries")
    return 0


if __name__ == "__main__":
    sys.exit(main())

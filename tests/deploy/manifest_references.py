"""Cross-references in rendered Kubernetes manifests, which no schema check sees (issue 13).

kubernetes-validate checks each object against its kind's schema; it cannot see that a Service
selects no pod, targets a port no container declares, that a probe names a missing port, that a
volume mount names no volume, or that the ServiceMonitor (a CRD the schema does not know at all)
scrapes a port no selected Service has. Each of these renders and applies cleanly and fails only
in a cluster. This script reads the multi-document YAML `kubectl kustomize` prints and reports
every broken reference as "FILE: KIND/NAME: what" (exit 1), or prints a summary (exit 0).

    manifest_references.py RENDERED.yaml [...]
    manifest_references.py --self-test      # broken examples must be caught
"""
import sys

import yaml

# ServiceMonitor endpoint fields lomo may use (monitoring.coreos.com/v1 Endpoint); anything else is
# most likely a misspelling, which the operator would silently ignore.
ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "scheme", "authorization",
                   "tlsConfig", "honorLabels", "relabelings", "metricRelabelings", "params"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def name_of(obj):
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def namespace_of(obj):
    return obj.get("metadata", {}).get("namespace", "default")


def matches(selector, labels):
    """A LabelSelector (matchLabels/matchExpressions) or a plain map against `labels`."""
    if selector is None:
        return False
    plain = {k: v for k, v in selector.items() if k not in ("matchLabels", "matchExpressions")}
    required = dict(selector.get("matchLabels", {}), **plain)
    if any(labels.get(k) != v for k, v in required.items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return bool(required) or bool(selector.get("matchExpressions"))


def pod_templates(objects):
    """(workload, namespace, pod labels, pod spec) of every workload."""
    for obj in objects:
        if obj.get("kind") in WORKLOAD_KINDS:
            template = obj["spec"]["template"]
            yield (obj, namespace_of(obj), template.get("metadata", {}).get("labels", {}),
                   template["spec"])


def container_ports(spec):
    ports = set()
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        for port in container.get("ports", []):
            ports.add(port["containerPort"])
            if "name" in port:
                ports.add(port["name"])
    return ports


def check_pods(objects, problems):
    for workload, _, _, spec in pod_templates(objects):
        volumes = {v["name"] for v in spec.get("volumes", [])}
        claims = {c["metadata"]["name"]
                  for c in workload.get("spec", {}).get("volumeClaimTemplates", [])}
        ports = container_ports(spec)
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            where = f"{name_of(workload)}: container {container['name']}"
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes | claims:
                    problems.append(f"{where}: volumeMount {mount['name']} names no volume")
            for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
                probe = container.get(probe_name, {})
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    port = probe.get(handler, {}).get("port")
                    if port is not None and port not in ports:
                        problems.append(f"{where}: {probe_name} port {port} is no container port")


def check_services(objects, problems):
    pods = list(pod_templates(objects))
    for service in (o for o in objects if o.get("kind") == "Service"):
        selector = service["spec"].get("selector")
        selected = [p for p in pods if p[1] == namespace_of(service) and matches(selector, p[2])]
        if not selected:
            problems.append(f"{name_of(service)}: its selector {selector} matches no pod template")
            continue
        ports = set().union(*(container_ports(p[3]) for p in selected))
        for port in service["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            if target not in ports:
                problems.append(f"{name_of(service)}: port {port.get('name', port['port'])} "
                                f"targets {target}, which no selected container declares")


def check_selectors(objects, problems):
    """PodDisruptionBudgets and NetworkPolicies that select no pod protect nothing."""
    pods = list(pod_templates(objects))
    for obj in objects:
        kind = obj.get("kind")
        if kind == "PodDisruptionBudget":
            selector = obj["spec"].get("selector")
        elif kind == "NetworkPolicy":
            selector = obj["spec"].get("podSelector")
        else:
            continue
        if not any(p[1] == namespace_of(obj) and matches(selector, p[2]) for p in pods):
            problems.append(f"{name_of(obj)}: its selector {selector} matches no pod template")


def check_service_monitors(objects, problems):
    services = [o for o in objects if o.get("kind") == "Service"]
    for monitor in (o for o in objects if o.get("kind") == "ServiceMonitor"):
        spec = monitor.get("spec", {})
        selected = [s for s in services if s.get("metadata", {}).get("namespace") ==
                    monitor.get("metadata", {}).get("namespace") and
                    matches(spec.get("selector"), s.get("metadata", {}).get("labels", {}))]
        if not selected:
            problems.append(f"{name_of(monitor)}: its selector matches no Service")
        named_ports = {p.get("name") for s in selected for p in s["spec"].get("ports", [])}
        endpoints = spec.get("endpoints", [])
        if not endpoints:
            problems.append(f"{name_of(monitor)}: no endpoints")
        for endpoint in endpoints:
            unknown = set(endpoint) - ENDPOINT_FIELDS
            if unknown:
                problems.append(f"{name_of(monitor)}: endpoint fields {sorted(unknown)} unknown")
            if endpoint.get("port") not in named_ports:
                problems.append(f"{name_of(monitor)}: endpoint port {endpoint.get('port')} is no "
                                f"named port of a selected Service ({sorted(named_ports)})")
            credentials = endpoint.get("authorization", {}).get("credentials")
            if credentials is not None and not {"name", "key"} <= set(credentials):
                problems.append(f"{name_of(monitor)}: authorization.credentials needs name, key")


def problems_of(objects):
    problems = []
    for check in (check_pods, check_services, check_selectors, check_service_monitors):
        check(objects, problems)
    return problems


def load(path):
    with open(path, encoding="utf-8") as f:
        return [o for o in yaml.safe_load_all(f) if o]


BROKEN = """
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: w, namespace: n}
spec:
  template:
    metadata: {labels: {app: w}}
    spec:
      containers:
        - name: c
          ports: [{name: metrics, containerPort: 9400}]
          volumeMounts: [{name: data, mountPath: /d}]
          readinessProbe: {httpGet: {port: health, path: /readyz}}
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: n, labels: {app: w}}
spec:
  selector: {app: w}
  ports: [{name: metrics, port: 9400, targetPort: 9401}]
---
apiVersion: v1
kind: Service
metadata: {name: orphan, namespace: n}
spec:
  selector: {app: nobody}
  ports: [{name: http, port: 80}]
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {name: p, namespace: n}
spec: {selector: {matchLabels: {app: other}}}
---
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata: {name: m, namespace: n}
spec:
  selector: {matchLabels: {app: w}}
  endpoints: [{port: http, intervall: 30s}]
"""


def self_test():
    """Every kind of broken reference above must be reported, or this check could never fail."""
    problems = problems_of([o for o in yaml.safe_load_all(BROKEN) if o])
    expected = ["volumeMount data names no volume", "readinessProbe port health",
                "targets 9401", "Service/orphan: its selector", "PodDisruptionBudget/p",
                "endpoint fields ['intervall'] unknown", "endpoint port http is no named port"]
    missing = [e for e in expected if not any(e in p for p in problems)]
    for p in problems:
        print("caught:", p)
    if missing:
        print("FAIL: the self-test's broken references were not all caught:", missing)
        return 1
    print(f"PASS: self-test caught all {len(expected)} kinds of broken reference")
    return 0


def main(paths):
    if paths == ["--self-test"]:
        return self_test()
    status = 0
    for path in paths:
        objects = load(path)
        problems = problems_of(objects)
        for p in problems:
            print(f"{path}: {p}")
        status |= 1 if problems else 0
        if not problems:
            print(f"{path}: {len(objects)} objects, every reference resolves")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

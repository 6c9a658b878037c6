"""docs/openapi.yaml against a running lomo-coordinator: every operation is called (successes
and errors), and openapi-core validates each request and response against the document (status,
content type, body schema with additionalProperties: false, so a renamed or new field fails);
the NDJSON event stream is validated line by line against WatchJobResponse.

usage: openapi_check.py LOMO_COORDINATOR SOURCE_DIR
"""
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import jsonschema
import requests
import yaml
from openapi_core import OpenAPI
from openapi_core.contrib.requests import RequestsOpenAPIRequest, RequestsOpenAPIResponse

SPEC = {"name": "openapi-check", "model": {"path": "/models/tiny"},
        "data": {"train": ["train.txt"]}, "training": {"steps": 10}}


class Checker:
    def __init__(self, api, base, document):
        self.api, self.base, self.failures, self.calls = api, base, [], 0
        self.event_schema = jsonschema.Draft202012Validator(
            {"$ref": "#/components/schemas/WatchJobResponse", "components": document["components"]})

    def call(self, method, path, expect_status, **kwargs):
        response = requests.request(method, self.base + path, timeout=10, **kwargs)
        self.calls += 1
        where = f"{method} {path}"
        if response.status_code != expect_status:
            self.failures.append(f"{where}: status {response.status_code}, expected "
                                 f"{expect_status}: {response.text[:300]}")
        request = RequestsOpenAPIRequest(response.request)
        try:
            if expect_status < 400:  # the error cases send what the document forbids
                self.api.validate_request(request)
            self.api.validate_response(request, RequestsOpenAPIResponse(response))
        except Exception as error:  # openapi-core raises one class per kind of mismatch
            detail = getattr(error, "__cause__", None) or error
            self.failures.append(f"{where}: {type(error).__name__}: {detail}")
        return response

    def events(self, job_id):
        response = self.call("GET", f"/v1/jobs/{job_id}/events", 200)
        lines = [line for line in response.text.splitlines() if line]
        for line in lines:
            for error in self.event_schema.iter_errors(json.loads(line)):
                self.failures.append(f"event line {line[:120]}: {error.message}")
        return lines


def start_coordinator(binary, scratch):
    ready = scratch / "ready.json"
    log = open(scratch / "coordinator.log", "w")
    process = subprocess.Popen(
        [binary, "--data-dir", str(scratch / "data"), "--grpc-listen", "127.0.0.1:0",
         "--http-listen", "127.0.0.1:0", "--ready-file", str(ready), "--init"],
        stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            return process, json.loads(ready.read_text())["http"]
        except (OSError, ValueError, KeyError):
            if process.poll() is not None:
                break
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("lomo-coordinator did not start:\n" + (scratch / "coordinator.log").read_text())


def exercise(check):
    submitted = check.call("POST", "/v1/jobs", 200, json={"spec": SPEC}).json()["job"]
    job_id = submitted["id"]
    check.call("POST", "/v1/jobs", 200,
               json={"specText": yaml.safe_dump(SPEC), "overrides": ["name=second"]})
    check.call("POST", "/v1/jobs", 400, json={"spec": {**SPEC, "training": {"steps": 0}}})
    check.call("POST", "/v1/jobs", 400, data="not json", headers={"Content-Type": "application/json"})
    check.call("GET", "/v1/jobs", 200)
    page = check.call("GET", "/v1/jobs?pageSize=1", 200).json()
    check.call("GET", f"/v1/jobs?page_size=1&page_token={page['nextPageToken']}", 200)
    check.call("GET", "/v1/jobs?states=QUEUED,running&pageToken=", 200)
    check.call("GET", "/v1/jobs?state=bogus", 400)
    check.call("GET", "/v1/jobs?pagesize=1", 400)
    check.call("GET", f"/v1/jobs/{job_id}", 200)
    check.call("GET", "/v1/jobs/job-000000000000", 404)
    check.call("GET", f"/v1/jobs/{job_id}/checkpoints", 200)
    check.call("GET", "/v1/jobs/job-000000000000/checkpoints", 404)
    check.call("POST", f"/v1/jobs/{job_id}:cancel", 415)  # no Content-Type
    check.call("POST", f"/v1/jobs/{job_id}:cancel", 200, json={})
    check.call("POST", "/v1/jobs/job-000000000000:cancel", 404, json={})
    lines = check.events(job_id)
    if len(lines) < 2:
        check.failures.append(f"events of a submitted and cancelled job: {lines}")
    check.call("GET", f"/v1/jobs/{job_id}/events?afterSequence=1&follow=false", 200)
    check.call("GET", f"/v1/jobs/{job_id}/events?after=1", 400)
    check.call("GET", "/healthz", 200)
    check.call("GET", "/metrics", 200)


def main():
    binary, source_dir = sys.argv[1], pathlib.Path(sys.argv[2])
    document_path = source_dir / "docs/openapi.yaml"
    document = yaml.safe_load(document_path.read_text())
    api = OpenAPI.from_file_path(str(document_path))
    with tempfile.TemporaryDirectory() as scratch:
        process, http = start_coordinator(binary, pathlib.Path(scratch))
        try:
            check = Checker(api, f"http://{http}", document)
            exercise(check)
        finally:
            process.terminate()
            process.wait(timeout=30)
    for failure in check.failures:
        print("FAIL", failure)
    print(f"{check.calls} calls checked against {document_path.name}, {len(check.failures)} failures")
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())

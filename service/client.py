"""Command-line client for the facegen API (httpx; a tqdm progress bar when tqdm is installed, fed by the job's
event stream).

    python -m service.client generate --label smiling --count 16 --seed 1 --out grid.png [--gif anim.gif]
    python -m service.client edit face.jpg --label smiling [--strength 0.6] --out pair.png [--gif change.gif]
    python -m service.client status JOB_ID
    python -m service.client fetch JOB_ID --out grid.png [--gif anim.gif]
    python -m service.client cancel JOB_ID
    python -m service.client models
    python -m service.client reproduce FILE.png [--out again.png]

Every command takes ``--url`` (default ``$FACEGEN_URL`` or http://127.0.0.1:8000) and ``--api-key``
(default ``$FACEGEN_API_KEY``). Exit status: 0 done, 1 the API refused or the job failed, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from facegen.contract.fields import DEFAULT_COUNT, LATEST
from facegen.contract.spec import DEFAULT_SAMPLER, Sampler

DEFAULT_URL = "http://127.0.0.1:8000"
ENDED = {"finished", "failed", "canceled", "stopped"}
STREAM_READ_TIMEOUT_S = 60.0  # the server sends a keep-alive every EVENTS_KEEPALIVE_S (15 s by default)


class ClientError(Exception):
    """The API refused a request, the job failed, or the server could not be reached."""

    def __init__(self, message: str, status_code: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return response.text.strip()[:200] or response.reason_phrase
    if isinstance(detail, list):  # 422: [{"loc": [...], "msg": ...}]
        return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', [])[1:]) or 'body'}: {e.get('msg')}" for e in detail)
    return str(detail)


class FacegenClient:
    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> FacegenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach {self.url}: {exc}") from None
        if response.status_code >= 400:
            retry_after = response.headers.get("Retry-After", "")
            raise ClientError(
                f"{_detail(response)} (HTTP {response.status_code})",
                response.status_code,
                float(retry_after) if retry_after.isdigit() else None,
            )
        return response

    def generate(self, request: dict[str, Any], retries: int = 5) -> dict[str, Any]:
        """Queue a job; on 429/503 waits Retry-After and retries (safely: one Idempotency-Key for all tries)."""
        return self._submit("/generate", retries, json=request)

    def edit(self, image: bytes, fields: dict[str, Any], filename: str = "face.png", retries: int = 5
             ) -> dict[str, Any]:
        """Queue an edit of ``image`` (the file's bytes) with the form ``fields`` (label, strength, …); retried
        like :meth:`generate`."""
        form = {name: str(value).lower() if isinstance(value, bool) else str(value) for name, value in fields.items()}
        return self._submit("/edit", retries, data=form, files={"image": (filename, image)})

    def _submit(self, path: str, retries: int, **body: Any) -> dict[str, Any]:
        """POST a job to ``path``; on 429/503 waits Retry-After and retries under one Idempotency-Key."""
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        for attempt in range(retries + 1):
            try:
                return self._request("POST", path, headers=headers, **body).json()
            except ClientError as exc:
                if exc.status_code not in (429, 503) or attempt == retries:
                    raise
                print(f"{exc}; retrying", file=sys.stderr)
                time.sleep(min(30.0, exc.retry_after or 2.0))
        raise AssertionError("unreachable")

    def status(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/jobs/{job_id}").json()

    def models(self) -> dict[str, Any]:
        return self._request("GET", "/models").json()

    def artifact(self, job_id: str, kind: str = "result") -> bytes:
        """``kind``: ``"result"`` (PNG grid), ``"animation"`` (GIF) or ``"images/{i}"`` (image ``i`` alone, PNG).
        Follows a 307 to the artifact store (``ARTIFACT_REDIRECT``; httpx does not send the API key to another
        host)."""
        return self._request("GET", f"/jobs/{job_id}/{kind}", follow_redirects=True).content

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[dict[str, Any]]:
        """The job's events (``GET /jobs/{id}/events``, after ``last_event_id``) as ``{"id", "event", "data"}`` (data
        parsed), until the server ends the stream; raises ``ClientError`` or ``httpx.HTTPError`` when it fails."""
        timeout = httpx.Timeout(self.http.timeout.connect, read=STREAM_READ_TIMEOUT_S)
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        with self.http.stream("GET", f"/jobs/{job_id}/events", timeout=timeout, headers=headers) as response:
            if response.status_code == 204:  # resumed after the final event
                return
            if response.status_code != 200:
                response.read()
                raise ClientError(f"{_detail(response)} (HTTP {response.status_code})", response.status_code)
            event: dict[str, Any] = {}
            for line in response.iter_lines():
                if not line:
                    if "event" in event:
                        yield {**event, "data": json.loads(event.get("data") or "{}")}
                    event = {}
                elif not line.startswith(":"):
                    name, _, value = line.partition(":")
                    event[name] = value.removeprefix(" ")

    def _follow(self, job_id: str, on_update: Callable[[dict[str, Any]], None] | None, deadline: float) -> None:
        """Feed ``on_update`` with job-like updates from the event stream until its final event or the deadline,
        reconnecting with ``Last-Event-ID`` when the server ends a stream early (``EVENTS_MAX_S``)."""
        last_id: str | None = None
        while time.monotonic() < deadline:
            resumed_from = last_id
            for event in self.events(job_id, last_id):
                data, name, last_id = event["data"], event["event"], event.get("id")
                if name == "queued":
                    update = {"status": "queued", "queue_position": data.get("queue_position")}
                elif name in ("started", "progress"):
                    update = {"status": "started", "progress": data.get("progress")}
                else:
                    return
                if on_update:
                    on_update(update)
                if time.monotonic() > deadline:
                    return
            if last_id is None or last_id == resumed_from:  # nothing new: let polling tell how it ended
                return

    def wait(
        self,
        job_id: str,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        poll_s: float = 0.5,
        timeout_s: float = 3600.0,
    ) -> dict[str, Any]:
        """Follow the job's event stream until it ends (polling ``GET /jobs/{id}`` if the stream fails), then read
        its final status; returns it, raises ``ClientError`` unless it finished."""
        deadline = time.monotonic() + timeout_s
        try:
            self._follow(job_id, on_update, deadline)
        except (httpx.HTTPError, ClientError, ValueError) as exc:
            print(f"event stream unavailable ({exc}); polling", file=sys.stderr)
        while True:
            job = self.status(job_id)
            if on_update:
                on_update(job)
            if job["status"] in ENDED:
                if job["status"] != "finished":
                    raise ClientError(f"job {job_id} {job['status']}: {job.get('error') or 'no reason given'}")
                return job
            if time.monotonic() > deadline:
                raise ClientError(f"job {job_id} still {job['status']} after {timeout_s:.0f} s")
            time.sleep(poll_s)


class _Progress:
    """Denoising progress on stderr: a tqdm bar when available, else a line per change."""

    def __init__(self) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self._tqdm = tqdm
        self._bar: Any = None
        self._last: tuple[str, int, int] | None = None

    def __call__(self, job: dict[str, Any]) -> None:
        progress = job.get("progress") or {}
        step, total = int(progress.get("step", 0)), int(progress.get("total", 0))
        state = (job["status"], step, total)
        if state == self._last:
            return
        self._last = state
        if self._tqdm is not None and total:
            if self._bar is None:
                self._bar = self._tqdm(total=total, desc="denoising", unit="step", file=sys.stderr)
            self._bar.update(step - self._bar.n)
        elif self._tqdm is None or job["status"] != "started":
            where = f" (position {job['queue_position']})" if job.get("queue_position") is not None else ""
            steps = f" {step}/{total} steps" if total else ""
            print(f"{job['status']}{where}{steps}", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _write(path: str, data: bytes) -> None:
    Path(path).write_bytes(data)
    print(f"wrote {path} ({len(data)} bytes)", file=sys.stderr)


def _parse_attributes(text: str) -> dict[str, bool]:
    """``"Smiling=true,Eyeglasses=false"`` -> ``{"Smiling": True, "Eyeglasses": False}``."""
    result = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"attribute {name!r}: value must be true or false")
        result[name.strip()] = value.lower() in ("true", "1", "yes")
    return result


def _fetch(client: FacegenClient, job_id: str, out: str | None, gif: str | None) -> None:
    if out:
        _write(out, client.artifact(job_id, "result"))
    if gif:
        _write(gif, client.artifact(job_id, "animation"))


def cmd_generate(client: FacegenClient, args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"count": args.count, "sampler": args.sampler, "model": args.model}
    if args.attributes:
        request["attributes"] = args.attributes
    else:
        request["label"] = args.label
    for name in ("seed", "steps", "guidance_scale"):
        if getattr(args, name) is not None:
            request[name] = getattr(args, name)
    if args.gif:
        request["animation"] = True
    return _wait_and_fetch(client, client.generate(request), args)


def cmd_edit(client: FacegenClient, args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"model": args.model}
    if args.attributes:
        fields["attributes"] = json.dumps(args.attributes)
    else:
        fields["label"] = args.label
    for name in ("strength", "seed", "steps", "guidance_scale"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.gif:
        fields["animation"] = True
    return _wait_and_fetch(client, client.edit(args.file.read_bytes(), fields, args.file.name), args)


def _wait_and_fetch(client: FacegenClient, accepted: dict[str, Any], args: argparse.Namespace) -> int:
    """Wait for the accepted job with a progress display, then save its images; prints the job id."""
    job_id = accepted["job_id"]
    print(f"job {job_id} queued (seed {accepted['seed']})", file=sys.stderr)
    progress = _Progress()
    try:
        client.wait(job_id, on_update=progress, timeout_s=args.timeout)
    finally:
        progress.close()
    _fetch(client, job_id, args.out, args.gif)
    print(job_id)
    return 0


def cmd_status(client: FacegenClient, args: argparse.Namespace) -> int:
    print(json.dumps(client.status(args.job_id), indent=2))
    return 0


def cmd_fetch(client: FacegenClient, args: argparse.Namespace) -> int:
    _fetch(client, args.job_id, args.out, args.gif)
    return 0


def cmd_cancel(client: FacegenClient, args: argparse.Namespace) -> int:
    job = client.cancel(args.job_id)
    print(f"job {args.job_id}: {job['status']}" + (" (cancel requested)" if job.get("cancel_requested") else ""))
    return 0


def cmd_models(client: FacegenClient, args: argparse.Namespace) -> int:
    print(json.dumps(client.models(), indent=2))
    return 0


def reproduce_request(record: dict[str, Any]) -> dict[str, Any]:
    """The POST /generate body that recomputes the image(s) a provenance record describes: one image
    (``index`` an int) or a grid (``index`` its consecutive indices). Raises ``ClientError`` for a record that
    does not say enough, or an edit's (it needs its input image: run ``edit`` on it again)."""
    if record.get("kind") == "edit":
        raise ClientError("this image is an edit: reproducing it needs its input image (input_sha256 "
                          f"{record.get('input_sha256')}); run `edit` on that file with strength {record.get('strength')}")
    try:
        index = record["index"]
        indices = [index] if isinstance(index, int) else list(index)
        if not indices or indices != list(range(indices[0], indices[0] + len(indices))):
            raise ClientError(f"provenance index {index!r} is not an image index or a run of consecutive ones")
        return {"attributes": record["attributes"], "seed": record["seed"], "steps": record["steps"],
                "sampler": record["sampler"], "guidance_scale": record["guidance_scale"], "model": record["model"],
                "count": len(indices), "first_index": indices[0]}
    except (KeyError, TypeError) as exc:
        raise ClientError(f"the provenance record lacks a usable field: {exc}") from None


def cmd_reproduce(client: FacegenClient, args: argparse.Namespace) -> int:
    from PIL import Image

    from service.images import read_parameters

    try:
        with Image.open(args.file) as original:
            record = read_parameters(original)
            pixels = original.convert("RGB")
    except OSError as exc:
        raise ClientError(f"cannot read {args.file}: {exc}") from None
    if record is None:
        raise ClientError(f"{args.file} carries no facegen parameters (a PNG text chunk or EXIF UserComment)")
    request = reproduce_request(record)
    accepted = client.generate(request)
    job_id = accepted["job_id"]
    print(f"job {job_id} queued: {json.dumps(request, sort_keys=True)}", file=sys.stderr)
    client.wait(job_id, timeout_s=args.timeout)
    data = client.artifact(job_id, "result" if isinstance(record["index"], list) else "images/0")
    out = args.out or str(Path(args.file).with_name(f"{Path(args.file).stem}-reproduced.png"))
    _write(out, data)
    with Image.open(out) as again:
        identical = again.size == pixels.size and again.convert("RGB").tobytes() == pixels.tobytes()
        where = read_parameters(again) or {}
    if not identical:
        print(f"pixels differ from {args.file} (made with {record.get('dtype')} on {record.get('device')}, "
              f"now {where.get('dtype')} on {where.get('device')})", file=sys.stderr)
        return 1
    print(f"identical pixels: {out}")
    return 0


def add_job_options(command: argparse.ArgumentParser) -> None:
    """The options ``generate`` and ``edit`` share: seed, steps, guidance, model and how long to wait."""
    command.add_argument("--seed", type=int)
    command.add_argument("--steps", type=int)
    command.add_argument("--guidance", dest="guidance_scale", type=float)
    command.add_argument("--model", default=LATEST)
    command.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("FACEGEN_URL", DEFAULT_URL),
                        help="API base URL (default $FACEGEN_URL or %(default)s)")
    common.add_argument("--api-key", default=os.environ.get("FACEGEN_API_KEY"),
                        help="API key (default $FACEGEN_API_KEY)")
    parser = argparse.ArgumentParser(prog="python -m service.client", description="facegen API client")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", parents=[common], help="queue a job, wait, save the images")
    gen.add_argument("--label", default="smiling", help='"smiling", "not_smiling", … (default %(default)s)')
    gen.add_argument("--attributes", type=_parse_attributes, help="instead of --label: Smiling=true,Eyeglasses=false")
    gen.add_argument("--count", type=int, default=DEFAULT_COUNT)
    gen.add_argument("--sampler", choices=[s.value for s in Sampler], default=DEFAULT_SAMPLER.value)
    add_job_options(gen)
    gen.add_argument("--out", required=True, help="PNG grid path")
    gen.add_argument("--gif", help="also render the denoising animation to this GIF path")
    gen.set_defaults(run=cmd_generate)

    edit = commands.add_parser("edit", parents=[common], help="edit a face photo, wait, save [input | edited]")
    edit.add_argument("file", type=Path, help="the face: a PNG, JPEG or WebP file")
    edit.add_argument("--label", default="smiling", help='the target: "smiling" or "not_smiling" (default %(default)s)')
    edit.add_argument("--attributes", type=_parse_attributes, help="instead of --label: Smiling=true")
    edit.add_argument("--strength", type=float, help="0..1, how deep into the noise the edit goes (default: the "
                                                     "server's)")
    add_job_options(edit)
    edit.add_argument("--out", required=True, help="PNG path for the pair [input | edited]")
    edit.add_argument("--gif", help="also render the change from the input to the edit to this GIF path")
    edit.set_defaults(run=cmd_edit)

    status = commands.add_parser("status", parents=[common], help="print a job's status as JSON")
    status.add_argument("job_id")
    status.set_defaults(run=cmd_status)

    fetch = commands.add_parser("fetch", parents=[common], help="save a finished job's images")
    fetch.add_argument("job_id")
    fetch.add_argument("--out", required=True, help="PNG grid path")
    fetch.add_argument("--gif", help="GIF path (the job must have asked for an animation)")
    fetch.set_defaults(run=cmd_fetch)

    cancel = commands.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.set_defaults(run=cmd_cancel)

    models = commands.add_parser("models", parents=[common], help="list the models live workers serve")
    models.set_defaults(run=cmd_models)

    again = commands.add_parser("reproduce", parents=[common],
                                help="resubmit the parameters an image carries and check the pixels are identical")
    again.add_argument("file", help="a PNG from the service (or a WebP/JPEG it converted)")
    again.add_argument("--out", help="where to write the new image (default FILE-reproduced.png)")
    again.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job")
    again.set_defaults(run=cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with FacegenClient(args.url, args.api_key) as client:
        try:
            return args.run(client, args)
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    sys.exit(main())

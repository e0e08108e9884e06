"""Peak memory of the API process while it decodes POST /edit uploads at the pixel limit.

For each case a fresh ``python -m service`` (one process, private Redis) takes one small edit (imports, thread
pool, encoders warmed), then the case's upload(s) at once; the figure is the rise of the process's peak resident
set (``VmHWM`` in /proc/PID/status) from before the case's uploads to after. The target: one upload at
MAX_UPLOAD_PIXELS (25 M pixels) raises it by at most 128 MiB. The images are smooth gradients, so a 25 M pixel
file fits MAX_UPLOAD_BYTES (4 MiB); memory depends on pixels and mode, not on content.

    python -m bench.upload_memory --concurrent 8
"""

from __future__ import annotations

import argparse
import io
import struct
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

from bench.common import markdown_table, save
from bench.stack import start_api, start_redis
from service.config import Settings
from service.uploads import MIB, WEBP_BYTES_PER_PIXEL

TARGET_MIB = 128  # what one upload at MAX_UPLOAD_PIXELS may add to the API process's peak RSS
SETTINGS = Settings()
SIDE = int(SETTINGS.max_upload_pixels ** 0.5)  # a square at the pixel limit
WEBP_SIDE = int((SETTINGS.upload_decode_max_mib * MIB / WEBP_BYTES_PER_PIXEL) ** 0.5)  # at UPLOAD_DECODE_MAX_MIB


def gradients(side: int, alpha: bool = False) -> Image.Image:
    """A side x side RGB (or RGBA) image of gradients: compresses to well under MAX_UPLOAD_BYTES."""
    size = (side, side)
    ramp, radial = Image.linear_gradient("L").resize(size), Image.radial_gradient("L").resize(size)
    bands = (ramp.transpose(Image.Transpose.ROTATE_90), ramp, radial)
    return Image.merge("RGBA", (*bands, radial.transpose(Image.Transpose.FLIP_LEFT_RIGHT))) if alpha \
        else Image.merge("RGB", bands)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def rgb48_png(side: int) -> bytes:
    """A side x side PNG of 16 bits per RGB channel (Pillow writes none): a horizontal grey ramp."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"".join(struct.pack(">HHH", *(x * 65535 // side,) * 3) for x in range(side))
    compressor = zlib.compressobj(6)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], bytes]  # the file
    pixels: int
    copies: int = 1  # uploads sent at once
    env: dict[str, str] = field(default_factory=dict)  # API settings of this case


def cases(concurrent: int) -> list[Case]:
    full = SIDE * SIDE

    def jpeg() -> bytes:
        return encoded(gradients(SIDE), "JPEG", quality=85)

    def png() -> bytes:
        return encoded(gradients(SIDE), "PNG")

    def webp() -> bytes:
        return encoded(gradients(SIDE), "WEBP", quality=80)

    def progressive_444() -> bytes:
        return encoded(gradients(SIDE), "JPEG", quality=85, progressive=True, subsampling=0)

    uncapped = {"UPLOAD_DECODE_MAX_MIB": "4096"}
    return [
        Case("JPEG", jpeg, full),
        Case("progressive JPEG", lambda: encoded(gradients(SIDE), "JPEG", quality=85, progressive=True), full),
        Case("PNG (RGB)", png, full),
        Case("PNG with alpha (RGBA)", lambda: encoded(gradients(SIDE, alpha=True), "PNG"), full),
        Case("16-bit RGB PNG", lambda: rgb48_png(SIDE), full),
        Case("WebP at UPLOAD_DECODE_MAX_MIB", lambda: encoded(gradients(WEBP_SIDE), "WEBP", quality=80),
             WEBP_SIDE * WEBP_SIDE),
        Case("WebP (refused: 413)", webp, full),
        Case("WebP, UPLOAD_DECODE_MAX_MIB lifted", webp, full, env=uncapped),
        Case("progressive 4:4:4 JPEG (refused: 413)", progressive_444, full),
        Case("progressive 4:4:4 JPEG, UPLOAD_DECODE_MAX_MIB lifted", progressive_444, full, env=uncapped),
        Case(f"{concurrent} JPEGs at once", jpeg, full, copies=concurrent),
        Case(f"{concurrent} PNGs at once", png, full, copies=concurrent),
        Case(f"{concurrent} PNGs at once, UPLOAD_DECODE_CONCURRENCY={concurrent}", png, full, copies=concurrent,
             env={"UPLOAD_DECODE_CONCURRENCY": str(concurrent)}),
    ]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/PID/status")


def post_edit(url: str, data: bytes) -> int:
    answer = httpx.post(f"{url}/edit", data={"label": "smiling"}, files={"image": ("face", data)}, timeout=300)
    return answer.status_code


def measure(redis_url: str, case: Case, data: bytes) -> dict[str, object]:
    env = {"REDIS_MIN_REPLICAS_ACK": "0", "MAX_QUEUED": "100000", **case.env}
    api, url = start_api(redis_url, **env)
    try:
        assert post_edit(url, encoded(gradients(64), "PNG")) == 202
        before = peak_rss_mib(api.process.pid)
        started = time.perf_counter()
        with ThreadPoolExecutor(case.copies) as pool:
            statuses = sorted(set(pool.map(lambda _: post_edit(url, data), range(case.copies))))
        seconds = time.perf_counter() - started
        rise = peak_rss_mib(api.process.pid) - before
    finally:
        api.stop()
    return {"case": case.name, "pixels": case.pixels, "file_kib": len(data) / 1024, "uploads": case.copies,
            "statuses": statuses, "peak_rss_before_mib": before, "peak_rss_rise_mib": rise, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrent", type=int, default=8, help="uploads sent at once in the concurrent cases")
    args = parser.parse_args(argv)
    server = start_redis()
    results = []
    try:
        for case in cases(args.concurrent):
            results.append(measure(server.url, case, case.make()))
            print(results[-1], flush=True)
    finally:
        server.stop()
    rows = [[r["case"], f"{r['pixels'] / 1e6:.1f} M", f"{r['file_kib']:,.0f}", r["uploads"],
             "/".join(map(str, r["statuses"])), f"{r['peak_rss_rise_mib']:.0f}",
             ("yes" if r["peak_rss_rise_mib"] <= TARGET_MIB else "no") if r["uploads"] == 1 else "",
             f"{r['seconds']:.1f}"] for r in results]
    table = markdown_table(["upload", "pixels", "file KiB", "at once", "answer", "peak RSS rise MiB",
                            f"one upload ≤ {TARGET_MIB} MiB", "seconds"], rows)
    save("upload_memory", {"target_mib": TARGET_MIB, "upload_decode_concurrency": SETTINGS.upload_decode_concurrency,
                           "results": results}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

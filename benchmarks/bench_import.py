"""Video import throughput (`genie data import`): source frames decoded/s and dataset frames written/s.

The source is a synthetic mp4 (libx264, a scrolling noise texture with a moving block, so every frame changes and
none is dropped as static), written once before timing. Each timed call imports it into a fresh directory: decode
all frames, resample to --fps, scale + centre-crop to --size, static/scene checks, write the shards and index.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import av
import numpy as np
from common import base_parser, emit, rounded, setup_run, time_it

from genie.data.video import VideoImportConfig, import_videos


def write_source(path: Path, width: int, height: int, fps: int, seconds: float) -> int:
    """Writes the synthetic mp4 and returns its frame count."""
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (height, width * 2, 3), dtype=np.uint8)
    texture = ((texture.astype(np.uint16) + np.roll(texture, 1, axis=1)) // 2).astype(np.uint8)  # less noise, more image
    n = round(fps * seconds)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(n):
            frame = np.ascontiguousarray(texture[:, (t * 4) % width : (t * 4) % width + width])
            y = (t * 3) % (height - 40)
            frame[y : y + 40, 100:160] = (255, 64, 0)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return n


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--source", default="640x360", help="WxH of the synthetic source video")
    parser.add_argument("--source-fps", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--fps", type=float, default=10.0, help="import frame rate")
    parser.add_argument("--size", type=int, default=64, help="output frames are size x size")
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    machine = setup_run(args)

    width, height = (int(x) for x in args.source.lower().split("x"))
    cfg = VideoImportConfig(fps=args.fps, height=args.size, width=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "source.mp4"
        n = write_source(src, width, height, args.source_fps, args.seconds)
        out = Path(tmp) / "out"
        summaries = []
        timing = time_it(lambda: summaries.append(import_videos([src], out, cfg, progress=False)), iters=args.iters,
                         warmup=1, setup=lambda: shutil.rmtree(out, ignore_errors=True))
        summary = summaries[-1]
        size_mb = src.stat().st_size / 1e6
    assert summary["source_frames"] == n, (summary["source_frames"], n)
    row = {
        "source_frames_per_s": n / timing.median,
        "written_frames_per_s": summary["frames"] / timing.median,
        "realtime_x": args.seconds / timing.median,
        **timing.summary(),
    }
    emit({"bench": "video_import", "source": f"{width}x{height}@{args.source_fps}", "source_seconds": args.seconds,
          "source_mb": round(size_mb, 2), "fps": args.fps, "size": args.size, "source_frames": n,
          "written_frames": summary["frames"], "dropped_static": summary["dropped_static"], **rounded(row, 3)},
         machine, args.out)


if __name__ == "__main__":
    main()

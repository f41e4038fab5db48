"""Receipt-like document images and the images manifest over them, as the VLM benchmarks feed the passes."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw


def draw_receipts(folder: Path, count: int) -> list[str]:
    """`count` receipt-like PNGs, each with its own number and total."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.new("RGB", (128, 96), "white")
        draw = ImageDraw.Draw(image)
        coffee, bagel = 3.5 * (1 + i % 3), 2.25 + i % 5
        lines = [f"RECEIPT #{1000 + i}", "Store 17  Cashier: Anna", f"{1 + i % 3} x Coffee  {coffee:.2f}",
                 f"1 x Bagel  {bagel:.2f}", f"TOTAL  {coffee + bagel:.2f}", "THANK YOU"]  # fmt: skip
        for row, line in enumerate(lines):
            draw.text((4, 2 + 15 * row), line, fill="black")
        path = folder / f"doc-{i:04d}.png"
        image.save(path)
        paths.append(str(path))
    return paths


def write_images_manifest(folder: Path, images: list[str], files: int = 4) -> str:
    """The images manifest (id = the file's stem) as a folder of `files` Parquet files, as datasets come."""
    folder.mkdir(parents=True)
    for k in range(files):
        part = images[k::files]
        table = pa.table({"id": pa.array([Path(p).stem for p in part], pa.string()), "image": pa.array(part)})
        pq.write_table(table, folder / f"part-{k}.parquet")
    return str(folder)

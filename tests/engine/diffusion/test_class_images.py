from pathlib import Path

from engine import storage
from engine.diffusion.class_images import MANIFEST, ClassImageCache
from engine.settings import load_settings


def test_a_class_set_is_generated_once_and_then_reused(tmp_path, base):
    settings = load_settings("tiny", overrides={"num_class_images": 3, "sample_batch_size": 2})
    cache = ClassImageCache(str(tmp_path / "class_images"))
    first = cache.ensure(base, "a photo of a ball", settings)
    assert first.generated == 3 and len(first.uris) == 3
    again = cache.ensure(base, "a photo of a ball", settings)
    assert again.generated == 0 and again.uris == first.uris
    other = cache.ensure(base, "a photo of a box", settings)
    assert other.key != first.key and other.generated == 3


def test_an_interrupted_set_resumes_and_ends_identical(tmp_path, base):
    settings = load_settings("tiny", overrides={"num_class_images": 4, "sample_batch_size": 3})
    cache = ClassImageCache(str(tmp_path / "a"))
    complete = cache.ensure(base, "a photo of a ball", settings)
    originals = [Path(u).read_bytes() for u in complete.uris]
    # Simulate a kill after two images: the manifest and the last two are missing.
    folder = Path(complete.uris[0]).parent
    for name in (MANIFEST, "00002.png", "00003.png"):
        (folder / name).unlink()
    resumed = cache.ensure(base, "a photo of a ball", settings)
    assert resumed.generated == 2
    assert [Path(u).read_bytes() for u in resumed.uris] == originals  # batch of 3 vs 2: same pixels


def test_class_sets_live_on_any_fsspec_filesystem(base):
    settings = load_settings("tiny", overrides={"num_class_images": 2})
    cache = ClassImageCache("memory://class-images-test")
    result = cache.ensure(base, "a photo of a dog", settings)
    assert len(result.uris) == 2 and result.generated == 2
    assert all(storage.read_bytes(u).startswith(b"\x89PNG") for u in result.uris)

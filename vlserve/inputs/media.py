"""One media part of a request, in three costs: its bytes (bounded fetch), its grid from the header (no pixels),
then its pixels. The input processor runs them in that order for all items, refusing at the first rule broken."""

from dataclasses import dataclass

from PIL import Image

from vlserve.errors import MediaError
from vlserve.media.fetch import MediaPolicy, fetch_bytes
from vlserve.media.image import image_resize, probe_image, process_image
from vlserve.media.item import MediaItem
from vlserve.media.options import MediaOptions
from vlserve.media.template import MediaRef
from vlserve.media.video import probe_video, process_video


@dataclass
class MediaSource:
    ref: MediaRef
    data: bytes | Image.Image  # encoded bytes, or an image an offline caller passed as it is
    options: MediaOptions  # the server's, tightened by the request's and the part's own


def fetch(ref: MediaRef, policy: MediaPolicy, options: MediaOptions) -> MediaSource:
    data = fetch_bytes(ref.source, policy) if isinstance(ref.source, str) else ref.source
    return MediaSource(ref, data, options)


def probe(src: MediaSource) -> tuple[int, int, int]:
    """grid_thw from the header alone: what preprocess gives (a video whose container miscounts its frames may
    come out shorter; the processor checks again after decoding)."""
    if src.ref.modality == "video":
        return probe_video(_bytes(src), src.options)
    if isinstance(src.data, Image.Image):
        return image_resize(src.data.height, src.data.width, src.options).grid_thw
    return probe_image(src.data, src.options)


def preprocess(src: MediaSource) -> MediaItem:
    if src.ref.modality == "video":
        return process_video(_bytes(src), src.options)
    return process_image(src.data, src.options)


def _bytes(src: MediaSource) -> bytes:
    if not isinstance(src.data, bytes):
        raise MediaError("a video must be a URL, a path or the file's bytes, not a decoded image")
    return src.data


def located(ref: MediaRef, error: MediaError) -> MediaError:
    """The same error (the class decides the HTTP status: too large stays 413) prefixed with where the item is."""
    return type(error)(f"{ref.where}: {error}")

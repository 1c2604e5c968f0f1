"""Feature encoders of `python -m mcncl_fast extract` (the optional `[extract]` extra).

* Text - a Hugging Face encoder from a LOCAL folder (AutoTokenizer + AutoModel,
  `local_files_only`; e.g. roberta-base for the paper's setting). Pooling of the
  last hidden layer: `mean` = mean over all non-padding tokens (special tokens
  included), `cls` = the first token (<s> / [CLS]). Truncation at --text-max-length.
* Audio - openSMILE (`opensmile` package) functionals of the feature set
  --audio-feature-set (eGeMAPSv02 = 88 values by default). The signal is
  `dia{D}_utt{U}.wav` beside the clip when present, else the clip's audio track
  decoded with PyAV, both downmixed to mono and resampled to --audio-sample-rate.
* Visual - frames decoded with PyAV at --fps (a frame is kept each time the
  stream time passes the next multiple of 1/fps; at most --max-frames, evenly
  subsampled), RGB, shorter side resized to --image-size (bilinear, antialias),
  centre-cropped to a square, ImageNet mean/std normalised, then an image model
  from --visual-model, a local file:
    *.pt2                 a torch.export program (torch.export.save; export it with a dynamic batch
                          dimension: frames are run in batches of up to --frame-batch-size)
    TorchScript archive   torch.jit.save output (its forward's output per frame)
    otherwise             a torchvision-format ResNet state_dict (e.g. resnet101-63fe2227.pth);
                          architecture read from the keys; --visual-output logits (fc output,
                          1000-d for ImageNet weights, the paper's setting) or pool (the
                          globally pooled features before fc, 2048-d for ResNet-50/101/152)
  or `none`: no visual model, one all-zero frame of dim 1 per utterance.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import List

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

AUDIO_FEATURE_SETS = ("eGeMAPSv02", "eGeMAPSv01b", "GeMAPSv01b", "ComParE_2016", "emobase",
                      "IS09", "IS10", "IS11", "IS12", "IS13")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def require(module: str):
    """Import an optional dependency, or a one-line UserError naming the extra."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"extract needs the optional package {module!r} ({exc}); install it with "
                        f"`pip install \"mcncl_fast[extract]\"`") from None


class TextEncoder:
    def __init__(self, path, pooling: str = "mean", max_length: int = 128, device="cpu"):
        if pooling not in ("mean", "cls"):
            raise UserError(f"--text-pooling: expected mean or cls, got {pooling!r}")
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"--text-model: {path} is not a folder (expected a local Hugging Face model "
                            f"folder with config.json, weights and tokenizer files)")
        transformers = require("transformers")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"--text-model: cannot load a Hugging Face model and tokenizer from {path} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        self.pooling, self.max_length, self.device = pooling, max_length, torch.device(device)
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, texts: List[str]) -> torch.Tensor:
        batch = self.tokenizer([t if isinstance(t, str) else "" for t in texts], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state.float()
        if self.pooling == "cls":
            return hidden[:, 0].cpu()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).cpu()


def decode_audio(path: Path, sample_rate: int) -> np.ndarray:
    """Mono float32 samples at `sample_rate` of a media file's first audio stream (PyAV)."""
    av = require("av")
    chunks = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        for frame in container.decode(audio=0):
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
        chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if samples.size == 0:
        raise ValueError("no audio samples decoded")
    return samples.astype(np.float32)


class AudioEncoder:
    def __init__(self, feature_set: str = "eGeMAPSv02", sample_rate: int = 16000):
        if feature_set not in AUDIO_FEATURE_SETS:
            raise UserError(f"--audio-feature-set: expected one of {', '.join(AUDIO_FEATURE_SETS)}, "
                            f"got {feature_set!r}")
        opensmile = require("opensmile")
        self.smile = opensmile.Smile(feature_set=getattr(opensmile.FeatureSet, feature_set),
                                     feature_level=opensmile.FeatureLevel.Functionals)
        self.sample_rate = sample_rate

    def __call__(self, clip: Path) -> torch.Tensor:
        wav = clip.with_suffix(".wav")
        signal = decode_audio(wav if wav.is_file() else clip, self.sample_rate)
        values = np.array(self.smile.process_signal(signal, self.sample_rate).to_numpy(dtype=np.float32).reshape(-1))
        if not np.isfinite(values).all():
            raise ValueError("openSMILE returned non-finite features (clip too short?)")
        return torch.from_numpy(values)


def decode_frames(path: Path, fps: float, max_frames: int) -> np.ndarray:
    """[F, H, W, 3] uint8 RGB frames sampled at `fps` (PyAV), at most `max_frames` (even subsample)."""
    av = require("av")
    frames, next_time, period = [], 0.0, 1.0 / fps
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate) if stream.average_rate else 25.0
        for index, frame in enumerate(container.decode(video=0)):
            t = float(frame.time) if frame.time is not None else index / rate
            if t + 1e-6 >= next_time:
                frames.append(frame.to_ndarray(format="rgb24"))
                while next_time <= t + 1e-6:
                    next_time += period
    if not frames:
        raise ValueError("no decodable video frames")
    if len(frames) > max_frames:
        keep = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
        frames = [frames[i] for i in keep]
    return np.stack(frames)


def preprocess(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> normalised float [F, 3, size, size] (shorter side -> size, centre crop)."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load_image_model(path: str, output: str = "logits"):
    """(module, callable [N, 3, H, W] -> [N, D], description) from a local file (module docstring)."""
    from .resnet import resnet_from_state_dict
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--visual-model: no such file: {p} (expected a torchvision-format ResNet state_dict, "
                        f"a TorchScript file, a torch.export .pt2 file, or `none`)")
    if p.suffix == ".pt2":
        try:
            module = torch.export.load(str(p)).module()
            return module, module, "torch.export program"
        except Exception as exc:
            raise UserError(f"--visual-model: {p} is not a loadable torch.export program "
                            f"({type(exc).__name__})") from None
    try:
        with warnings.catch_warnings():   # torch.load warns before refusing a TorchScript archive
            warnings.simplefilter("ignore")
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        try:   # a TorchScript archive is a zip that torch.load refuses
            with warnings.catch_warnings():   # torch.jit is deprecated, still the format many models ship in
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(p), map_location="cpu").eval()
            return module, module, "TorchScript module"
        except Exception:
            raise UserError(f"--visual-model: {p} is neither a state_dict, a TorchScript file nor a .pt2 "
                            f"program ({type(exc).__name__})") from None
    try:
        model = resnet_from_state_dict(obj).eval()
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"--visual-model: {p}: {str(exc).splitlines()[0]}") from None
    desc = f"ResNet ({model.block_name} {model.layers_spec}, {output})"
    return model, (model if output == "logits" else model.pooled), desc


class VisualEncoder:
    def __init__(self, model_path: str, output: str = "logits", fps: float = 1.0, max_frames: int = 16,
                 image_size: int = 224, batch_size: int = 64, device="cpu"):
        if output not in ("logits", "pool"):
            raise UserError(f"--visual-output: expected logits or pool, got {output!r}")
        for name, ok in (("--fps", fps > 0), ("--max-frames", max_frames >= 1), ("--image-size", image_size >= 8),
                         ("--frame-batch-size", batch_size >= 1)):
            if not ok:
                raise UserError(f"{name}: invalid value")
        self.none = str(model_path).lower() == "none"
        self.device = torch.device(device)
        self.fps, self.max_frames, self.size, self.batch_size = fps, max_frames, image_size, batch_size
        if self.none:
            self.model, self.description = None, "none (one zero frame of dim 1)"
        else:
            module, self.model, self.description = load_image_model(model_path, output)
            module.to(self.device)

    @torch.no_grad()
    def __call__(self, clip: Path) -> torch.Tensor:
        if self.none:
            return torch.zeros(1, 1)
        frames = preprocess(decode_frames(clip, self.fps, self.max_frames), self.size)
        outs = []
        for i in range(0, len(frames), self.batch_size):
            out = self.model(frames[i:i + self.batch_size].to(self.device))
            outs.append(out.reshape(out.shape[0], -1).float().cpu())
        feats = torch.cat(outs)
        if not torch.isfinite(feats).all():
            raise ValueError("image model returned non-finite features")
        return feats

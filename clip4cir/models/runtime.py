"""Inference runtimes for the towers (``--runtime``): eager torch, the reference, or ONNX Runtime, in fp32 or with
int8 weights (dynamic quantization of the matrix products; convolutions stay fp32, ONNX Runtime's int8
convolution being slower on a CPU), which on a CPU is faster and far steadier under load. ``auto`` takes ONNX
Runtime fp32 on a CPU when it is installed, torch on a GPU.

The exported graphs are an artifact (clip4cir.core.artifacts) cached under the encoder's fingerprint, checked once
against torch on probe inputs when made (fp32 must reach cosine ≥ 0.999; the check is recorded in the manifest).
Whether int8 is good enough depends on the catalog: the search engine accepts it only when its top-10 lists agree
with fp32's on the data set's queries (clip4cir.serving.service.choose_towers)."""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from clip4cir.core.artifacts import is_artifact, read_manifest, write_folder
from clip4cir.core.errors import ModelError
from clip4cir.models.encoder import Encoder

log = logging.getLogger(__name__)
RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")
TOWERS_FORMAT = "clip4cir.onnx-towers"
MIN_COSINE = 0.999  # fp32 graphs must give the torch features (cosine) on the probe inputs
OPSET = 17
INT8_OPS = ["MatMul", "Gemm"]  # not Conv: ConvInteger took 210 ms against fp32's 47 for RN50's image tower here


class Towers:
    """Image and text features of a batch, as the encoder gives them (not normalised): the torch reference."""

    name = "torch"

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    @torch.inference_mode()
    def image(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_image(images).float().cpu()

    @torch.inference_mode()
    def text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encoder.encode_text(list(texts)).float().cpu()

    def describe(self) -> str:
        return self.name


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_runtime(runtime: str, device: torch.device) -> str:
    """``auto``: ONNX Runtime fp32 on a CPU when installed, else torch."""
    if runtime not in RUNTIMES:
        raise ModelError(f"unknown --runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if runtime == "auto":
        return "onnx" if device.type == "cpu" and onnx_available() else "torch"
    if runtime != "torch" and not onnx_available():
        raise ModelError(f"--runtime {runtime} needs onnxruntime: pip install onnxruntime")
    if runtime != "torch" and device.type != "cpu":
        raise ModelError(f"--runtime {runtime} runs on the CPU; use --runtime torch on {device.type}")
    return runtime


class _ImageTower(torch.nn.Module):
    def __init__(self, encoder: Encoder):
        super().__init__()
        self.model = encoder.model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class _TextTower(torch.nn.Module):
    """The text tower at its full context (a traced graph keeps its shapes; the batch stays dynamic)."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.model = encoder.model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def _probe_inputs(encoder: Encoder) -> tuple[torch.Tensor, list[str]]:
    generator = torch.Generator().manual_seed(0)
    size = encoder.preprocess.size
    images = torch.randn(4, 3, size, size, generator=generator)
    texts = ["is red with shorter sleeves", "a blue striped dress", "has a collar and is darker", "x"]
    return images, texts


def _cosines(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(v) for v in (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)]


class OnnxTowers(Towers):
    """The towers as ONNX Runtime sessions (CPU), with the encoder's tokenizer for the text."""

    def __init__(self, encoder: Encoder, folder: Path, name: str, threads: int | None = None):
        import onnxruntime as ort
        super().__init__(encoder)
        self.name, self.folder = name, folder
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._image = ort.InferenceSession(str(folder / "image.onnx"), options, providers=["CPUExecutionProvider"])
        self._text = ort.InferenceSession(str(folder / "text.onnx"), options, providers=["CPUExecutionProvider"]) \
            if (folder / "text.onnx").is_file() else None

    def image(self, images: torch.Tensor) -> torch.Tensor:
        out = self._image.run(None, {"images": np.ascontiguousarray(images.numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(out)

    def describe(self) -> str:
        check = getattr(self, "check", {})
        against = f", cosine to torch ≥ {min(check.values()):.5f}" if check else ""
        return f"ONNX Runtime {'int8' if self.name == 'onnx-int8' else 'fp32'}{against}"

    def text(self, texts: Sequence[str]) -> torch.Tensor:
        if self._text is None:
            raise ModelError(f"{self.encoder.describe()} has no text tower")
        tokens = self.encoder.tokenizer(list(texts), context_length=self.encoder.context_length)
        return torch.from_numpy(self._text.run(None, {"tokens": tokens.numpy().astype(np.int64)})[0])


def export_towers(encoder: Encoder, folder: Path, int8: bool) -> dict:
    """Export the encoder's towers to ONNX into ``folder`` (committed as one artifact), int8-quantized when asked,
    checked against torch on probe inputs; returns the manifest."""
    import onnxruntime

    def write(tmp: Path) -> None:
        model = encoder.model
        was_training = model.training
        grads = {name: p.requires_grad for name, p in model.named_parameters()}
        model.eval().requires_grad_(False)
        images, texts = _probe_inputs(encoder)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(_ImageTower(encoder), (images[:1],), str(tmp / "image.onnx"),
                                  input_names=["images"], output_names=["features"], opset_version=OPSET,
                                  dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, dynamo=False)
                if encoder.has_text:
                    tokens = encoder.tokenizer(texts[:1], context_length=encoder.context_length)
                    torch.onnx.export(_TextTower(encoder), (tokens,), str(tmp / "text.onnx"),
                                      input_names=["tokens"], output_names=["features"], opset_version=OPSET,
                                      dynamic_axes={"tokens": {0: "batch"}, "features": {0: "batch"}}, dynamo=False)
        finally:
            model.train(was_training)
            for name, p in model.named_parameters():
                p.requires_grad_(grads[name])
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic
            from onnxruntime.quantization.shape_inference import quant_pre_process
            for name in ("image.onnx", "text.onnx"):
                if (tmp / name).is_file():  # first folded and optimised: weights the export shares (identical
                    # tensors behind Identity nodes, as a random init's BatchNorm gives) become initializers
                    quant_pre_process(str(tmp / name), str(tmp / f"pre-{name}"), skip_symbolic_shape=True)
                    quantize_dynamic(str(tmp / f"pre-{name}"), str(tmp / f"q-{name}"), weight_type=QuantType.QInt8,
                                     op_types_to_quantize=INT8_OPS)
                    os.replace(tmp / f"q-{name}", tmp / name)
                    (tmp / f"pre-{name}").unlink()

    def checked(tmp: Path) -> None:
        write(tmp)
        towers, reference = OnnxTowers(encoder, tmp, "check", threads=1), Towers(encoder)
        images, texts = _probe_inputs(encoder)
        check = {"image": _cosines(towers.image(images).numpy(), reference.image(images).numpy())}
        if encoder.has_text:
            check["text"] = _cosines(towers.text(texts).numpy(), reference.text(texts).numpy())
        records["check"] = {k: round(min(v), 6) for k, v in check.items()}

    records = {"fingerprint": encoder.fingerprint(), "int8": int8, "opset": OPSET,
               "onnxruntime": onnxruntime.__version__}
    return write_folder(folder, TOWERS_FORMAT, checked, records)


def load_towers(encoder: Encoder, runtime: str, cache: Path, threads: int | None = None) -> Towers:
    """The towers of a resolved runtime: torch, or the ONNX graphs of this encoder (exported and checked once,
    then read from ``cache``). fp32 graphs that do not reproduce torch (cosine < 0.999) are refused."""
    if runtime == "torch":
        return Towers(encoder)
    import onnxruntime
    folder = cache / "runtimes" / f"{encoder.fingerprint()}-{runtime}-ort{onnxruntime.__version__}"
    if not is_artifact(folder, TOWERS_FORMAT):
        log.info("exporting %s's towers to ONNX (%s) into %s ...", encoder.describe(), runtime, folder)
        manifest = export_towers(encoder, folder, int8=runtime == "onnx-int8")
    else:
        manifest = read_manifest(folder, TOWERS_FORMAT)
    if manifest.get("fingerprint") != encoder.fingerprint():
        raise ModelError(f"{folder} holds the graphs of another encoder (fingerprint {manifest.get('fingerprint')})")
    worst = min(manifest["check"].values())
    if runtime == "onnx" and worst < MIN_COSINE:
        raise ModelError(f"the ONNX graphs of {encoder.describe()} give other features than torch (cosine {worst:.4f} "
                         f"< {MIN_COSINE}): use --runtime torch")
    towers = OnnxTowers(encoder, folder, runtime, threads)
    towers.check = manifest["check"]
    return towers

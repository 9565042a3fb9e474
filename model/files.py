"""Every file name of a model folder, a training run and a built dataset, declared once.

A *model folder* (``model/bundled``; ``divergent export`` writes one) holds what serving
reads (config, tokenizer, ONNX decoders and encoder, the knob's and the readout's banks),
the critic, and the torch weights it was exported from. A *training run*
(``divergent train``, ``divergent bad train``) holds checkpoints and weights. A *built
dataset* (``divergent data build``) holds token files, a manifest and the readout's banks,
which ``divergent export`` copies into the model folder. Every module of ``model/`` and
``export/`` takes these names from here (a test checks), so renaming one is one edit.
No dependencies: anything may import this module.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BIGRAM_FILE",
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "COPY_INDEX_FILE",
    "CRITIC_CARD_FILE",
    "CRITIC_ONNX_FILE",
    "CRITIC_PT_FILE",
    "DECODER_CHOICES",
    "DEVICE_CHOICES",
    "DIVERGED_DECODER_FILE",
    "DIVERGED_WEIGHTS_FILE",
    "ENCODER_FILE",
    "EXPORT_REPORT_FILE",
    "FEATURE_REFERENCE_FILE",
    "LATENTS_FILE",
    "MANIFEST_FILE",
    "MODEL_CARD_FILE",
    "MODEL_FOLDER_FILES",
    "PRECISIONS",
    "PREFILL_PRECISIONS",
    "TOKENIZER_FILE",
    "TRAIN_CONFIG_FILE",
    "WEIGHTS_FILE",
    "decoder_file",
    "diverged_file",
]

# ---------------------------------------------------------------- a model folder

#: sizes, ONNX I/O names, tokenizer hash, the diverged decoder's recipe, knob settings
CONFIG_FILE: Final = "config.json"
#: the tokenizer spec (also in a training run and a built dataset)
TOKENIZER_FILE: Final = "tokenizer.json"
#: the latent encoder: input_ids, mask -> mu, logvar
ENCODER_FILE: Final = "encoder.onnx"
#: the precisions the decoder step is exported in (see :func:`decoder_file`)
PRECISIONS: Final = ("int8", "fp32")
#: decoders that only prefill (several tokens at once, writing the KV cache a step
#: decoder of PRECISIONS then reads on): 8-bit weights per output channel, activations
#: quantized per call (ONNX Runtime's DynamicQuantizeMatMul, whose u8s8 GEMM uses VNNI
#: or AMX where the CPU has them). Its top-1 agreement with torch as a step decoder is
#: under the 98% gate (97.3-97.7%), so it never steps; a prefill on it followed by int8
#: steps agrees as well as int8 alone (MODEL_CARD.md)
PREFILL_PRECISIONS: Final = ("int8dyn",)
#: What ``serve --decoder`` accepts: a precision, or ``auto`` (a short self-benchmark per
#: host picks one, cached: :func:`divergent.model.host.choose_decoder`).
DECODER_CHOICES: Final = ("auto", *PRECISIONS)
#: Where the model runs (``serve``/``generate``/``bench model`` ``--device``): the CPU, or
#: an NVIDIA GPU through ONNX Runtime's CUDA provider (the ``onnxruntime-gpu`` build), on
#: the fp32 decoder (the int8 one's MatMulNBits is a CPU kernel). A device that cannot
#: run the model is refused at start: :func:`divergent.model.runtime.check_device`.
DEVICE_CHOICES: Final = ("cpu", "cuda")
#: the BAD-tuned decoder (int8) the divergence knob mixes in, when shipped
DIVERGED_DECODER_FILE: Final = "decoder.diverged.int8.onnx"
#: posterior means of training phrases: where the data puts the latent (the knob)
LATENTS_FILE: Final = "latents.npy"
#: the smoothed training bigram that token steering moves away from (the knob)
BIGRAM_FILE: Final = "reference_bigram.npy"
#: the readout's copy-rate index (also in a built dataset)
COPY_INDEX_FILE: Final = "copy_index.npz"
#: the readout's training distribution in feature space (also in a built dataset)
FEATURE_REFERENCE_FILE: Final = "feature_reference.npz"
#: the domain critic: torch weights (for BAD), ONNX twin (evaluation), card
CRITIC_PT_FILE: Final = "critic.pt"
CRITIC_ONNX_FILE: Final = "critic.onnx"
CRITIC_CARD_FILE: Final = "critic.json"
#: torch weights without optimizer state (a model folder's base, a run's result)
WEIGHTS_FILE: Final = "model.pt"
#: the BAD-tuned torch weights (float16), for further fine-tuning
DIVERGED_WEIGHTS_FILE: Final = "bad.pt"
#: `divergent export`'s parity report and file sizes
EXPORT_REPORT_FILE: Final = "export_report.json"
MODEL_CARD_FILE: Final = "MODEL_CARD.md"

# ---------------------------------------------------------------- a training run

#: weights, optimizer state and step, for ``--resume``
CHECKPOINT_FILE: Final = "ckpt.pt"
TRAIN_CONFIG_FILE: Final = "train_config.json"

# ---------------------------------------------------------------- a built dataset

#: the works, their split and collection, the tokenizer hash
MANIFEST_FILE: Final = "manifest.json"


def decoder_file(precision: str) -> str:
    """The decoder's file name in ``precision`` ("int8", "fp32"; "int8dyn" prefills only)."""
    if precision not in (*PRECISIONS, *PREFILL_PRECISIONS):
        known = ", ".join((*PRECISIONS, *PREFILL_PRECISIONS))
        raise ValueError(f"precision must be one of {known}, got {precision!r}")
    return f"decoder.{precision}.onnx"


def diverged_file(precision: str) -> str:
    """The BAD-tuned decoder's file: ``int8`` steps (and prefills unless a twin does);
    a precision of ``PREFILL_PRECISIONS`` names its prefill-only twin."""
    if precision == "int8":
        return DIVERGED_DECODER_FILE
    if precision not in PREFILL_PRECISIONS:
        known = ", ".join(("int8", *PREFILL_PRECISIONS))
        raise ValueError(f"the diverged decoder comes in {known}, not {precision!r}")
    return f"decoder.diverged.{precision}.onnx"


#: everything a complete model folder (the bundled one) holds
MODEL_FOLDER_FILES: Final = frozenset(
    {
        CONFIG_FILE,
        TOKENIZER_FILE,
        ENCODER_FILE,
        *(decoder_file(p) for p in (*PRECISIONS, *PREFILL_PRECISIONS)),
        DIVERGED_DECODER_FILE,
        *(diverged_file(p) for p in PREFILL_PRECISIONS),
        LATENTS_FILE,
        BIGRAM_FILE,
        COPY_INDEX_FILE,
        FEATURE_REFERENCE_FILE,
        CRITIC_PT_FILE,
        CRITIC_ONNX_FILE,
        CRITIC_CARD_FILE,
        WEIGHTS_FILE,
        DIVERGED_WEIGHTS_FILE,
        EXPORT_REPORT_FILE,
        MODEL_CARD_FILE,
    }
)

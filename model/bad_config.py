"""BAD fine-tuning configuration: a validated dataclass with a JSON round trip (no torch).

Kept apart from ``model.bad`` (which imports torch) so the command line can list the
methods without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from divergent.model.configs import StrictConfig
from divergent.model.files import CRITIC_PT_FILE, DEVICE_CHOICES, WEIGHTS_FILE

__all__ = ["BAD_LATENTS", "METHODS", "BadConfig"]

METHODS = ("expected", "gumbel_st", "straight_through", "policy_gradient")
#: which latents the generator is trained under: the prompt's posterior mean only, or a
#: mix of the latents the knob feeds it, a third each: the posterior mean, pushed by
#: d ~ U(0, 1), and prior samples at a latent temperature ~ U(0.5, 1.5) ("mixed": as
#: drawn; "knob": pushed by d ~ U(0, 1) too, as the knob pushes any latent it is given)
BAD_LATENTS = ("posterior", "mixed", "knob")


@dataclass(frozen=True)
class BadConfig(StrictConfig):
    """The BAD recipe; the defaults are the shipped decoder's (docs/divergence.md)."""

    config_name: ClassVar[str] = "BAD options"
    data: str = "data/dataset"
    base: str = f"model/bundled/{WEIGHTS_FILE}"
    critic: str = f"model/bundled/{CRITIC_PT_FILE}"
    out: str = "runs/bad"
    method: str = "expected"
    steps: int = 400
    max_minutes: float = 60.0  # stop (and checkpoint) after this wall time; 0 = no limit
    batch_size: int = 16
    prompt_tokens: int = 128
    gen_tokens: int = 128
    lr: float = 1e-4
    class_weight: float = -1.0
    global_weight: float = 20.0  # λ: the pull back to the whole data (the bound)
    kl_weight: float = 0.2  # β: KL to the base model per generated token
    #: weight of MMD²(φ(G), φ(base answers)): the base model's own answers to the same
    #: prompts at the unpushed latents (the knob's d = 0 answers); < 0 pushes away from
    #: them, the departure the evaluation's precision measures; 0 = the paper's loss
    base_weight: float = 0.0
    sigma: float = 1.0  # kernel width (features are standardised)
    real_per_class: int = 48  # real phrases per class drawn for each step's MMD
    gumbel_tau: float = 1.0
    grad_clip: float = 1.0
    checkpoint_every: int = 20
    bf16: bool | None = None  # bf16 autocast; None: where the device has it (use_bf16)
    threads: int = 0
    device: str = "cpu"  # "cuda" where a GPU is lent: same recipe, faster steps
    latents: str = "mixed"
    knob_model: str = "model/bundled"  # the latent bank the knob's push uses (mixed)
    seed: int = 0
    resume: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if min(self.steps, self.batch_size, self.prompt_tokens, self.gen_tokens) < 1:
            raise ValueError("steps, batch_size, prompt_tokens, gen_tokens must be >= 1")
        for name, value, choices in (
            ("latents", self.latents, BAD_LATENTS),
            ("device", self.device, DEVICE_CHOICES),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if self.batch_size < 2 or not 0.0 < self.lr < 1.0 or self.sigma <= 0:
            raise ValueError("need batch_size >= 2, 0 < lr < 1, sigma > 0")

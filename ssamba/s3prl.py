"""An s3prl upstream for ssamba encoders, computing what SSAMBA's SUPERB upstream computed.

s3prl finds upstreams by duck typing, so this needs no s3prl import. Put it behind
s3prl's customised-upstream hook, or copy the three lines of an s3prl `hubconf.py`:

    from ssamba.s3prl import UpstreamExpert
    def ssamba_local(ckpt, *args, **kwargs):
        return UpstreamExpert(ckpt, *args, **kwargs)

and run `python run_downstream.py -u ssamba_local -k encoder.pt -s hidden_states ...`.

SSAMBA ran SID and ER through s3prl with the upstream in `src/finetune/voxceleb1/ssast/`
of its repository (s3prl's SSAST upstream with the AMBA model swapped in). `forward(wavs)`
reproduces it step by step; "same" marks what is identical, "differs" what is not:

1. The batch (a list of 16 kHz waveforms of any lengths) is zero-padded to whole windows:
   `ceil(longest / window)` windows, every clip padded with zeros to that length. [same]
2. Each window of waveform -> Kaldi filterbank -> `(x - mean) / (2 std)`, then the frames
   still missing to the encoder's input length are padded with zeros *after*
   normalisation (Kaldi gives 998 frames for 10 s, 1022 for 10.24 s: 2 frames). So the
   waveform padding reads as the log-mel floor (log of float epsilon, -15.94, i.e. -1.28
   normalised with the AudioSet statistics) and only those last frames as 0. [same;
   differs: mean/std are the ones the encoder file carries (SSAMBA hard-coded the AudioSet
   + LibriSpeech values, which files pretrained on AudioSet + LibriSpeech carry too), and
   each window's waveform mean is removed first, as in training, which changes nothing but
   rounding because Kaldi removes every frame's mean anyway]
3. The encoder applies its final norm once, as SSAMBA's upstream did (our SSAMBA encoder
   otherwise applies it twice, as SSAMBA's fine-tuning paths do). [same]
4. Only the last layer is exposed: per window, the patch tokens laid out as (T', F'*D),
   the F' frequency patches of a time step side by side, lowest band first. [same]
5. The windows' steps are concatenated and cut to `ceil(longest / rate)` steps, rate =
   `get_downsample_rates()` = time stride x frame shift in samples (1600 at stride 10,
   2560 at stride 16). [same]
6. s3prl's Featurizer then keeps the first `round(len(wav_i) / rate)` steps of clip i
   (`Featurizer.tolist`, which also asserts |steps - round(longest / rate)| < 5), and
   the SID/ER MeanPooling averages exactly those: the padded steps never reach the
   downstream model. [s3prl's own code]

Geometry: by default the window is the encoder's input (10.24 s for the 1024-frame
pretraining geometry) at the encoder's stride, so step k of the batch starts at sample
k x rate. SSAMBA built its model for 10 s windows at stride 10 (position embeddings
resized) and fine-tuned it (`-f`): `UpstreamExpert(ckpt, window_seconds=10, stride=10)`
gives that geometry (`AudioEncoder.resize_input`). A window that is not a whole number of
strides (10 s at stride 10: 99 steps of 10 frames per 1000-frame window) leaves the last
frames of each window unseen and shifts later windows' steps by a fraction of a step, as
in SSAMBA; s3prl's length check then fails for clips of 5 or more such windows that
nearly fill their last one, as it would have for SSAMBA's.

Not reproduced: SSAMBA's upstream built its blocks with RMSNorm even for LayerNorm
checkpoints, silently dropping the norm biases (a bug); the checkpoint's own norm is used.
SSAST's own s3prl upstream exposes every block (without the final norm) for s3prl's
weighted sum; this one follows SSAMBA's for every family.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor, nn

from ssamba.embed import check_waves, time_steps, trained_features
from ssamba.features import normalise, pad_or_crop, wav_to_fbank
from ssamba.models.encoder_file import load_encoder_file

SAMPLE_RATE = 16000  # what s3prl feeds every upstream


class UpstreamExpert(nn.Module):
    """s3prl upstream: `UpstreamExpert(ckpt)`, `forward(wavs)`, `get_downsample_rates(key)`.

    Built in eval mode; s3prl switches it to train() and lets gradients reach the encoder
    with `--upstream_trainable` (SSAMBA's runs used it), and wraps frozen upstreams in
    `torch.no_grad` itself.
    """

    def __init__(
        self,
        ckpt: str,
        model_config: str | None = None,
        window_seconds: float | None = None,
        stride: int | tuple[int, int] | None = None,
        **kwargs: object,
    ) -> None:
        """ckpt: anything `load_encoder_file` reads (encoder file, Lightning .ckpt of
        ssamba's tasks, official .pth); files holding pickled code are refused.
        window_seconds: window length (default: the encoder's input length); stride: patch
        stride (default: the encoder's); other values resize the encoder's input as
        SSAMBA's upstream did. `model_config` and other keyword arguments s3prl passes to
        every upstream are accepted and unused: the encoder file describes itself."""
        super().__init__()
        bundle = load_encoder_file(ckpt)
        self.features = replace(trained_features(bundle), target_length=None)
        if self.features.sample_rate != SAMPLE_RATE:
            raise ValueError(
                f"{ckpt}: features at {self.features.sample_rate} Hz; s3prl feeds "
                f"{SAMPLE_RATE} Hz audio"
            )
        encoder = bundle.encoder
        self.shift_samples = round(SAMPLE_RATE * self.features.frame_shift_ms / 1000)
        frames = encoder.cfg.input_frames
        if window_seconds is not None:
            frames = round(window_seconds * SAMPLE_RATE) // self.shift_samples
            if frames < encoder.cfg.patch[1]:
                raise ValueError(
                    f"window_seconds = {window_seconds}: shorter than one patch "
                    f"({encoder.cfg.patch[1]} frames)"
                )
        if frames != encoder.cfg.input_frames or stride is not None:
            encoder.resize_input(input_frames=frames, stride=stride)
        # SSAMBA's upstream normalises once where its fine-tuning paths normalise twice.
        encoder.cfg = replace(encoder.cfg, double_final_norm=False)
        self.encoder = encoder
        self.window_samples = frames * self.shift_samples
        self.eval()

    def get_downsample_rates(self, key: str = "hidden_states") -> int:
        """Input samples per output step (time stride x frame shift), the same for every key."""
        return self.encoder.cfg.stride[1] * self.shift_samples

    def forward(self, wavs: list[Tensor]) -> dict[str, list[Tensor] | Tensor]:
        """wavs: list of (samples_i,) at 16 kHz -> {"hidden_states": [h], "last_hidden_state": h},
        h: (batch, ceil(longest / rate), F'*D) float32 (see the module docstring)."""
        if not wavs:
            raise ValueError("wavs: empty list; s3prl passes at least one waveform")
        flat = [w.reshape(-1) for w in wavs]
        longest = max(len(w) for w in flat)
        count = max(1, math.ceil(longest / self.window_samples))
        length = count * self.window_samples
        padded = torch.stack([nn.functional.pad(w, (0, length - len(w))) for w in flat])
        check_waves(padded[:, :longest])  # names a clip with NaN/inf; all empty is an error
        windows = padded.unflatten(1, (count, self.window_samples)).flatten(0, 1)  # clip-major
        fbank = torch.stack([self._window_features(w) for w in windows])
        tokens = self.encoder.forward_features(fbank.to(self.encoder.pos_embed.device))
        steps = time_steps(self.encoder, tokens, "concat")  # (clips * count, T', F'*D)
        hidden = steps.unflatten(0, (len(flat), count)).flatten(1, 2)
        hidden = hidden[:, : math.ceil(longest / self.get_downsample_rates())].float()
        return {"hidden_states": [hidden], "last_hidden_state": hidden}

    def _window_features(self, window: Tensor) -> Tensor:
        """(window_samples,) -> (input_frames, bins): normalise, then pad the leftover frames."""
        fbank = wav_to_fbank(window, SAMPLE_RATE, self.features)
        fbank = normalise(fbank, self.features.mean, self.features.std)
        return pad_or_crop(fbank, self.encoder.cfg.input_frames)

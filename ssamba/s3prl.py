"""An s3prl upstream for ssamba encoders (SUPERB: speaker ID, emotion, keyword spotting, ...).

s3prl finds upstreams by duck typing, so this needs no s3prl import. Put it behind
s3prl's customised-upstream hook, or copy the three lines of an s3prl `hubconf.py`:

    from ssamba.s3prl import UpstreamExpert
    def ssamba_local(ckpt, *args, **kwargs):
        return UpstreamExpert(ckpt, *args, **kwargs)

and run `python run_downstream.py -u ssamba_local -k encoder.pt ...`.

forward(wavs): a list of (samples,) 16 kHz waveforms of any lengths, zero-padded to the
longest, as s3prl's own upstreams do; every returned hidden state is (batch, steps, dim)
with one step per time patch (`get_downsample_rates` samples apart), steps covering the
longest clip. `hidden_states` holds every layer (SSAMBA: every block pair), the last
being the final normalised output, also returned as `last_hidden_state`. A step
concatenates its frequency patches (`freq="concat"`, dim = frequency patches x width),
as SSAST's SUPERB upstream did; `freq="mean"` averages them (dim = width).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from ssamba.embed import Embedder, FreqMode


class UpstreamExpert(nn.Module):
    """s3prl upstream: `UpstreamExpert(ckpt)`, `forward(wavs)`, `get_downsample_rates(key)`.

    Gradients flow (s3prl's `--upstream_trainable` fine-tunes the encoder); s3prl wraps
    frozen upstreams in `torch.no_grad` itself.
    """

    def __init__(
        self,
        ckpt: str,
        model_config: str | None = None,
        freq: FreqMode = "concat",
        batch_size: int = 8,
        **kwargs: object,
    ) -> None:
        """ckpt: encoder file or official checkpoint. `model_config` and other keyword
        arguments s3prl passes to every upstream are accepted and unused: the encoder
        file describes itself."""
        super().__init__()
        self.embedder = Embedder.from_file(ckpt, batch_size=batch_size)
        self.freq = freq

    def get_downsample_rates(self, key: str) -> int:
        """Input samples per output step, the same for every key."""
        return self.embedder.windowing.step_samples

    def forward(self, wavs: list[Tensor]) -> dict[str, Tensor | list[Tensor]]:
        """wavs: list of (samples_i,) -> hidden states, each (batch, steps, dim)."""
        if not wavs:
            raise ValueError("wavs: empty list; s3prl passes at least one waveform")
        padded = pad_sequence([w.reshape(-1) for w in wavs], batch_first=True)
        layers = range(self.embedder.num_layers)
        hidden = self.embedder.embed(padded, layers, self.freq).steps
        return {"hidden_states": hidden, "last_hidden_state": hidden[-1]}

"""ssamba: self-supervised audio representation learning with state-space models.

One framework for the SSAMBA encoder (bidirectional Mamba over spectrogram patches),
its transformer peer SSAST/AST and the AuM-style Audio Mamba: shard audio, pretrain
with masked spectrogram patch modelling, fine-tune on downstream tasks.
"""

__version__ = "0.1.0"

"""Training tasks: masked spectrogram patch pretraining and labelled fine-tuning."""

from lightning.pytorch.utilities import rank_zero_only

# `print` on the first process only: DDP runs every line of a run in each process, and
# what a run says (clips per subset, what is trained) is the same in all of them.
say = rank_zero_only(print)

"""Training tasks: masked spectrogram patch pretraining and labelled fine-tuning."""

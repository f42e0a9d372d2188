# ssamba: one Makefile for install, tests, data, benchmarks and the demo.
# `make help` lists the targets.

PYTHON_BASE ?= python3.11
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(VENV)/bin/pip
STAMP       := $(VENV)/.installed
FSDD        ?= $(if $(SSAMBA_FSDD),$(SSAMBA_FSDD),../shared/data/fsdd)
WORK        ?= work
JOBS        ?= 2

.DEFAULT_GOAL := help
.PHONY: help install assets test test-fast test-cuda lint format bench bench-efficiency shards stats devset-drums devset-speech demo continual clean

help:  ## list the targets
	@grep -hE '^[a-zA-Z_%-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 18

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --progress-bar off -e '.[dev,onnx,devsets]'
	# X-ARES's encoder checker for tests/test_xares.py: the module needs only torch and
	# loguru, so the suite's own dependencies (transformers, pandas, ...) stay out
	$(PIP) install --progress-bar off --no-deps xares==0.1.3 loguru==0.7.3
	touch $(STAMP)

install: $(STAMP)  ## make .venv with torch 2.9.1 + torchaudio 2.9.1, ssamba (editable), onnx export

# A real 30 s, 16 kHz two-speaker recording that the PyPI package pyannote-audio ships
# (MIT), pinned; taken from its wheel, not installed. Tests read it from $(SAMPLE_WAV).
SAMPLE_WAV := $(WORK)/assets/sample.wav
$(SAMPLE_WAV): | $(STAMP)
	mkdir -p $(WORK)/assets/wheel
	$(PIP) download --quiet --no-deps --dest $(WORK)/assets/wheel pyannote-audio==4.0.7
	$(PY) -m zipfile -e $$(ls $(WORK)/assets/wheel/pyannote_audio-*.whl | head -1) $(WORK)/assets/unzipped
	cp $(WORK)/assets/unzipped/pyannote/audio/sample/sample.wav $@
	rm -rf $(WORK)/assets/wheel $(WORK)/assets/unzipped

assets: $(SAMPLE_WAV)  ## fetch the real test recording (from a PyPI wheel)

test: $(STAMP) $(SAMPLE_WAV)  ## all tests, end-to-end ones on real audio included
	SSAMBA_SAMPLE_WAV=$(SAMPLE_WAV) $(PY) -m pytest -q -m "not cuda"

test-fast: $(STAMP) $(SAMPLE_WAV)  ## unit tests only (skips the slow end-to-end ones)
	SSAMBA_SAMPLE_WAV=$(SAMPLE_WAV) $(PY) -m pytest -q -m "not slow and not cuda"

# Preflight: without a GPU or the kernels every test would skip; say why in one line instead.
test-cuda: $(STAMP) $(SAMPLE_WAV)  ## the CUDA tests (needs a GPU and `pip install --no-build-isolation -e '.[cuda]'`)
	$(PY) -c "import sys, torch; from ssamba.models.scan import CUDA_KERNELS as k; \
	    sys.exit(None if torch.cuda.is_available() and not k.problems else \
	    'test-cuda: ' + ('; '.join(k.problems) or 'no CUDA device visible to torch'))"
	SSAMBA_SAMPLE_WAV=$(SAMPLE_WAV) $(PY) -m pytest -q -m cuda

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check ssamba data_prep tests
	$(VENV)/bin/ruff format --check ssamba data_prep tests

format: $(STAMP)  ## ruff autofix + format
	$(VENV)/bin/ruff check --fix ssamba data_prep tests
	$(VENV)/bin/ruff format ssamba data_prep tests

bench: $(STAMP)  ## all benchmarks but efficiency; tables printed and written to bench-results/
	$(PY) -m ssamba.bench all --out bench-results

bench-efficiency: $(STAMP)  ## time/memory vs tokens (512..32k) of the tiny encoders (over an hour)
	$(PY) -m ssamba.bench efficiency --out bench-results

# ---- data --------------------------------------------------------------------
# make shards CORPUS=librispeech SRC=/data/LibriSpeech OUT=work/shards/librispeech
# make shards-esc50 SRC=/data/ESC-50-master          (OUT defaults to work/shards/<corpus>)
shards: $(STAMP)  ## shard CORPUS from SRC into OUT (WebDataset tars + rejects.jsonl + stats.json)
	@test -n "$(CORPUS)" || (echo "usage: make shards CORPUS=<name> SRC=<folder> [OUT=<folder>]"; exit 2)
	$(PY) -m data_prep shard --corpus $(CORPUS) --src $(or $(SRC),$(FSDD)) \
	    --out $(or $(OUT),$(WORK)/shards/$(CORPUS)) --workers $(JOBS)

shards-%: $(STAMP)  ## shorthand: make shards-<corpus> SRC=...
	$(MAKE) shards CORPUS=$* SRC=$(SRC) OUT=$(OUT)

stats: $(STAMP)  ## recompute fbank mean/std and clip durations of a shard folder: make stats SHARDS=work/shards/fsdd
	@test -n "$(SHARDS)" || (echo "usage: make stats SHARDS=<shard folder>"; exit 2)
	$(PY) -m data_prep stats --shards $(SHARDS)

# A second labelled real-audio set for `ssamba label-efficiency`: drum hits of the GS kits
# in Debian's GM SoundFonts, 7 classes; MuseScore General's kits are the test split. Also
# unlabelled notes of every melodic program of the training fonts: more pretraining audio.
# Needs: apt-get install libfluidsynth3 fluid-soundfont-gm timgm6mb-soundfont musescore-general-soundfont
SF2 ?= /usr/share/sounds/sf2
SF3 ?= /usr/share/sounds/sf3
devset-drums: $(STAMP)  ## render + shard the GM drum set (+ unlabelled notes) into $(WORK)/shards/gm_{drums,notes}
	$(PY) -m data_prep render-gm-drums --train $(SF2)/FluidR3_GM.sf2 $(SF2)/TimGM6mb.sf2 \
	    --test $(SF3)/MuseScore_General_Full.sf3 --out $(WORK)/devsets/gm_drums
	$(PY) -m data_prep shard --corpus gm-drums --src $(WORK)/devsets/gm_drums \
	    --out $(WORK)/shards/gm_drums --workers $(JOBS)
	$(PY) -m data_prep render-gm-notes --fonts $(SF2)/FluidR3_GM.sf2 $(SF2)/TimGM6mb.sf2 \
	    --out $(WORK)/devsets/gm_notes
	$(PY) -m data_prep shard --corpus unlabelled --src $(WORK)/devsets/gm_notes \
	    --out $(WORK)/shards/gm_notes --workers $(JOBS)

# Unlabelled speech to pretrain on beside FSDD (`ssamba label-efficiency --pretrain-extra`):
# KDE KLettres' recordings of the letters and syllables of 20 languages, native speakers,
# from Debian's klettres-data (GPL-2+): 1,836 clips, 51 minutes. Needs Debian's archive.
devset-speech: $(STAMP)  ## download + shard KLettres' spoken letters and syllables into $(WORK)/shards/klettres
	mkdir -p $(WORK)/devsets/klettres
	cd $(WORK)/devsets/klettres && apt-get download klettres-data
	dpkg-deb -x $$(ls $(WORK)/devsets/klettres/klettres-data_*.deb | tail -1) $(WORK)/devsets/klettres/deb
	$(PY) -m data_prep shard --corpus unlabelled --src $(WORK)/devsets/klettres/deb/usr/share/klettres \
	    --out $(WORK)/shards/klettres --workers $(JOBS)

# ---- demo --------------------------------------------------------------------
demo: $(STAMP)  ## shard FSDD, pretrain, fine-tune and probe against random init; DEMO=quick is shorter
	$(PY) -m ssamba.demo --fsdd $(FSDD) --work $(WORK)/demo $(if $(filter quick,$(DEMO)),--quick,)

# ---- continual learning --------------------------------------------------------
# Needs an encoder: runs/pretrain/fsdd_tiny_cpu/version_0/encoder.pt (ssamba pretrain
# --config recipes/pretrain/fsdd_tiny_cpu.yaml), or pass INIT=<encoder file>.
continual: $(STAMP)  ## adapters vs sequential fine-tuning vs probes on 3 FSDD tasks
	$(PY) -m data_prep shard --corpus fsdd --src $(FSDD) --out $(WORK)/shards/fsdd --workers $(JOBS)
	$(VENV)/bin/ssamba continual --derive-fsdd $(WORK)/lists/fsdd
	$(VENV)/bin/ssamba shard --corpus manifest --src $(WORK)/lists/fsdd/speaker.csv --out $(WORK)/shards/fsdd_speaker
	$(VENV)/bin/ssamba shard --corpus manifest --src $(WORK)/lists/fsdd/parity.csv --out $(WORK)/shards/fsdd_parity
	$(VENV)/bin/ssamba continual --config recipes/continual/fsdd_cpu.yaml --out $(WORK)/continual/fsdd $(if $(INIT),--init $(INIT),)

clean:  ## remove build and run artefacts (keeps .venv)
	rm -rf build *.egg-info .pytest_cache .ruff_cache $(WORK) lightning_logs

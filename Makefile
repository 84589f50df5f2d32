# capsctl: make install | test | demo | bench | docs | clean
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Where the demo and the real-data tests look for MNIST (IDX files). A copy beside the checkout
# is used when present; otherwise the demo downloads MNIST into the cache folder.
CAPSCTL_DATA ?= $(if $(wildcard ../shared/datasets/mnist),../shared/datasets/mnist,)
export CAPSCTL_DATA

.PHONY: install test demo bench device-check docs readme clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# First, with no training and no download: a committed pretrained model predicts a real MNIST
# test digit (kept in its folder) - when that model is in the checkout. Then a short MNIST run,
# its evaluation, and the pictures (reconstructions, perturbations, routes).
DEMO_MODEL := pretrained/efficient-capsnet-mnist
demo: $(STAMP)
	@if [ -f $(DEMO_MODEL)/model.pt ]; then \
	  $(VENV)/bin/capsctl pretrained example $(DEMO_MODEL) --index 0 --out runs/demo-digit.png && \
	  $(VENV)/bin/capsctl predict $(DEMO_MODEL) runs/demo-digit.png; \
	else echo "($(DEMO_MODEL) is not in this checkout: no pretrained prediction)"; fi
	$(VENV)/bin/capsctl train configs/mnist-quick.yaml --name demo --force $(if $(CAPSCTL_DATA),,--set data.download=true)
	$(VENV)/bin/capsctl eval runs/demo/checkpoints/best.pt --dataset mnist
	$(VENV)/bin/capsctl reconstruct runs/demo/checkpoints/best.pt --out runs/demo/reconstruct.png
	$(VENV)/bin/capsctl perturb runs/demo/checkpoints/best.pt --out runs/demo/perturb.png
	$(VENV)/bin/capsctl routes runs/demo/checkpoints/best.pt --out runs/demo/routes.png
	@echo "pictures: runs/demo/reconstruct.png runs/demo/perturb.png runs/demo/routes.png"

# On a machine with one CUDA GPU: CUDA tests, bench fp32/bf16/compile, one MNIST epoch in bf16,
# one table with the card's name (capsctl/device_check.py). Refuses without a GPU.
device-check: $(STAMP)
	$(PY) -m capsctl.device_check

bench: $(STAMP)
	$(VENV)/bin/capsctl bench configs/mnist.yaml --set train.batch_size=100

# Regenerate the config reference in docs/config.md (between its markers) from the config
# dataclasses; tests/test_docs.py checks it is current. `make readme` is the old name.
docs: $(STAMP)
	$(PY) -c "import subprocess,pathlib; p=pathlib.Path('docs/config.md'); t=subprocess.run(['$(VENV)/bin/capsctl','config','--reference'],capture_output=True,text=True,check=True).stdout; s=p.read_text(); a='<!-- config-reference:start (make docs) -->'; b='<!-- config-reference:end -->'; p.write_text(s[:s.index(a)+len(a)]+'\n'+t+s[s.index(b):])"

readme: docs

clean:
	rm -rf $(VENV) .pytest_cache

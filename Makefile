# One command each (see README): `make book` builds the executed book, `make test` runs the tests.
PYTHON ?= python3
# Torch threads: the book runs alone, so 2 on a 2-core machine; tests and CI use 1 (see README).
BOOK_THREADS ?= 2
# jupyter-book through the same interpreter the package was installed into.
JUPYTER_BOOK = $(PYTHON) -c "import sys; from jupyter_book.cli.main import main; sys.argv[0] = 'jupyter-book'; sys.exit(main())"

.PHONY: setup book test clean

setup:
	@# Keep a torch that is already there (Colab, GPU machines); otherwise take the CPU build 2.13.0,
	@# which pip finds locally on the project's machines (an unpinned torch pulls GBs of CUDA).
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[book,test]"
	@# A kernel papermill and jupyter-book can start: in the environment, or for the user where the
	@# environment is not writable (a system Python and no root).
	$(PYTHON) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3" >/dev/null 2>&1 || \
		$(PYTHON) -m ipykernel install --user --name python3 --display-name "Python 3" >/dev/null

book: setup
	LLFC_STRICT_CLAIMS=1 LLFC_PROGRESS=0 LLFC_THREADS=$(BOOK_THREADS) $(JUPYTER_BOOK) build . -W
	@echo "book: open _build/html/index.html"

test: setup
	@# the sweep extra (Ray) too: a test runs chapter 5's sweep on a local Ray
	$(PYTHON) -m pip install -q -e ".[book,test,sweep]"
	LLFC_THREADS=1 $(PYTHON) -m pytest -q -rs

clean:
	rm -rf _build .cache/llfc/frames

# Two commands on a fresh machine: `make demo` and `make test`. Both set everything up first.
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTHON  ?= python3
SAMPLE  := fixtures/sample.raw

.PHONY: setup system-deps demo test lint bench clean lock swift-deps swift-up swift-down

system-deps:
	@missing=""; \
	command -v qemu-img >/dev/null 2>&1 || missing="$$missing qemu-utils"; \
	{ ldconfig -p 2>/dev/null | grep -q 'libmagic\.so\.1'; } || missing="$$missing libmagic1"; \
	command -v mkfs.ext4 >/dev/null 2>&1 || missing="$$missing e2fsprogs"; \
	command -v mkfs.vfat >/dev/null 2>&1 || missing="$$missing dosfstools"; \
	command -v mcopy >/dev/null 2>&1 || missing="$$missing mtools"; \
	command -v mkfs.xfs >/dev/null 2>&1 || missing="$$missing xfsprogs"; \
	command -v mkfs.btrfs >/dev/null 2>&1 || missing="$$missing btrfs-progs"; \
	command -v cpio >/dev/null 2>&1 || missing="$$missing cpio"; \
	command -v lz4 >/dev/null 2>&1 || missing="$$missing lz4"; \
	command -v memcached >/dev/null 2>&1 || missing="$$missing memcached"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing >/dev/null; \
	  else \
	    echo "missing Debian packages; run: sudo apt-get install -y$$missing" >&2; exit 1; \
	  fi; \
	fi

# Exactly the versions in requirements.lock (hash-checked), so CI tests what a user gets;
# pyproject.toml keeps the ranges for library users. `make lock` regenerates the lock.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

lock:
	$(PYTHON) -m venv build/uv && build/uv/bin/pip install -q uv
	printf 'setuptools>=68\n' > build/build-requirements.in
	build/uv/bin/uv pip compile pyproject.toml build/build-requirements.in --extra dev \
	  --generate-hashes --python-version 3.11 --no-header -q -o requirements.lock

setup: system-deps $(STAMP)

DEMO    := build/demo

demo: setup
	@mkdir -p $(DEMO)
	$(BIN)/imagetool inspect $(SAMPLE)
	$(BIN)/imagetool prepare $(SAMPLE) -o $(DEMO)/sample.qcow2 --force \
	  --name sample-demo --arch x86_64 --username ubuntu --description "imagetool demo"
	$(BIN)/imagetool preflight $(DEMO)/sample.qcow2 --metadata $(DEMO)/sample.qcow2.json --server-disk 20G

test: setup swift-deps
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check imagetool tests bench fixtures
	$(BIN)/ruff format --check imagetool tests bench fixtures
	$(BIN)/mypy --strict imagetool

bench: setup
	@command -v hyperfine >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq hyperfine >/dev/null; }
	@command -v sfdisk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq fdisk >/dev/null; }
	@command -v debootstrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq debootstrap >/dev/null; }
	cd bench && ../$(BIN)/python inspect_bench.py && ../$(BIN)/python convert_bench.py && ../$(BIN)/python disk_size_bench.py && ../$(BIN)/python writer_bench.py \
	  && ../$(BIN)/python guest_bench.py \
	  && ../$(BIN)/python upload_bench.py

clean: swift-down
	rm -rf $(VENV) bench/work build .pytest_cache

# A real OpenStack Swift on 127.0.0.1 for the integration tests (tests/swift/swiftctl).
# Swift gets its own hash-checked venv so its pins never meet the project's; memcached is
# Debian's (tempauth keeps its tokens there). `make swift-up` prints ST_AUTH/ST_USER/ST_KEY.
SWIFT_VENV  := .swift-venv
SWIFT_STAMP := $(SWIFT_VENV)/.installed
SWIFT_DIR   ?= build/swift

$(SWIFT_STAMP): tests/swift/requirements.lock
	$(PYTHON) -m venv $(SWIFT_VENV)
	$(SWIFT_VENV)/bin/pip install -q --require-hashes -r tests/swift/requirements.lock
	touch $@

swift-deps: $(SWIFT_STAMP)
	@command -v memcached >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: memcached"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq memcached >/dev/null; \
	  else \
	    echo "missing Debian packages; run: sudo apt-get install -y memcached" >&2; exit 1; \
	  fi; \
	}

swift-up: swift-deps
	@$(PYTHON) tests/swift/swiftctl up --dir $(SWIFT_DIR)

swift-down:
	@$(PYTHON) tests/swift/swiftctl down --dir $(SWIFT_DIR)

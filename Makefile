# nodeproxy: `make demo` and `make test` set up everything they need on a fresh Debian machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := iptables iproute2 containernetworking-plugins curl tcpdump procps systemd openssl libcap2-bin \
	python3-venv nginx-light iperf3 wrk nghttp2-client stunnel4 haproxy
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml deploy/requirements.txt tests/requirements.txt
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then echo "apt: installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi; \
	fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	# every package pinned, also what the direct dependencies pull in
	$(PY) -m pip install -q -e '.[test]' -c deploy/requirements.txt -c tests/requirements.txt
	touch $(STAMP)

demo: setup
	$(VENV)/bin/nodeproxy demo $(DEMO_ARGS)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info

# One image for the init container (palisade-init: `python -m firewall redirect apply`),
# the sidecar (`python -m firewall run`) and the webhook (`python -m injector serve`).
#
# Two ways to build it (docs/platform.md):
#   docker build -t palisade:0.1.0 .          # public Python base, packages from PyPI and Debian
#   scripts/image.sh                          # offline: local debootstrap base + the host's wheels
# BASE_IMAGE may be any Debian bookworm image with python3 (3.11) and python3-venv. Packages already
# in the base are not installed again, so a base made by scripts/base-image.sh needs no network;
# wheels placed in ./wheels of the build context are installed with --no-index (no PyPI access).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PALISADE_DLP_RULES=/usr/share/palisade/dlp_rules \
    XDG_CACHE_HOME=/tmp/palisade-cache \
    PATH=/opt/palisade/venv/bin:$PATH

# nftables + iproute2: redirect rules; libpcap: BPF filter compilation for captures;
# libcap2-bin: setcap below; python3-venv only where the base's python lacks the venv module.
RUN set -eu; pkgs="nftables iproute2 libpcap0.8 libcap2-bin ca-certificates"; \
    python3 -c 'import ensurepip' 2>/dev/null || pkgs="$pkgs python3-venv"; \
    if ! dpkg -s $pkgs >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends $pkgs && rm -rf /var/lib/apt/lists/*; \
    fi

# The dependencies first, in their own layer: a code change does not reinstall them. `wheel[s]`
# matches nothing in a plain checkout (then pip uses PyPI) and the host's wheels when
# scripts/image.sh put them in the context. --copies: the venv has its own interpreter binary, so
# the file capabilities below apply to it alone, not to the system python. setuptools: to build
# this project without build isolation (offline).
WORKDIR /opt/palisade
COPY pyproject.toml wheel[s] /opt/palisade/wheels/
RUN set -eu; python3 -m venv --copies /opt/palisade/venv; \
    cd /opt/palisade/venv/bin && ln -sf python3.11 python3 && ln -sf python3.11 python; \
    deps=$(python3 -c 'import tomllib; print(" ".join(tomllib.load(open("/opt/palisade/wheels/pyproject.toml","rb"))["project"]["dependencies"]))'); \
    if ls /opt/palisade/wheels/*.whl >/dev/null 2>&1; then \
      pip install --no-index --find-links /opt/palisade/wheels $deps 'setuptools>=77'; \
    else pip install $deps 'setuptools>=77'; fi; \
    rm -rf /opt/palisade/wheels /root/.cache

# Sources go to a scratch directory that is removed after the install: `python -m` puts the working
# directory first on sys.path, and a second copy there would shadow the installed package.
# setup.py builds the native relay (firewall/datapath/_relay.c) when the base has a C compiler and
# Python headers; without them the build skips it and the sidecar uses the Python splice pump.
COPY pyproject.toml setup.py README.md /tmp/src/
COPY firewall /tmp/src/firewall
COPY injector /tmp/src/injector
RUN pip install --no-deps --no-build-isolation /tmp/src && rm -rf /tmp/src /root/.cache \
 && python -m pip uninstall -q -y setuptools pip  # build tools: nothing at run time needs them
COPY dlp_rules /usr/share/palisade/dlp_rules

# Kubernetes gives a non-root container no ambient capabilities: the sidecar (UID 1337) gets
# CAP_NET_ADMIN (IP_TRANSPARENT, SO_MARK) and CAP_NET_RAW (captures) from file capabilities on
# the venv's interpreter (`python` on PATH); the pod must list both in capabilities.add (the
# injector does) and allow privilege escalation for file capabilities to apply. Permitted only
# (+p, not +ep): with the effective bit the kernel refuses to exec the interpreter in a container
# whose bounding set lacks them (the webhook drops ALL); `palisade run` makes them effective itself.
RUN setcap cap_net_admin,cap_net_raw+p "$(readlink -f /opt/palisade/venv/bin/python)" \
 && getcap "$(readlink -f /opt/palisade/venv/bin/python)"

# Default sidecar config (the injector points --config here); every key is documented in docs/sre.md.
RUN mkdir -p /etc/palisade \
 && printf 'idle_timeout: 3600\ndrain_timeout: 20\nreload_interval: 2\n' > /etc/palisade/config.yaml

# UID/GID 1337: the proxy's identity (the injector runs the sidecar as 1337:1337).
RUN groupadd --gid 1337 palisade \
 && useradd --uid 1337 --gid 1337 --no-create-home --shell /usr/sbin/nologin palisade \
 && mkdir -p /var/run/palisade/pcap \
 && chown -R 1337:1337 /var/run/palisade

USER 1337:1337
EXPOSE 15006 15001 15020 8443
ENTRYPOINT ["python", "-m"]
CMD ["firewall", "--help"]
